"""Content leakage of a learned style: does "a circle ..., <s> style" still draw a circle?

A style learned from a few images also learns what those images show. Here every training
image is a star (random colour, background, size and position) in one held-out style; after
learning, the museum draws circles in that style, and the evaluator reads the shape of each
image zero-shot (the prompt with "circle" swapped for every shape of the world; argmax). A
style that leaked its content draws stars, or shapes that are no longer circles.

    python scripts/measure_leakage.py          # the table in docs/METHODS.md (MuseumMaker section)
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

from museum.evaluation.metrics import image_alignment
from museum.generation.sampling import generate_images
from museum.models.loading import EMBEDDED
from museum.museum import Museum
from museum.world.concepts import build_concept
from museum.world.render import BACKGROUNDS, COLOURS, SHAPES, random_scene, render

TRAIN_SHAPE = "star"
PROBE_SHAPE = "circle"
N_PROMPTS = 8


def style_images(style: str, n: int = 5, shape: str = TRAIN_SHAPE, seed: int = 0) -> list:
    """``n`` renders of ``shape`` in ``style`` (random colour, background, size, position; plain fill)."""
    rng = random.Random(f"leakage:{style}:{seed}")
    scenes = [replace(random_scene(rng, novel_style=style, base_styles=False), shape=shape, pattern="plain")
              for _ in range(n)]
    return [render(s, 7_000_000 + 1000 * seed + i) for i, s in enumerate(scenes)]


def probe_prompts(shape: str = PROBE_SHAPE) -> list[str]:
    """Eight content prompts of ``shape`` (every colour, the backgrounds in turn), without a style."""
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    return [f"a {colours[i % len(colours)]} {shape} on a {backgrounds[i % len(backgrounds)]} background"
            for i in range(N_PROMPTS)]


def read_shapes(evaluator, images, prompts: list[str], shape: str = PROBE_SHAPE) -> list[str]:
    """The evaluator's zero-shot reading of each image's shape (the prompt with ``shape`` swapped)."""
    candidates = [[p.replace(shape, s) for s in SHAPES] for p in prompts]
    return [SHAPES[i] for i in evaluator.classify(images, candidates)]


def _summary(reads: list[str]) -> dict:
    return {"circle": reads.count(PROBE_SHAPE) / len(reads), "star": reads.count(TRAIN_SHAPE) / len(reads),
            "reads": reads}


def base_reading(evaluator, pipe, n_seeds: int = 2) -> dict:
    """How often the untouched base model's circles (no style) read as circles: the ceiling."""
    prompts = [p for p in probe_prompts() for _ in range(n_seeds)]
    images = generate_images(pipe, prompts, seeds=list(range(n_seeds)) * N_PROMPTS)
    return _summary(read_shapes(evaluator, images, prompts))


def content_leakage(evaluator, folder: str | Path, *, style: str = "sepia", method: str = "museummaker",
                    n_train: int = 5, n_seeds: int = 2, base=EMBEDDED, **config) -> dict:
    """Learn ``style`` from ``n_train`` star images in a new museum at ``folder`` with ``method`` (``config``
    overrides its settings), draw the circle prompts in the style (seeds 0..n_seeds-1), read their shapes.
    Returns the fractions read as circle and as star, the readings, the style's image alignment to its
    held-out references (renders of every shape), and the training seconds."""
    m = Museum.init(folder, base=base)
    start = time.time()
    m.learn(style, style_images(style, n_train), method=method, style=True, progress=False, **config)
    seconds = time.time() - start
    prompts = [f"{p}, <{style}> style" for p in probe_prompts() for _ in range(n_seeds)]
    images = m.generate([f"{p}, <{style}> style" for p in probe_prompts()], n=n_seeds)
    out = _summary(read_shapes(evaluator, images, prompts))
    out.update(style_alignment=image_alignment(evaluator, images, build_concept(style).reference_images),
               seconds=seconds, images=images)
    return out

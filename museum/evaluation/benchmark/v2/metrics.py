"""What the benchmark reads from images on World v2.

**A concept's images** (the protocol's (prompt, seed) pairs, ``museum.evaluation.protocol``), :func:`read_images`:

* ``image_alignment``: the evaluator's mean cosine to the concept's held-out references (CLIP-I);
* ``independent``: the colour-and-patch reading, no learned model (``museum.evaluation.independent``);
* ``text_alignment``: the evaluator's cosine of each image to its class prompt (CLIP-T);
* ``recognition``: the share of images whose nearest benchmark-pool concept is the concept itself.

Both fidelity readings become **gap closed** (:func:`gaps_closed`, ``museum.evaluation.concept_fidelity``): 0 is
the base model drawing the class prompts, 1 the concept rendered in each prompt's own scene (the same prompts and
seeds: :func:`upper_images`). A concept whose gap is under ``MIN_GAP`` in a reading has no gap closed in it
(None), and is reported, never averaged in.

**Retained generality** (:func:`generality_prompts`, :func:`read_generality`): the Foundation benchmark's
reading (``museum.evaluation.prompt_following``: each captioned attribute read zero-shot) of the held-out
one-object prompts of scripts/bench_base_model_v2.py, drawn with every learned concept's effect installed,
as a prompt naming all of them would draw (T2I-ConBench's "general" reading of a customized model).

**Two concepts side by side** (:func:`composition_pairs`, :func:`read_pair`): "a small <a> circle on the left and
a small <b> square on the right on a sand background", read by placement (each concept's main colour mostly in
its own half, from pixels) and by each concept's fidelity in a square cut from its own half.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Sequence

import numpy as np
from PIL import Image

from museum.evaluation.concept_fidelity import Fidelity, GapClosed, fidelity, recognition
from museum.evaluation.independent import independent_fidelity
from museum.evaluation.prompt_following import (
    COLOUR_GAP, background_colour, held_out_scenes, read_attributes, read_placement,
)
from museum.evaluation.protocol import alignment
from museum.world.v2 import render
from museum.world.v2.concepts import LOOKS, N_QUICK_PROMPTS, Concept

READINGS = ("image_alignment", "independent", "text_alignment", "recognition")
#: gap closed -> the fidelity reading it is computed from
GAPS = {"gap_evaluator": "image_alignment", "gap_independent": "independent"}
GENERALITY_SEED = 12345  # the Foundation benchmark's held-out prompts (scripts/bench_base_model_v2.py)
PAIR_IMAGES = 8  # images of each side-by-side prompt (seeds 0..7)


def read_images(evaluator, images: Sequence, concept: Concept, class_prompts: Sequence[str], bank) -> dict:
    """Every reading of one concept's ``images`` (``class_prompts[i]`` goes with image i; ``bank``:
    ``concept_fidelity.reference_bank`` of the benchmark pool)."""
    aligned = alignment(evaluator, images, concept, list(class_prompts))
    return {"image_alignment": aligned.image_alignment,
            "independent": independent_fidelity(images, concept.reference_images)["fidelity"],
            "text_alignment": aligned.text_alignment,
            "recognition": recognition(evaluator, images, concept.name, bank),
            "n_images": aligned.n_images}


def upper_images(concept: Concept, n_prompts: int, n_seeds: int) -> list[Image.Image]:
    """What a perfect method would draw for the first ``n_prompts`` prompts, ``n_seeds`` images each, in the
    protocol's order (``Concept.prompt_renders``): the upper anchor of gap closed. (Beyond the quick prompts,
    World v2's object templates name styles without a recipe, which its renderer cannot draw yet.)"""
    return concept.prompt_renders(quick=n_prompts <= N_QUICK_PROMPTS, per_prompt=n_seeds)[:n_prompts * n_seeds]


def gaps_closed(reading: dict, class_prompt: dict, upper: dict) -> dict[str, float | None]:
    """Gap closed by each fidelity reading of ``reading`` between the anchors (None where the gap is too small)."""
    def as_fidelity(r: dict) -> Fidelity:
        return Fidelity(r["image_alignment"], r["independent"])

    gap = GapClosed(as_fidelity(reading), as_fidelity(class_prompt), as_fidelity(upper))
    return {"gap_evaluator": _finite(gap.evaluator()), "gap_independent": _finite(gap.independent())}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# --------------------------------------------------------------------------- retained generality


def generality_prompts(n: int) -> tuple[list[render.Scene], list[str], list[int]]:
    """The fixed held-out prompt set: ``n`` scenes, their captions and one seed each (the Foundation benchmark's)."""
    scenes = held_out_scenes(n, GENERALITY_SEED)
    return scenes, [render.caption(s) for s in scenes], [GENERALITY_SEED + i for i in range(n)]


def read_generality(evaluator, images: Sequence, scenes: Sequence[render.Scene]) -> dict[str, float]:
    """Per attribute, the share of images whose attribute the evaluator reads as the prompt says; ``mean``: their
    average (prompt following)."""
    read = {a: float(np.mean(flags)) for a, flags in read_attributes(evaluator, images, list(scenes)).items()}
    return {**read, "mean": float(np.mean(list(read.values())))}


# --------------------------------------------------------------------------- two concepts side by side


def _colours(name: str) -> list[np.ndarray]:
    """A concept's palette as RGB, its main colour first."""
    return [np.array(render.COLOURS[c], dtype=float) for c in LOOKS[name].palette]


def _readable(a: str, b: str, background: str) -> bool:
    """Can placement be read from colour: each main colour far from every colour of the other concept and from
    the background?"""
    ground = np.array(background_colour(background))
    (ca, *_), (cb, *_) = _colours(a), _colours(b)
    gaps = [np.linalg.norm(ca - c) for c in _colours(b)] + [np.linalg.norm(cb - c) for c in _colours(a)]
    return min(gaps + [np.linalg.norm(ca - ground), np.linalg.norm(cb - ground)]) >= COLOUR_GAP


def composition_pairs(names: Sequence[str], n: int) -> list[tuple[str, str, str]]:
    """Up to ``n`` (left, right, background) of the objects in ``names`` (a task sequence) whose placement can be
    read: learned far apart in the sequence first, a concept in as few pairs as possible."""
    objects = [x for x in names if isinstance(LOOKS[x], render.Look)]
    candidates = sorted(combinations(range(len(objects)), 2), key=lambda ij: (ij[0] - ij[1], ij[0]))
    found, used = [], {}
    for reuse in (0, 1, 2):  # concepts in no pair yet first, then in one, ...
        for i, j in candidates:
            a, b = objects[i], objects[j]
            ground = next((g for g in render.BACKGROUNDS if _readable(a, b, g)), None)
            pair = (a, b, ground)
            if ground and pair not in found and max(used.get(a, 0), used.get(b, 0)) <= reuse and len(found) < n:
                found.append(pair)
                used[a], used[b] = used.get(a, 0) + 1, used.get(b, 0) + 1
    return found


def pair_scene(a: str, b: str, background: str) -> render.Scene:
    """Concept ``a`` small on the left and ``b`` small on the right of ``background``."""
    return render.Scene(look=LOOKS[a], background=background, size="small", position="left",
                        companion=render.Scene(look=LOOKS[b], size="small", position="right"))


def pair_prompt(scene: render.Scene, phrases: tuple[str, str]) -> str:
    """The scene's two-object caption with each object named by its phrase ("<tok> circle", or the class word)."""
    words = render.object_words(scene, phrases[0]) + ["and"] + render.object_words(scene.companion, phrases[1])
    return " ".join(words + ["on", "a", scene.background, "background"])


def pair_renders(scene: render.Scene, n: int = PAIR_IMAGES) -> list[Image.Image]:
    """The scene as a perfect method would draw it: the upper anchor of the halves' gap closed."""
    return [render.render(scene, seed) for seed in range(n)]


def half(image: Image.Image, side: str) -> Image.Image:
    """The square around the middle of the image's ``side`` half ("left" or "right")."""
    w, h = image.size
    x = 0 if side == "left" else w // 2
    return image.crop((x, h // 4, x + w // 2, h // 4 + w // 2))


def read_pair(evaluator, images: Sequence, scene: render.Scene, references: dict[str, Sequence]) -> dict:
    """``placed``: the share of images with each concept's main colour in its own half
    (``prompt_following.read_placement``); ``objects_drawn``: how many of the two colours appear, on average;
    ``halves``: each concept's fidelity (both readings) in its own half. ``references``: left name, right name ->
    their reference images, in that order."""
    placements = [read_placement(im, scene) for im in images]
    halves = {name: fidelity(evaluator, [half(im, side) for im in images], refs).to_dict()
              for (name, refs), side in zip(references.items(), ("left", "right"))}
    return {"placed": float(np.mean([p["placed"] for p in placements])),
            "objects_drawn": float(np.mean([p["objects_drawn"] for p in placements])), "halves": halves}

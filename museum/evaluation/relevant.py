"""Relevant-concept forgetting (LFS-Diffusion, METHODS.md sec. 6): after learning "my circle" concepts, what do
plain prompts of the class ("a red circle on a sand background") draw?

A method that keeps one shared LoRA (``lfs``, ``finetune``) applies it to every prompt of the pipeline it is
loaded into (``museum export`` + ``pipe.load_lora_weights``; in Museum, every prompt naming one of its concepts).
So the class prompts are drawn with the method's learned effect installed (``Museum.activated``) and compared
with the untouched base model's images for the same prompts and seeds:

* text alignment of the images to their class prompt (evaluator), against the base model's;
* pixel RMSE to the base model's image of the same prompt and seed (values in [0, 1]);
* paired image alignment: evaluator cosine between each image and the base model's image of the same pair.

``lfs`` concepts' ICGen context is switched off here (scale 0, which draws exactly as without context): this
measures what the shared weights do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from museum.evaluation.metrics import text_alignment
from museum.evaluation.protocol import score_concept, seeded
from museum.generation.sampling import generate_images
from museum.methods.base import generation_settings
from museum.museum import Museum

CIRCLE_CONCEPTS = ("sunburst", "smiley")  # the held-out instances whose class word is "circle"
BACKGROUNDS = ("sand", "grass", "sky", "night", "snow", "brick")


def class_prompts(class_word: str = "circle", colour: str = "red") -> list[str]:
    return [f"a {colour} {class_word} on a {bg} background" for bg in BACKGROUNDS]


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])


@torch.no_grad()
def compare_to_base(evaluator, images, base_images, prompts: Sequence[str]) -> dict[str, float]:
    a, b = evaluator.embed_images(images), evaluator.embed_images(base_images)
    return {
        "text_alignment": text_alignment(evaluator, images, prompts),
        "pixel_rmse_to_base": float(np.sqrt(((_pixels(images) - _pixels(base_images)) ** 2).mean())),
        "paired_alignment_to_base": float((a * b).sum(-1).mean()),
    }


def base_images(pipe, n_seeds: int = 4, steps: int = 25) -> tuple[list[str], list[int], list]:
    """The class prompts, their seeds and the base model's images of them."""
    prompts, seeds = seeded(class_prompts(), n_seeds)
    return prompts, seeds, generate_images(pipe, prompts, seeds=seeds, steps=steps)


def relevant_forgetting(evaluator, folder: Path, base, *, method: str = "lfs", concepts: Sequence = (),
                        sample_steps: int = 25, **settings) -> dict:
    """Learn ``concepts`` (``museum.world.concepts.Concept``, class "circle") one after another into a new museum at
    ``folder`` with ``method`` and ``settings``; then draw the class prompts with the method's LoRA installed and
    compare them with ``base`` = :func:`base_images` of the base model. Also scores each concept's own learning."""
    prompts, seeds, reference = base
    m = Museum.init(folder)
    for c in concepts:
        m.learn(c.name, c.train_images, method=method, class_word=c.class_word, progress=False, **settings)
    with generation_settings({"context_scale": 0.0}):  # the shared weights' effect only, without lfs's ICGen context
        with m.activated([m.manifest.concept(c.name) for c in concepts]):
            images = generate_images(m.pipe, prompts, seeds=seeds, steps=sample_steps)
        out = compare_to_base(evaluator, images, reference, prompts)
        out["concepts"] = {c.name: score_concept(m, c.name, c, evaluator).image_alignment for c in concepts}
    out["images"] = images
    return out


__all__ = ["CIRCLE_CONCEPTS", "class_prompts", "compare_to_base", "base_images", "relevant_forgetting"]

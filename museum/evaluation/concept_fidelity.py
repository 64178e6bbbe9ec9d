"""How much of the way from the class prompt to a concept's own images a method has come, read twice:
by the evaluator (image alignment, CLIP-I style) and independently of any learned model
(:mod:`museum.evaluation.independent`), and whether the evaluator recognises the concept.

Gap closed = (learned - class prompt) / (upper - class prompt), per reading: 0 is the untouched base
model drawing the class prompts, 1 is as close to the held-out references as the concept rendered in
each prompt's own scene (:meth:`museum.world.v2.concepts.Concept.prompt_renders`, what a perfect method
would draw) is. The concept's training images are not the anchor: the prompts ask for grounds and
styles they never show, so even a perfect method would fall short of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from museum.evaluation.independent import gap_closed, independent_fidelity
from museum.evaluation.metrics import image_alignment


@dataclass
class Fidelity:
    """One image set's closeness to a concept's reference images."""

    image_alignment: float  # the evaluator's mean pairwise cosine
    independent: float  # colour histogram + nearest patch, no learned model

    def to_dict(self) -> dict:
        return asdict(self)


def fidelity(evaluator, images: Sequence, references: Sequence) -> Fidelity:
    return Fidelity(image_alignment(evaluator, images, references), independent_fidelity(images, references)["fidelity"])


@dataclass
class GapClosed:
    """The three image sets' readings of one concept, and the gap closed by each reading (NaN where the
    gap is too small to divide by: :data:`museum.evaluation.independent.MIN_GAP`)."""

    learned: Fidelity
    class_prompt: Fidelity
    upper: Fidelity

    def evaluator(self) -> float:
        return gap_closed(self.learned.image_alignment, self.class_prompt.image_alignment,
                          self.upper.image_alignment)

    def independent(self) -> float:
        return gap_closed(self.learned.independent, self.class_prompt.independent, self.upper.independent)

    def to_dict(self) -> dict:
        return {"learned": self.learned.to_dict(), "class_prompt": self.class_prompt.to_dict(),
                "upper": self.upper.to_dict(),
                "gap_closed": {"evaluator": self.evaluator(), "independent": self.independent()}}


@torch.no_grad()
def reference_bank(evaluator, references: dict[str, Sequence]) -> tuple[list[str], torch.Tensor]:
    """Concept names and their mean normalised reference embeddings (one row each)."""
    names = list(references)
    rows = [torch.nn.functional.normalize(evaluator.embed_images(references[n]).mean(0), dim=0) for n in names]
    return names, torch.stack(rows)


@torch.no_grad()
def recognition(evaluator, images: Sequence, name: str, bank: tuple[list[str], torch.Tensor]) -> float:
    """The fraction of ``images`` whose nearest concept in ``bank`` (cosine to its mean reference
    embedding) is ``name``: the evaluator's top-1 recognition."""
    names, rows = bank
    nearest = (evaluator.embed_images(images) @ rows.T).argmax(dim=1)
    return float((nearest == names.index(name)).float().mean())

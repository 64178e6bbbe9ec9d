"""What the continual benchmark measures (METHODS.md, "Continual evaluation protocol").

Every concept seen so far is drawn after each task and its images scored (:func:`score_images`) with the
evaluator:

* ``image_alignment`` (CLIP-I): mean pairwise cosine against the concept's reference renders;
* ``text_alignment`` (CLIP-T): cosine between each image and its prompt with the concept
  replaced by its class word (``Concept.class_prompts``); both from ``museum.evaluation.protocol.alignment``,
  the protocol's own scoring;
* ``kid``: Kernel Inception Distance to the reference renders in the evaluator's feature
  space (torchmetrics, ``subset_size`` capped by the sample counts); lower is better;
* ``recognition``: the fraction of images whose nearest prototype (mean reference embedding
  of every benchmark concept, plus the mean embedding of plain renders of every base shape)
  is the concept itself.

This fills a lower-triangular matrix R[t][j] per metric (None above the diagonal). From it
(:func:`summarize`, :func:`curves`): the final average A, forgetting F and backward transfer BWT
(``museum.evaluation.metrics``), oriented so that for every metric F > 0 means "got worse" and BWT < 0 means
"later tasks hurt earlier ones" (for KID, lower is better, so they are computed on -KID).
"""

from __future__ import annotations

import hashlib
import random
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torchmetrics.image.kid import KernelInceptionDistance

from museum.evaluation.metrics import backward_transfer, forgetting
from museum.evaluation.protocol import alignment
from museum.models.evaluator import to_pixels
from museum.world.render import SHAPES, random_scene, render, replace

METRICS = ("image_alignment", "text_alignment", "kid", "recognition")
HIGHER_IS_BETTER = {"image_alignment": True, "text_alignment": True, "kid": False, "recognition": True}
SHAPE_PROTOTYPE_RENDERS = 16


class EvaluatorFeatures(nn.Module):
    """The evaluator's unnormalised image features as an ``nn.Module``: the KID feature extractor."""

    def __init__(self, evaluator):
        super().__init__()
        self.evaluator = evaluator

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.evaluator.image_features(pixels).double()


@torch.no_grad()
def kid(evaluator, generated, references, *, subsets: int = 100, seed: int = 0) -> float | None:
    """KID between two image sets in the evaluator's feature space (None with fewer than 2 of either).

    ``subset_size`` is the smaller set's size (torchmetrics refuses a larger one). The subset
    draws use their own seeded generator, so the value is reproducible. Note the unbiased
    estimator is not 0 for two identical finite sets: it is (2/m) * (mean off-diagonal kernel
    - mean diagonal kernel), slightly negative. Never synchronised across processes (torchmetrics would
    gather every process's features under ``accelerate launch``, where processes score different units)."""
    m = min(len(generated), len(references))
    if m < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer"
        metric = KernelInceptionDistance(feature=EvaluatorFeatures(evaluator), subsets=subsets, subset_size=m,
                                         normalize=True, sync_on_compute=False)  # this process's images only
    metric.update(to_pixels(references), real=True)
    metric.update(to_pixels(generated), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, _ = metric.compute()
    return float(mean)


@dataclass
class Prototypes:
    """Named unit vectors in the evaluator's embedding space; an image is recognised as its nearest one."""

    labels: list[str]
    vectors: torch.Tensor  # (P, D), unit norm

    @torch.no_grad()
    def nearest(self, evaluator, images) -> list[str]:
        emb = evaluator.embed_images(images)
        return [self.labels[i] for i in (emb @ self.vectors.T).argmax(-1).tolist()]

    def accuracy(self, evaluator, images, target: str) -> float:
        if target not in self.labels:
            raise ValueError(f"{target!r} is not among the prototypes {self.labels}")
        found = self.nearest(evaluator, images)
        return float(np.mean([f == target for f in found]))


def shape_renders(shape: str, n: int = SHAPE_PROTOTYPE_RENDERS) -> list:
    """``n`` renders of plain base scenes of ``shape`` (random colour, background, size, position)."""
    rng = random.Random(f"shape-prototype:{shape}")
    scenes = [replace(random_scene(rng, base_styles=False), shape=shape, pattern="plain") for _ in range(n)]
    base = int(hashlib.sha256(shape.encode()).hexdigest()[:6], 16) * 1000
    return [render(s, base + i) for i, s in enumerate(scenes)]


@torch.no_grad()
def build_prototypes(evaluator, concepts: dict[str, Sequence], shapes: Sequence[str] | None = None) -> Prototypes:
    """Prototypes: each concept's mean reference embedding (``concepts``: name -> reference images), and
    ``shape:<s>`` for every base shape (mean embedding of :func:`shape_renders`)."""
    shapes = SHAPES if shapes is None else shapes
    labels, vectors = [], []
    for name, refs in concepts.items():
        labels.append(name)
        vectors.append(evaluator.embed_images(list(refs)).mean(0))
    for s in shapes:
        labels.append(f"shape:{s}")
        vectors.append(evaluator.embed_images(shape_renders(s)).mean(0))
    return Prototypes(labels, torch.nn.functional.normalize(torch.stack(vectors), dim=-1))


def score_images(evaluator, images, concept, prompts: Sequence[str], prototypes: Prototypes) -> dict:
    """Every metric of one concept's generated ``images`` (``prompts[i]``, a class prompt, goes with image i): the
    protocol's alignments (``protocol.alignment``), KID and shape recognition."""
    aligned = alignment(evaluator, images, concept, list(prompts))
    return {
        "image_alignment": aligned.image_alignment,
        "text_alignment": aligned.text_alignment,
        "kid": kid(evaluator, images, concept.reference_images),
        "recognition": prototypes.accuracy(evaluator, images, concept.name),
        "n_images": aligned.n_images,
    }


def summarize(R: Sequence[Sequence[float | None]], higher_is_better: bool = True) -> dict:
    """A, F and BWT of a lower-triangular matrix (None above the diagonal and for missing values);
    F and BWT are computed on -R when lower is better, so their sign means the same for every metric."""
    if not R:
        return {"A": None, "F": None, "BWT": None}
    arr = np.array([[np.nan if v is None else v for v in row] for row in R], dtype=float)
    final = arr[-1][~np.isnan(arr[-1])]
    sign = 1.0 if higher_is_better else -1.0
    return {"A": float(final.mean()) if final.size else None,
            "F": _finite(forgetting(sign * arr)), "BWT": _finite(backward_transfer(sign * arr))}


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def curves(R: Sequence[Sequence[float | None]], higher_is_better: bool = True) -> dict[str, list]:
    """Average over seen concepts and forgetting after every task t (for the report's plot)."""
    sign = 1.0 if higher_is_better else -1.0
    arr = np.array([[np.nan if v is None else v for v in row] for row in R], dtype=float)
    avg, fgt = [], []
    for t in range(len(arr)):
        row = arr[t, :t + 1]
        avg.append(_finite(np.nanmean(row)) if np.isfinite(row).any() else None)
        fgt.append(_finite(forgetting(sign * arr[:t + 1, :t + 1])))
    return {"average": avg, "forgetting": fgt}

"""Personalisation and continual-learning metrics (METHODS.md, "Continual evaluation protocol").

* image alignment (CLIP-I): mean pairwise cosine between evaluator embeddings of generated
  images and of the concept's reference images;
* text alignment (CLIP-T): mean cosine between each image and its prompt, with the concept
  replaced by its class word;
* average A = mean_j R[T, j] and forgetting F = mean_{j<T} (max_{t<T} R[t, j] - R[T, j]).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


@torch.no_grad()
def image_alignment(evaluator, generated, references) -> float:
    """Mean pairwise cosine similarity between two image sets (1.0 for identical sets of one image)."""
    a = evaluator.embed_images(generated)
    b = evaluator.embed_images(references)
    return float((a @ b.T).mean())


@torch.no_grad()
def text_alignment(evaluator, images, prompts: Sequence[str]) -> float:
    """Mean cosine between each image and its own prompt."""
    a = evaluator.embed_images(images)
    t = evaluator.embed_texts(list(prompts))
    return float((a * t).sum(-1).mean())


def average(R: np.ndarray) -> float:
    """Final average over all tasks: mean_j R[T, j]."""
    R = np.asarray(R, dtype=float)
    return float(np.nanmean(R[-1]))


def forgetting(R: np.ndarray) -> float:
    """mean_{j<T} (max_{t<T} R[t, j] - R[T, j]) for a lower-triangular R (rows: after task t, cols: concept j).
    Missing values are NaN: the max is over the rows that have one, and a concept without a final value or
    without any earlier one is left out (NaN when none is left)."""
    R = np.asarray(R, dtype=float)
    T = R.shape[0]
    if T < 2:
        return 0.0
    drops = [np.nanmax(R[j:T - 1, j]) - R[T - 1, j] for j in range(T - 1)
             if np.isfinite(R[T - 1, j]) and np.isfinite(R[j:T - 1, j]).any()]
    return float(np.mean(drops)) if drops else float("nan")


def backward_transfer(R: np.ndarray) -> float:
    """mean_{j<T} (R[T, j] - R[j, j]): negative when learning later tasks hurt earlier ones (concepts missing
    either value, NaN, are left out)."""
    R = np.asarray(R, dtype=float)
    T = R.shape[0]
    if T < 2:
        return 0.0
    diffs = [R[T - 1, j] - R[j, j] for j in range(T - 1) if np.isfinite(R[T - 1, j]) and np.isfinite(R[j, j])]
    return float(np.mean(diffs)) if diffs else float("nan")

"""An independent fidelity reading: how close generated images are to a concept's references,
measured without any learned model, beside the evaluator's image alignment.

Two terms, each in [0, 1], averaged:

* **colour**: histogram intersection (Swain & Ballard 1991) of the images' joint RGB histograms
  (``BINS`` levels per channel) with the references' pooled histogram;
* **patches**: for every ``PATCH`` x ``PATCH`` patch of an image, the distance to its nearest
  patch among all references' patches (RMS over pixels, in [0, 1] of the 0-255 range), turned
  into a similarity ``1 - distance / PATCH_SCALE`` and averaged over the image: local texture
  and pattern, wherever it sits in the frame.

A reading alone depends on backgrounds and prompts; what is reported is the **gap closed**:
``(learned - class prompt) / (upper - class prompt)`` (:func:`gap_closed`), the share of the distance
between what the base model draws for the class prompt and what a perfect method would draw (the
concept rendered in each evaluation prompt's own scene) that a method has covered.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

BINS = 6
PATCH = 6
STRIDE = 3
PATCH_SCALE = 0.35  # an RMS patch distance of 0.35 (of the 0-255 range) or more reads as 0
MIN_GAP = 0.02  # a gap under this (in either reading's units) is too small to divide by: reported as NaN


def _arrays(images) -> np.ndarray:
    """PIL images or an (N, H, W, 3) uint8 array -> (N, H, W, 3) float in [0, 1]."""
    if isinstance(images, np.ndarray):
        return images.astype(np.float32) / 255.0
    return np.stack([np.asarray(im.convert("RGB"), np.float32) for im in images]) / 255.0


def colour_histograms(images) -> np.ndarray:
    """(N, BINS**3) normalised joint RGB histograms."""
    x = _arrays(images)
    q = np.clip((x * BINS).astype(np.int64), 0, BINS - 1)
    index = (q[..., 0] * BINS + q[..., 1]) * BINS + q[..., 2]
    hist = np.stack([np.bincount(i.ravel(), minlength=BINS ** 3) for i in index]).astype(np.float32)
    return hist / hist.sum(axis=1, keepdims=True)


def colour_similarity(images, references) -> np.ndarray:
    """Per image: histogram intersection with the references' pooled histogram, in [0, 1]."""
    pooled = colour_histograms(references).mean(axis=0)
    return np.minimum(colour_histograms(images), pooled).sum(axis=1)


def _patches(x: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) -> (N, P, PATCH*PATCH*3) patches at ``STRIDE``."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    return torch.nn.functional.unfold(t, PATCH, stride=STRIDE).transpose(1, 2)


def patch_similarity(images, references) -> np.ndarray:
    """Per image: the mean over its patches of 1 - (RMS distance to the nearest reference patch) / PATCH_SCALE, clipped to [0, 1]."""
    bank = _patches(_arrays(references)).reshape(-1, PATCH * PATCH * 3)
    scores = []
    for patches in _patches(_arrays(images)):
        nearest = torch.cdist(patches, bank).min(dim=1).values / np.sqrt(PATCH * PATCH * 3)
        scores.append(float((1 - nearest / PATCH_SCALE).clamp(0, 1).mean()))
    return np.asarray(scores, np.float32)


def independent_fidelity(images: Sequence, references: Sequence) -> dict[str, float]:
    """Mean colour, patch and overall (their average) similarity of ``images`` to ``references``."""
    colour = float(colour_similarity(images, references).mean())
    patches = float(patch_similarity(images, references).mean())
    return {"colour": colour, "patches": patches, "fidelity": (colour + patches) / 2}


def gap_closed(learned: float, class_prompt: float, upper: float) -> float:
    """(learned - class prompt) / (upper - class prompt); NaN when the upper anchor scores less than
    ``MIN_GAP`` above the class prompt (no gap worth dividing by: report it, do not average it)."""
    gap = upper - class_prompt
    return float("nan") if gap < MIN_GAP else (learned - class_prompt) / gap


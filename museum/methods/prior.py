"""Generic content drawn by the base model: prompts and latents that stand in for data a method does not have.

Custom Diffusion's prior preservation and MuseumMaker's data-free distillation need images of
"anything but the concept": the base model draws them once from generic captions of the world
(``a red star on a sand background``; the rendered world's caption grammar, plain English for any
Stable Diffusion model) and the latents are cached in the museum's ``cache/class_images/``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from museum.generation.sampling import generate_images
from museum.store.atomic import atomic_write_bytes
from museum.world.render import base_samples, caption

GENERIC_SEED = 4242


def generic_captions(n: int, seed: int = GENERIC_SEED) -> list[str]:
    """``n`` captions of random base scenes, without a style part."""
    return [caption(s, drop=frozenset({"style"})) for s, _ in base_samples(n, seed=seed)]


def generated_latents(pipe, prompts: list[str], cache_dir, name: str) -> torch.Tensor:
    """Latents (N, C, h, w) the pipeline draws for ``prompts`` (seeds 0..N-1), generated once and cached
    as ``cache_dir/class_images/{name}-{key}.safetensors`` (key: a hash of the prompts and the resolution).
    Call it before installing trainable parameters: the pipeline draws with whatever weights it has."""
    key = hashlib.sha256(repr((prompts, pipe.unet.config.sample_size)).encode()).hexdigest()[:12]
    path = Path(cache_dir) / "class_images" / f"{name}-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        return load_file(path)["latents"]

    latents = generate_images(pipe, prompts, seeds=list(range(len(prompts))), output_type="latent")
    latents = torch.stack(latents).float().cpu()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save_bytes({"latents": latents.contiguous()}))
    return latents

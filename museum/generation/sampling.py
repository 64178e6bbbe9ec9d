"""Seeded sampling with a diffusers pipeline, and grids a person can look at."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from museum.models.loading import resolution


def generate_images(pipe, prompts: Sequence[str], *, seeds: Sequence[int], steps: int = 25, guidance: float = 7.5,
                    batch_size: int = 16, **pipe_kwargs) -> list[Image.Image]:
    """One image per (prompt, seed) pair. Each image has its own generator, so an image does not
    depend on which batch it was drawn in."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    size = resolution(pipe)
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        out = pipe(list(prompts[i:i + batch_size]), num_inference_steps=steps, guidance_scale=guidance,
                   height=size, width=size, generator=gens, **pipe_kwargs)
        images.extend(out.images)
    return images


def image_grid(images: Sequence[Image.Image], cols: int, scale: int = 4) -> Image.Image:
    """Paste images into a grid, upscaled with nearest neighbour so small renders stay crisp."""
    if not images:
        raise ValueError("no images to put in a grid")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for k, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((k % cols) * w, (k // cols) * h))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)

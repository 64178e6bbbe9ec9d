"""Seeded sampling with a diffusers pipeline, a warning for prompts the text encoder truncates, and grids a
person can look at."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from museum.models.loading import resolution

ROW_NUMBER_MARGIN = 22  # pixels left of a numbered grid's first column


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


def warn_if_truncated(tokenizer, prompts: Sequence[str], concept_tokens: Sequence[str] = ()) -> None:
    """Warn about prompts longer than the text encoder's limit (they are truncated), naming concepts cut off."""
    limit = tokenizer.model_max_length
    for p in dict.fromkeys(prompts):
        ids = tokenizer(p).input_ids
        if len(ids) <= limit:
            continue
        kept = set(tokenizer.convert_ids_to_tokens(ids[:limit - 1]))
        lost = [t for t in concept_tokens if t in p and t not in kept]
        extra = f"; {', '.join(lost)} fall(s) after the limit and will not be drawn" if lost else ""
        warnings.warn(f"prompt has {len(ids)} tokens, more than the model's {limit}; it is truncated to the first "
                      f"{limit}{extra}: {p[:60]}...", stacklevel=3)


def image_grid(images: Sequence[Image.Image], cols: int, scale: int = 4, *, pad: int = 0,
               numbered: bool = False) -> Image.Image:
    """Paste images into a grid, each upscaled with nearest neighbour so small renders stay crisp, ``pad`` white
    pixels around each; ``numbered`` writes each row's number (from 1) in a margin on the left."""
    if not images:
        raise ValueError("no images to put in a grid")
    w, h = images[0].size
    tw, th = w * scale, h * scale
    rows = (len(images) + cols - 1) // cols
    margin = ROW_NUMBER_MARGIN if numbered else 0
    grid = Image.new("RGB", (margin + pad + cols * (tw + pad), pad + rows * (th + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for k, im in enumerate(images):
        x, y = margin + pad + (k % cols) * (tw + pad), pad + (k // cols) * (th + pad)
        grid.paste(im.convert("RGB").resize((tw, th), Image.NEAREST), (x, y))
        if numbered and k % cols == 0:
            draw.text((4, y + th // 2 - 5), str(k // cols + 1), fill=(0, 0, 0))
    return grid

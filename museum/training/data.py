"""Concept images: reading a folder safely, and augmented latents computed once.

Images are converted (grayscale, palette, RGBA composited on white, 16-bit scaled to 8
bits), resized and centre-cropped to the model's resolution. Augmentation (small scale and
shift, optional horizontal flip) produces a fixed set of variants per image, each with a
mask of its valid region; the trainer masks the loss with it. Latents of every variant are
encoded once, before the first step.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from museum.errors import ImageFolderError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
MIN_SIDE = 8
MAX_PIXELS = 64_000_000  # decompression-bomb guard (PIL's own default warns at ~89M)
MAX_FILE_BYTES = 256 * 2**20  # no concept photo is this large; refuse before reading it into memory


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited on white; 16/32-bit images are rescaled."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageFolderError(f"{path}: {im.width}x{im.height} pixels is too large "
                                       f"(limit {MAX_PIXELS:,}); downscale it first")
            im.load()
            image = to_rgb(im)
    except ImageFolderError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageFolderError(f"{path}: not a readable image ({err.__class__.__name__}: {err}); "
                               "remove or replace the file") from None
    if min(image.size) < MIN_SIDE:
        raise ImageFolderError(f"{path}: {image.width}x{image.height} is too small; "
                               f"concept images need at least {MIN_SIDE}x{MIN_SIDE} pixels")
    return image


def read_image_folder(folder: str | Path) -> tuple[list[Image.Image], list[str]]:
    """(RGB images, sha256 of each file) from a folder of png/jpg/webp images, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageFolderError(f"image folder {folder} does not exist or is not a folder")
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise ImageFolderError(f"{p}: not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))}); "
                                   "remove it from the concept folder")
        try:
            real = p.resolve(strict=True)
        except (OSError, RuntimeError) as err:
            raise ImageFolderError(f"{p}: cannot be resolved ({err}); is it a broken link or a link loop?") from None
        if not real.is_file():  # a link to a device (/dev/zero), a pipe or a socket would hang or never end
            raise ImageFolderError(f"{p}: not a regular file ({real}); put image files in the concept folder")
        if real.stat().st_size > MAX_FILE_BYTES:
            raise ImageFolderError(f"{p}: {real.stat().st_size:,} bytes is too large for a concept image "
                                   f"(limit {MAX_FILE_BYTES:,}); downscale or recompress it first")
        files.append(p)
    if not files:
        raise ImageFolderError(f"image folder {folder} has no images (png, jpg, webp); put 3-10 images of the concept in it")
    images = [read_image(p) for p in files]
    hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    return images, hashes


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC if side > size else Image.NEAREST)


def augment(image: Image.Image, size: int, rng: random.Random, *, flip: bool, scale: tuple[float, float] = (0.85, 1.0),
            max_shift: float = 0.08) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented variant: (pixels (3, size, size) in [-1, 1], valid-region mask (1, size, size))."""
    base = center_crop_resize(image, size)
    s = rng.uniform(*scale)
    inner = max(1, round(size * s))
    scaled = base.resize((inner, inner), Image.BICUBIC)
    slack = size - inner
    dx = min(slack, max(0, slack // 2 + round(rng.uniform(-max_shift, max_shift) * size)))
    dy = min(slack, max(0, slack // 2 + round(rng.uniform(-max_shift, max_shift) * size)))
    canvas = Image.new("RGB", (size, size), (127, 127, 127))
    canvas.paste(scaled, (dx, dy))
    mask = torch.zeros(1, size, size)
    mask[:, dy:dy + inner, dx:dx + inner] = 1.0
    pixels = torch.from_numpy(np.asarray(canvas, np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    if flip and rng.random() < 0.5:
        pixels, mask = pixels.flip(-1), mask.flip(-1)
    return pixels, mask


@dataclass
class LatentSet:
    """Cached latent distributions of augmented variants, with latent-resolution masks."""

    mean: torch.Tensor  # (N, C, h, w), already multiplied by the VAE scaling factor
    std: torch.Tensor
    mask: torch.Tensor  # (N, 1, h, w)

    def sample(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.randn(self.mean[idx].shape, generator=generator)
        return self.mean[idx] + self.std[idx] * eps, self.mask[idx]

    def __len__(self) -> int:
        return len(self.mean)


@torch.no_grad()
def encode_variants(vae, images: list[Image.Image], size: int, *, variants: int, flip: bool, seed: int,
                    augment_images: bool = True) -> LatentSet:
    """Encode ``variants`` augmented copies of every image once (the first copy is un-augmented)."""
    rng = random.Random(seed)
    pixels, masks = [], []
    for image in images:
        for v in range(variants):
            if v == 0 or not augment_images:
                p = torch.from_numpy(np.asarray(center_crop_resize(image, size), np.float32)).permute(2, 0, 1) / 127.5 - 1.0
                m = torch.ones(1, size, size)
            else:
                p, m = augment(image, size, rng, flip=flip)
            pixels.append(p)
            masks.append(m)
    x = torch.stack(pixels).to(vae.device, vae.dtype)
    dists = [vae.encode(x[i:i + 64]).latent_dist for i in range(0, len(x), 64)]
    sf = vae.config.scaling_factor
    mean = torch.cat([d.mean for d in dists]).float().cpu() * sf
    std = torch.cat([d.std for d in dists]).float().cpu() * sf
    mask = F.interpolate(torch.stack(masks), size=mean.shape[-2:], mode="area")
    return LatentSet(mean, std, (mask > 0.999).float())

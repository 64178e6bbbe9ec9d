"""How much of each World v2 pattern and style survives the VAE's round trip (encode to the latent's
mean, decode), measured per pattern and per style on held-out renders.

    python scripts/measure_vae_v2.py --vae ~/.cache/museum/pretrain-v2/vae --out docs/world-v2

Per group: PSNR and mean absolute error (0-255) of the round trip against the render, and the
independent patch similarity (museum.evaluation.independent) of the round trip to its own render
(1 = every 6x6 patch found again). Writes vae.json, vae.md, vae-patterns.png and vae-styles.png (per group,
three renders above their round trips).
"""

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from museum.evaluation.independent import patch_similarity
from museum.world.v2 import concepts, render

N_PER_GROUP = 24


def group_scenes(seed: int) -> dict[str, list[render.Scene]]:
    """Held-out scenes (seeds no pretraining chunk uses) for every pattern and every style family."""
    rng = random.Random(f"vae-check:{seed}")
    reserved = concepts.reserved_signatures()
    groups = {}
    for pattern in render.PATTERNS:
        looks = []
        while len(looks) < N_PER_GROUP:
            look = render.random_look(rng)
            if look.pattern == pattern and look.signature() not in reserved:
                looks.append(look)
        groups[f"pattern: {pattern}"] = [replace(render.random_scene(rng, look=lk, style_p=0.0), size="large")
                                         for lk in looks]
    for family in render.STYLES:
        groups[f"style: {family}"] = [render.random_scene(rng, style=render.random_style(rng, family))
                                      for _ in range(N_PER_GROUP)]
    return groups


@torch.no_grad()
def round_trip(vae: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def measure(vae: AutoencoderKL, seed: int = 0) -> tuple[dict, list[np.ndarray]]:
    rows, strips = {}, []
    for name, scenes in group_scenes(seed).items():
        images = render.render_batch([(s, 90_000_000 + i) for i, s in enumerate(scenes)])
        rec = round_trip(vae, images)
        err = np.abs(images.astype(np.float32) - rec.astype(np.float32))
        mse = (err ** 2).mean(axis=(1, 2, 3))
        patches = [float(patch_similarity(rec[i:i + 1], images[i:i + 1])[0]) for i in range(len(images))]
        rows[name] = {"psnr": float(np.mean(10 * np.log10(255 ** 2 / np.maximum(mse, 1e-6)))),
                      "mae": float(err.mean()), "patch_similarity": float(np.mean(patches))}
        strips.append(np.concatenate([np.concatenate(list(images[:3]), axis=1), np.concatenate(list(rec[:3]), axis=1)]))
    return rows, strips


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", type=Path, default=Path.home() / ".cache/museum/pretrain-v2/vae")
    parser.add_argument("--out", type=Path, default=Path("docs/world-v2"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, strips = measure(AutoencoderKL.from_pretrained(args.vae).eval())
    (args.out / "vae.json").write_text(json.dumps(rows, indent=1))
    lines = ["| group | PSNR (dB) | mean abs. error (0-255) | patch similarity |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['psnr']:.1f} | {v['mae']:.1f} | {v['patch_similarity']:.3f} |" for k, v in rows.items()]
    (args.out / "vae.md").write_text("\n".join(lines) + "\n")
    sheet = np.concatenate(strips[:len(render.PATTERNS)], axis=0), np.concatenate(strips[len(render.PATTERNS):], axis=0)
    for part, name in zip(sheet, ("vae-patterns.png", "vae-styles.png")):
        Image.fromarray(part).save(args.out / name)
    print("\n".join(lines))

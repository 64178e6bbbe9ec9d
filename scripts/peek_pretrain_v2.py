"""Samples of the World v2 UNet as its latest pretraining checkpoint has it (EMA weights), while it trains.

    OMP_NUM_THREADS=1 python scripts/peek_pretrain_v2.py --out /tmp/peek.png

Draws ``--prompts`` held-out prompts (museum.evaluation.prompt_following.held_out_scenes; the
Foundation benchmark's kind) plus two two-object prompts, two seeds each, in a grid beside the renders of
the same scenes (left: render, right: samples), and writes the captions next to the grid (``.txt``).
Looks only: the numbers come from scripts/bench_base_model_v2.py once the stage is done. ``--grounds`` also
prints whether the ground follows the words or the seed: "a red circle on a {blue, yellow, grass} background",
seeds 0-5, the variance of the top strip's mean colour between words and between seeds (the check that found the
UNet reading the ground from the starting noise; museum/models/v2/pretrain.py, NOISE_OFFSET).

    OMP_NUM_THREADS=1 python scripts/peek_pretrain_v2.py --out /tmp/peek.png --grounds

``--placement N`` also reads N two-object prompts from pixels (prompt_following.read_placement, one seed each):
how many are placed, and how many come out mirrored (each object on the other's side), an early sign of whether
the sides are being learned; the published reading is bench_base_model_v2's.
"""

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from museum.evaluation import prompt_following as PF
from museum.generation import generate_images, image_grid
from museum.models.v2.pretrain import unet_snapshot
from museum.world.v2 import render

GROUNDS, GROUND_SEEDS = ("blue", "yellow", "grass"), range(6)


def ground_variances(pipe, steps: int) -> dict[str, float]:
    """Variance (summed over RGB) of the top 8 rows' mean colour: between ground words and between seeds."""
    prompts = [f"a red circle on a {g} background" for g in GROUNDS for _ in GROUND_SEEDS]
    images = generate_images(pipe, prompts, seeds=list(GROUND_SEEDS) * len(GROUNDS), steps=steps)
    top = np.array([np.asarray(im, float)[:8].reshape(-1, 3).mean(0) for im in images])
    top = top.reshape(len(GROUNDS), len(GROUND_SEEDS), 3)
    return {"between words": float(top.mean(1).var(0).sum()), "between seeds": float(top.mean(0).var(0).sum())}


def placement(pipe, n: int, steps: int) -> dict[str, int]:
    """Of ``n`` readable two-object prompts: how many are placed, and how many placed once the sides are swapped."""
    pairs = PF.readable_pairs(n, seed=778)
    images = generate_images(pipe, [render.caption(s) for s in pairs], seeds=list(range(n)), steps=steps)
    mirrored = [replace(s, position=s.companion.position, companion=replace(s.companion, position=s.position))
                for s in pairs]
    return {"pairs": n, "placed": sum(PF.read_placement(im, s)["placed"] for im, s in zip(images, pairs)),
            "mirrored": sum(PF.read_placement(im, s)["placed"] for im, s in zip(images, mirrored))}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache/museum/pretrain-v2")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--grounds", action="store_true", help="also check that grounds follow the words")
    parser.add_argument("--placement", type=int, default=0, help="also read this many two-object prompts' placement")
    args = parser.parse_args()
    pipe, step = unet_snapshot(args.work)
    scenes = PF.held_out_scenes(args.prompts, seed=777) + PF.readable_pairs(2, seed=777)
    captions = [render.caption(s) for s in scenes]
    samples = generate_images(pipe, [c for c in captions for _ in range(2)], seeds=[0, 1] * len(captions),
                              steps=args.steps)
    cells = [im for i, s in enumerate(scenes) for im in (render.render(s, i), samples[2 * i], samples[2 * i + 1])]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(cells, cols=6, scale=2).save(args.out)
    args.out.with_suffix(".txt").write_text(f"UNet step {step}; rows of two prompts, each: render, seed 0, seed 1\n"
                                            + "\n".join(f"{i}: {c}" for i, c in enumerate(captions)) + "\n")
    print(f"step {step}: {args.out}")
    if args.grounds:
        print(f"step {step}: top-strip colour variance", {k: round(v) for k, v in ground_variances(pipe, args.steps).items()})
    if args.placement:
        print(f"step {step}: two objects", placement(pipe, args.placement, args.steps))

"""Can an evaluator image tower read an object's pattern at all? A supervised check of tower layouts.

    OMP_NUM_THREADS=1 python scripts/check_evaluator_tower.py --out docs/world-v2/evaluator-tower.json

Each layout of ``museum.models.evaluator.ImageEncoder`` (the strided first convolution the first World v2
evaluator had, and a full-resolution ``stem_width`` stem) is trained from scratch with a linear classifier on
its embedding to name the pattern (12 classes, chance 1/12) of single unstyled objects of the pretraining
distribution (fresh renders, seeds no pretraining chunk uses); accuracy on held-out renders after each of
``--report`` steps, and the median seconds a step. A layout that cannot learn this supervised cannot learn it
contrastively either, where the pattern is only a few words of a long caption.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from museum.models.evaluator import EMBED_DIM, ImageEncoder
from museum.world.v2 import concepts, render

LAYOUTS = {"strided": {}, "stem": {"stem_width": 32}}
PATTERNS = list(render.PATTERNS)


def pattern_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` renders of single unstyled objects (uint8, N x 3 x 64 x 64) and their pattern labels."""
    samples = [(s, k) for s, k in render.base_samples(3 * n, seed, reserved=concepts.reserved_signatures(),
                                                     pair_fraction=0.0) if s.style is None][:n]
    pixels = torch.from_numpy(render.render_batch(samples)).permute(0, 3, 1, 2)
    return pixels, torch.tensor([PATTERNS.index(s.look.pattern) for s, _ in samples])


def train(layout: dict, data, test, *, steps: int, batch: int, report: list[int], seed: int) -> dict:
    torch.manual_seed(seed)
    tower = ImageEncoder(image_size=64, **layout)
    classifier = torch.nn.Linear(EMBED_DIM, len(PATTERNS))
    params = list(tower.parameters()) + list(classifier.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    accuracy, times = {}, []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = F.cross_entropy(classifier(tower(x[idx].float() / 255)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        if step in report:
            with torch.no_grad():
                tower.eval()
                pred = torch.cat([classifier(tower(test[0][i:i + 256].float() / 255)).argmax(1)
                                  for i in range(0, len(test[0]), 256)])
                tower.train()
            accuracy[step] = float((pred == test[1]).float().mean())
    return {"layout": layout, "accuracy": accuracy, "seconds_per_step": statistics.median(times)}


def main(args) -> dict:
    data, test = pattern_set(args.train, seed=910_001), pattern_set(args.test, seed=910_002)
    report = sorted({s for s in args.report if s <= args.steps} | {args.steps})
    results = {name: train(layout, data, test, steps=args.steps, batch=args.batch, report=report, seed=args.seed)
               for name, layout in LAYOUTS.items()}
    out = {"chance": 1 / len(PATTERNS), "train": len(data[0]), "test": len(test[0]), "steps": args.steps,
           "batch": args.batch, "layouts": results,
           "time_ratio_stem_to_strided": results["stem"]["seconds_per_step"] / results["strided"]["seconds_per_step"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/world-v2/evaluator-tower.json"))
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--report", type=int, nargs="+", default=[200, 400, 800])
    parser.add_argument("--seed", type=int, default=0)
    for name, r in main(parser.parse_args())["layouts"].items():
        print(name, r["accuracy"], f"{r['seconds_per_step']:.3f} s/step")

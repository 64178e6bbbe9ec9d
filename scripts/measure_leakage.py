"""Measure content leakage with MuseumMaker's style distillation on and off (museum/evaluation/leakage.py).

    OMP_NUM_THREADS=1 python scripts/measure_leakage.py --styles sepia thermal crt --grid docs/images --out docs/leakage.json
    OMP_NUM_THREADS=1 python scripts/measure_leakage.py --styles sepia thermal crt --lr 1e-2 --grid docs/images --out docs/leakage-lr0.01.json

For each style: learn it from 5 star images with `museummaker` (defaults; on: style_weight 1, off:
style_weight 0), draw 8 circle prompts x 2 seeds in the style, and let the evaluator read each
image's shape. Prints the markdown table pasted into docs/METHODS.md and writes the JSON.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import diffusers
import torch

from museum.evaluation.leakage import base_reading, content_leakage
from museum.generation.sampling import image_grid
from museum.models.loading import load_evaluator, load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--styles", nargs="+", default=["sepia", "thermal", "crt"])
    parser.add_argument("--steps", type=int, default=None, help="override the method's default steps")
    parser.add_argument("--lr", type=float, default=None,
                        help="override the method's learning rate (the slow test learns at 1e-2); grids get an -lr suffix")
    parser.add_argument("--out", type=Path, default=Path("docs/leakage.json"))
    parser.add_argument("--grid", type=Path, default=None, help="also save the drawn circles as a PNG grid per run")
    args = parser.parse_args()
    diffusers.utils.logging.disable_progress_bar()
    evaluator = load_evaluator()
    results = {"base": base_reading(evaluator, load_pipeline()), "styles": {},
               "machine": f"{platform.platform()}, {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d"),
               "steps": args.steps, "lr": args.lr}
    print("base", {k: v for k, v in results["base"].items() if k != "reads"}, flush=True)
    for style in args.styles:
        rows = {}
        for cond, weight in (("on", 1.0), ("off", 0.0)):
            with tempfile.TemporaryDirectory() as tmp:
                kw = {k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v}
                r = content_leakage(evaluator, Path(tmp) / "museum", style=style, style_weight=weight, **kw)
            if args.grid:
                args.grid.mkdir(parents=True, exist_ok=True)
                image_grid(r["images"], cols=8).save(args.grid / f"leakage-{style}-{cond}{f'-lr{args.lr:g}' if args.lr else ''}.png")
            rows[cond] = {k: v for k, v in r.items() if k != "images"}
            print(style, cond, {k: v for k, v in rows[cond].items() if k != "reads"}, flush=True)
        results["styles"][style] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    b = results["base"]
    print(f"\nbase model, no style: circle {b['circle']:.0%}, star {b['star']:.0%}\n")
    print("| style | read as circle: on / off | read as star: on / off | style alignment: on / off | seconds: on / off |")
    print("|---|---|---|---|---|")
    for style, rows in results["styles"].items():
        on, off = rows["on"], rows["off"]
        print(f"| {style} | {on['circle']:.0%} / {off['circle']:.0%} | {on['star']:.0%} / {off['star']:.0%} | "
              f"{on['style_alignment']:.3f} / {off['style_alignment']:.3f} | {on['seconds']:.0f} / {off['seconds']:.0f} |")


if __name__ == "__main__":
    main()

"""Measure relevant-concept forgetting with LFS-Diffusion's data-free distillation on and off
(museum/evaluation/relevant.py).

    OMP_NUM_THREADS=1 python scripts/measure_lfs.py --out docs/lfs.json --grid docs/images
    OMP_NUM_THREADS=1 python scripts/measure_lfs.py --steps 100 --out docs/lfs-100.json   # the test's setting

Learns the two held-out circle instances (sunburst, then smiley: "a <tok> circle") with `lfs`, distillation on
(distill_weight 3, the default) and off (0, i.e. the plain shared-LoRA fine-tuning with the same token and prompt), then draws
"a red circle on a {bg} background" (6 backgrounds x 4 seeds) with the learned LoRA installed and compares it
with the base model's images of the same prompts and seeds. Prints the markdown table of docs/METHODS.md.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import diffusers
import torch

from museum.evaluation.relevant import CIRCLE_CONCEPTS, base_images, compare_to_base, relevant_forgetting
from museum.generation.sampling import image_grid
from museum.methods.base import parse_setting
from museum.models.loading import load_evaluator, load_pipeline
from museum.world.concepts import build_concept

METRICS = ("text_alignment", "pixel_rmse_to_base", "paired_alignment_to_base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="override lfs's default steps")
    parser.add_argument("--weights", type=float, nargs="+", default=[3.0, 0.0], help="distill_weight values")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other lfs settings, e.g. lr=6e-4")
    parser.add_argument("--out", type=Path, default=Path("docs/lfs.json"))
    parser.add_argument("--grid", type=Path, default=None, help="also save the class-prompt images as PNG grids")
    args = parser.parse_args()
    diffusers.utils.logging.disable_progress_bar()
    evaluator = load_evaluator()
    concepts = [build_concept(n) for n in CIRCLE_CONCEPTS]
    base = base_images(load_pipeline())
    results = {"base": compare_to_base(evaluator, base[2], base[2], base[0]), "runs": {}, "steps": args.steps, "settings": args.set,
               "concepts": list(CIRCLE_CONCEPTS),
               "machine": f"{platform.platform()}, {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d")}
    print("base", results["base"], flush=True)
    kw = dict(parse_setting(a) for a in args.set) | ({"steps": args.steps} if args.steps else {})
    for weight in args.weights:
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            r = relevant_forgetting(evaluator, Path(tmp) / "museum", base, concepts=concepts, distill_weight=weight, **kw)
        if args.grid:
            args.grid.mkdir(parents=True, exist_ok=True)
            image_grid(base[2], cols=12).save(args.grid / "lfs-base.png")
            image_grid(r["images"], cols=12).save(args.grid / f"lfs-distill-{weight:g}.png")
        row = {k: v for k, v in r.items() if k != "images"}
        row["seconds"] = time.time() - start
        results["runs"][f"{weight:g}"] = row
        print("distill_weight", weight, row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    b = results["base"]
    print(f"\nbase model: text alignment {b['text_alignment']:.3f}\n")
    print("| distill_weight | text alignment | pixel RMSE to base | paired alignment to base | "
          + " | ".join(f"{n} image alignment" for n in CIRCLE_CONCEPTS) + " | seconds |")
    print("|---|---|---|---|" + "---|" * len(CIRCLE_CONCEPTS) + "---|")
    for weight, row in results["runs"].items():
        print(f"| {weight} | " + " | ".join(f"{row[k]:.3f}" for k in METRICS) + " | "
              + " | ".join(f"{row['concepts'][n]:.3f}" for n in CIRCLE_CONCEPTS) + f" | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()

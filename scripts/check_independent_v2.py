"""The independent reading on renders alone (no model): does it tell a concept from other looks of its class?

    OMP_NUM_THREADS=1 python scripts/check_independent_v2.py --pool benchmark --out docs/world-v2/independent-check.json

For every concept of the pool, the independent fidelity (museum.evaluation.independent) against its held-out
references of three render sets, all in the evaluation prompts' own scenes (8 quick prompts x 2 renders):

* **upper**: the concept itself (``Concept.prompt_renders``), the upper anchor of gap closed;
* **other looks**: for objects, random looks of the same shape; for styles, the prompts' objects in random
  other styles or none: roughly what a base model drawing the class prompt could produce;
* **training images**: the concept's own training renders (its own scenes, not the prompts').

and the gap closed by the training images between "other looks" and "upper". Nothing is chosen from these
numbers (no defaults, no thresholds); they check the metric, so the benchmark pool may be read.
"""

import argparse
import json
import random
import statistics
from dataclasses import replace
from pathlib import Path

from museum.evaluation.independent import gap_closed, independent_fidelity
from museum.world.v2 import concepts as pools
from museum.world.v2.render import random_look, random_style, render

PER_PROMPT = 2


def other_looks(concept, seed: int = 0) -> list:
    """The prompts' scenes with something other than the concept in them (same shape, or another style)."""
    rng = random.Random(f"{concept.name}:{seed}:other-looks")
    images = []
    for i, scene in enumerate(concept.prompt_scenes[:pools.N_QUICK_PROMPTS]):
        for k in range(PER_PROMPT):
            drawn = concept._scene_for(scene, rng)
            if concept.is_style:
                drawn = replace(drawn, style=random_style(rng) if rng.random() < 0.5 else None)
            else:
                drawn = replace(drawn, look=replace(random_look(rng), shape=concept.class_word))
            images.append(render(drawn, 7_000_000 + PER_PROMPT * i + k))
    return images


def check(name: str) -> dict:
    concept = pools.build_concept(name)
    read = lambda images: independent_fidelity(images, concept.reference_images)["fidelity"]  # noqa: E731
    row = {"kind": concept.kind, "upper": read(concept.prompt_renders(quick=True, per_prompt=PER_PROMPT)),
           "other_looks": read(other_looks(concept)), "training_images": read(concept.train_images)}
    row["training_images_gap_closed"] = gap_closed(row["training_images"], row["other_looks"], row["upper"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", choices=list(pools.POOLS), default="tuning")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = {name: check(name) for name in pools.POOLS[args.pool]}
    print("| concept | kind | upper | other looks | training images | gap closed by training images |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['kind']} | {r['upper']:.3f} | {r['other_looks']:.3f} | {r['training_images']:.3f} | "
              f"{r['training_images_gap_closed']:.2f} |")
    for kind in ("object", "style"):
        gaps = [r["upper"] - r["other_looks"] for r in rows.values() if r["kind"] == kind]
        if gaps:
            print(f"{kind}s: upper - other looks: median {statistics.median(gaps):.3f}, min {min(gaps):.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"pool": args.pool, "per_prompt": PER_PROMPT, "concepts": rows}, indent=1))


if __name__ == "__main__":
    main()

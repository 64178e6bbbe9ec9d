"""Measure ICGen zero-shot on the embedded model (museum/models/icgen.py): held-out concepts the adapter never saw, no
training, only the image-encoder embeddings of the concept's training images as context.

    OMP_NUM_THREADS=1 python scripts/measure_icgen.py --out docs/icgen.json --lfs sunburst smiley

For each concept of ZERO_SHOT_CONCEPTS: image alignment to its 16 held-out reference renders of its class prompts
("a hexagon on a sand background", 8 prompts x 2 seeds), drawn by the base model (no context) and with the shipped
adapter and the concept's context at each ``--scales`` value. With ``--lfs``: each named concept is learned alone
with `lfs` defaults and scored (museum.evaluation.protocol.score_concept) at context scale 0 and each ``--scales``
value. Prints the markdown tables of docs/METHODS.md.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import diffusers
import torch

from museum.evaluation.protocol import score_base, score_concept, zero_shot_alignment
from museum.models import icgen
from museum.models.loading import load_evaluator, load_pipeline
from museum.museum import Museum
from museum.world.concepts import ZERO_SHOT_CONCEPTS, build_concept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--adapter", type=Path, default=None, help="adapter folder (default: the shipped one)")
    parser.add_argument("--lfs", nargs="*", default=[], help="concepts to learn with lfs and score with context")
    parser.add_argument("--learn-with-context", action="store_true", help="learn the --lfs concepts with lfs's "
                        "learn_with_context on")
    parser.add_argument("--out", type=Path, default=Path("docs/icgen.json"))
    args = parser.parse_args()
    diffusers.utils.logging.disable_progress_bar()
    evaluator, pipe = load_evaluator(), load_pipeline()
    concepts = {n: build_concept(n) for n in ZERO_SHOT_CONCEPTS}
    results = {"base": {n: score_base(pipe, c, evaluator).image_alignment for n, c in concepts.items()},
               "icgen": {}, "adapter": str(args.adapter or icgen.EMBEDDED_ICGEN),
               "machine": f"{platform.platform()}, {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d"),
               "learn_with_context": args.learn_with_context}
    icgen.load_adapter(pipe, args.adapter)
    for scale in args.scales:
        results["icgen"][f"{scale:g}"] = {n: zero_shot_alignment(pipe, evaluator, c, scale=scale)
                                          for n, c in concepts.items()}
        print(scale, results["icgen"][f"{scale:g}"], flush=True)
    results["lfs"] = {}
    for name in args.lfs:
        concept = build_concept(name)
        with tempfile.TemporaryDirectory() as tmp:
            m = Museum.init(Path(tmp) / "museum")
            m.learn(name, concept.train_images, method="lfs", class_word=concept.class_word, progress=False,
                    learn_with_context=args.learn_with_context)
            rows = {}
            for scale in [0.0, *args.scales]:
                with icgen.context_scale(scale):
                    rows[f"{scale:g}"] = score_concept(m, name, concept, evaluator).to_dict()
        results["lfs"][name] = rows
        print(name, rows, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("| context | " + " | ".join(concepts) + " |")
    print("|---|" + "---|" * len(concepts))
    print("| none (base model) | " + " | ".join(f"{results['base'][n]:.3f}" for n in concepts) + " |")
    for scale, row in results["icgen"].items():
        print(f"| ICGen, scale {scale} | " + " | ".join(f"{row[n]:.3f}" for n in concepts) + " |")
    if results["lfs"]:
        print("\n| lfs concept | " + " | ".join(f"scale {s}" for s in next(iter(results["lfs"].values()))) + " |")
        print("|---|" + "---|" * (1 + len(args.scales)))
        for name, rows in results["lfs"].items():
            print(f"| {name} | " + " | ".join(f"{r['image_alignment']:.3f} / {r['text_alignment']:.3f}"
                                             for r in rows.values()) + " |")


if __name__ == "__main__":
    main()

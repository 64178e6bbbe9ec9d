"""Continual STYLE benchmark: finetune, ewc, lwf, museummaker and museummaker with each loss ablated.

    OMP_NUM_THREADS=1 python scripts/bench_styles.py --tasks 5 --out bench-styles   # resumable

Every variant learns the first ``--tasks`` styles of ``STYLE_SEQUENCE`` (museum/world/concepts.py)
one after another with its defaults, and after every task draws every style seen so far (8
evaluation prompts x ``--seeds`` seeds) and scores it (``museum.evaluation.benchmark``, METHODS.md
protocol): image alignment to the style's held-out references (CLIP-I), text alignment to the
prompt without the style (CLIP-T). Reported: final average A = mean_j R[T, j] and forgetting
F = mean_{j<T} (max_{t<T} R[t, j] - R[T, j]). Each variant runs in its own folder (``museum bench``
keys overrides by method name), so an interrupted run continues where it stopped. Prints the
markdown table pasted into docs/METHODS.md and writes OUT/styles.json.
"""

import argparse
import json
from pathlib import Path

import diffusers

from museum.evaluation.benchmark import run_benchmark
from museum.world.concepts import STYLE_SEQUENCE

VARIANTS = {  # name -> (method, config overrides); defaults are the config dataclasses'
    "finetune": ("finetune", {}),
    "ewc": ("ewc", {}),
    "lwf": ("lwf", {}),
    "museummaker": ("museummaker", {}),
    "museummaker - style distillation": ("museummaker", {"style_weight": 0.0}),
    "museummaker - weight reg.": ("museummaker", {"weight_reg": 0.0}),
    "museummaker - feature distillation": ("museummaker", {"feature_weight": 0.0}),
    # settings tried on the way to the defaults
    "ewc, lambda 1e5": ("ewc", {"ewc_weight": 1e5}),
    "museummaker, feature weight 1": ("museummaker", {"feature_weight": 1.0}),
    "museummaker, feature weight 1 - style distillation": ("museummaker", {"feature_weight": 1.0, "style_weight": 0.0}),
    "museummaker, feature weight 1 - weight reg.": ("museummaker", {"feature_weight": 1.0, "weight_reg": 0.0}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("bench-styles"))
    args = parser.parse_args()
    diffusers.utils.logging.disable_progress_bar()
    styles = list(STYLE_SEQUENCE[:args.tasks])
    table, base = {}, None
    for i, name in enumerate(args.variants):
        method, overrides = VARIANTS[name]
        folder = args.out / name.replace(" ", "").replace(".", "").replace("-", "_no_").replace(",", "_")
        results = run_benchmark([method], styles, folder, quick=True, n_seeds=args.seeds, base_row=(i == 0),
                                method_overrides={method: overrides}, progress=False, gate_betas=())
        r = results["methods"][method]
        if results.get("base"):
            scores = results["base"]["scores"]
            base = {m: sum(scores[c][m] for c in styles) / len(styles) for m in ("image_alignment", "text_alignment")}
            base["final_image_alignment"] = [scores[c]["image_alignment"] for c in styles]
        table[name] = {"overrides": overrides, "image_alignment": r["summary"]["image_alignment"],
                       "text_alignment": r["summary"]["text_alignment"], "seconds_per_task": r["seconds_per_task"],
                       "R_image_alignment": r["R"]["image_alignment"],
                       "final_image_alignment": r["R"]["image_alignment"][-1]}
        print(name, json.dumps({k: v for k, v in table[name].items() if not k.endswith("image_alignment") or k == "image_alignment"}), flush=True)
    (args.out / "styles.json").write_text(json.dumps({"styles": styles, "base": base, "variants": table}, indent=2))
    print(f"\nstyles in order: {', '.join(styles)}\n")
    print("| variant | image alignment A | forgetting F (image) | text alignment A | forgetting F (text) | s / task |")
    print("|---|---|---|---|---|---|")
    for name, row in table.items():
        ia, ta = row["image_alignment"], row["text_alignment"]
        f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"| {name} | {f(ia['A'])} | {f(ia['F'])} | {f(ta['A'])} | {f(ta['F'])} | "
              f"{row['seconds_per_task'] or 0:.0f} |")
    if base:
        print(f"| base model (no training) | {base['image_alignment']:.3f} | - | {base['text_alignment']:.3f} | - | 0 |")
    print(f"\nfinal image alignment per style\n\n| variant | {' | '.join(styles)} |\n" + "|---" * (len(styles) + 1) + "|")
    rows = {**{n: r["final_image_alignment"] for n, r in table.items()}, **({"base model": base["final_image_alignment"]} if base else {})}
    for name, final in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in final) + " |")


if __name__ == "__main__":
    main()

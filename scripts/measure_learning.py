"""Measure every method on the embedded model: learning time and how much it learns.

    python scripts/measure_learning.py --out docs/learning.json
    python scripts/measure_learning.py --methods perfusion --update   # rerun one method's rows

For each method and concept: learn it alone from an empty museum with the method's default
settings, record the training time (median over concepts), and the evaluator's image and text
alignment of 8 prompts x 2 seeds against the base model drawing the class prompts. Writes the
JSON and prints a markdown table (pasted into docs/METHODS.md with this command beside it).
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import diffusers
import torch

from museum.evaluation.protocol import score_base, score_concept
from museum.methods import method_names
from museum.methods.base import parse_setting
from museum.models.loading import EMBEDDED, EMBEDDED_EVALUATOR, load_evaluator, load_pipeline
from museum.museum import Museum
from museum.world.concepts import build_concept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=method_names())
    parser.add_argument("--concepts", nargs="+", default=["sunburst", "rainbow", "checker", "neon"])
    parser.add_argument("--pipeline", default=EMBEDDED, help="base pipeline folder (default: the embedded model)")
    parser.add_argument("--evaluator", default=EMBEDDED_EVALUATOR, help="evaluator folder (default: the embedded one)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="method config overrides for every method, e.g. lr=2e-4 token_lr=1e-3")
    parser.add_argument("--out", type=Path, default=Path("docs/learning.json"))
    parser.add_argument("--update", action="store_true",
                        help="keep the other methods' rows of an existing --out; replace only --methods' rows")
    parser.add_argument("--table", type=Path, help="only print the table of an earlier run's JSON")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    diffusers.utils.logging.disable_progress_bar()
    evaluator = load_evaluator(args.evaluator)
    pipe = load_pipeline(args.pipeline)
    overrides = dict(parse_setting(kv) for kv in args.set)
    concepts = {n: build_concept(n) for n in args.concepts}
    base = {n: score_base(pipe, c, evaluator).to_dict() for n, c in concepts.items()}
    run = {"machine": f"{platform.platform()}, {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d"),
           "overrides": overrides}
    results = {"base": base, "methods": {}, **run}
    if args.update and args.out.is_file():
        results = json.loads(args.out.read_text())
        if set(results["base"]) != set(base) or results["overrides"] != overrides:
            parser.error(f"--update: {args.out} was measured on other concepts or with another --set; rerun all")
        results.setdefault("updates", []).append(dict(run, methods=args.methods))
    for method in args.methods:
        rows = {}
        for name, concept in concepts.items():
            with tempfile.TemporaryDirectory() as tmp:
                m = Museum.init(Path(tmp) / "museum", base=args.pipeline)
                c = m.learn(name, concept.train_images, method=method, style=concept.is_style,
                            class_word=None if concept.is_style else concept.class_word, progress=False, **overrides)
                score = score_concept(m, name, concept, evaluator).to_dict()
                rows[name] = dict(score, seconds=c.info["train_seconds"], steps=c.info["steps"],
                                  bytes=(c.path / "tensors.safetensors").stat().st_size)
            print(method, name, rows[name], flush=True)
        results["methods"][method] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict) -> str:
    """Markdown: per method the median learning time and each concept's image alignment (base in the header)."""
    base = results["base"]
    names = list(base)
    head = " | ".join(f"{n} image alignment (base {base[n]['image_alignment']:.3f})" for n in names)
    lines = [f"| method | median seconds / concept | steps | {head} | mean text alignment (base "
             f"{statistics.mean(b['text_alignment'] for b in base.values()):.3f}) | bytes / concept |",
             "|---" * (5 + len(names)) + "|"]
    for method, rows in results["methods"].items():
        r = list(rows.values())
        cells = " | ".join(f"{rows[n]['image_alignment']:.3f}" for n in names)
        lines.append(f"| {method} | {statistics.median(x['seconds'] for x in r):.0f} | {r[0]['steps']} | {cells} | "
                     f"{statistics.mean(x['text_alignment'] for x in r):.3f} | "
                     f"{statistics.median(x['bytes'] for x in r):,.0f} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()

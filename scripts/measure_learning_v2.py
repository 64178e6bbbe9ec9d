"""Each concept of a World v2 pool learned alone, per method: gap closed by both readings, and recognition.

    python scripts/measure_learning_v2.py --pool tuning --methods custom-diffusion c-lora --out docs/logs/tuning/v2-defaults.json
    python scripts/measure_learning_v2.py --pool benchmark --out docs/world-v2/learning.json   # never tune on this one

For every concept: the base model draws the class prompts (8 quick prompts x 2 seeds); the upper anchor is the
concept rendered in each prompt's own scene (``Concept.prompt_renders``, what a perfect method would draw). For every method: learn the concept in an empty museum on ``--pipeline`` with the
method's defaults (and ``--set`` overrides), draw the concept prompts with the same seeds, and report
(museum.evaluation.concept_fidelity) the gap closed by the evaluator's image alignment and by the independent
reading, and the evaluator's top-1 recognition among all concepts of the pool. Writes JSON and prints a table.
"""

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from museum.models.loading import load_evaluator, load_pipeline
from museum.evaluation.concept_fidelity import GapClosed, fidelity, recognition, reference_bank
from museum.generation import generate_images
from museum.methods import method_names
from museum.methods.base import parse_setting
from museum.museum import Museum
from museum.world.v2 import concepts as pools

POOLS = {"tuning": pools.TUNING_POOL, "benchmark": pools.BENCHMARK_POOL, "zero-shot": pools.ZERO_SHOT_POOL}
N_PROMPTS, N_SEEDS = 8, 2


def class_images(pipe, concept) -> list:
    prompts = [p for p in concept.class_prompts(quick=True) for _ in range(N_SEEDS)]
    return generate_images(pipe, prompts, seeds=[s for _ in range(N_PROMPTS) for s in range(N_SEEDS)])


def learned_images(folder: Path, pipeline: Path, concept, method: str, overrides: dict) -> tuple[list, dict]:
    m = Museum.init(folder, base=pipeline)
    learned = m.learn(concept.name, concept.train_images, method=method, style=concept.is_style,
                      class_word=None if concept.is_style else concept.class_word, progress=False, **overrides)
    prompts = concept.concept_prompts(m.concept(concept.name).phrase, quick=True)
    info = {"seconds": learned.info["train_seconds"], "steps": learned.info["steps"]}
    return m.generate(prompts, n=N_SEEDS, seed=0), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", choices=list(POOLS), default="tuning")
    parser.add_argument("--concepts", nargs="+", help="a subset of the pool")
    parser.add_argument("--methods", nargs="+", default=["custom-diffusion", "c-lora", "perfusion", "textual-inversion"])
    parser.add_argument("--pipeline", type=Path, default=Path.home() / ".cache/museum/pretrain-v2/pipeline")
    parser.add_argument("--evaluator", type=Path, default=Path.home() / ".cache/museum/pretrain-v2/evaluator")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="method config overrides")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    unknown = set(args.methods) - set(method_names())
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; known: {', '.join(method_names())}")
    names = args.concepts or list(POOLS[args.pool])
    if set(names) - set(POOLS[args.pool]):
        parser.error(f"not in the {args.pool} pool: {sorted(set(names) - set(POOLS[args.pool]))}")
    overrides = dict(parse_setting(kv) for kv in args.set)
    evaluator, pipe = load_evaluator(args.evaluator), load_pipeline(args.pipeline)
    built = {n: pools.build_concept(n) for n in POOLS[args.pool]}
    bank = reference_bank(evaluator, {n: c.reference_images for n, c in built.items()})
    anchors = {n: (fidelity(evaluator, class_images(pipe, built[n]), built[n].reference_images),
                   fidelity(evaluator, built[n].prompt_renders(quick=True, per_prompt=N_SEEDS), built[n].reference_images))
               for n in names}
    results = {"pool": args.pool, "overrides": overrides, "date": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.platform()}, {torch.get_num_threads()} threads", "methods": {}}
    for method in args.methods:
        rows = {}
        for name in names:
            with tempfile.TemporaryDirectory() as tmp:
                images, info = learned_images(Path(tmp) / "museum", args.pipeline, built[name], method, overrides)
            gap = GapClosed(fidelity(evaluator, images, built[name].reference_images), *anchors[name])
            rows[name] = dict(gap.to_dict(), recognition=recognition(evaluator, images, name, bank), **info)
            print(method, name, json.dumps(rows[name]["gap_closed"]), f"recognition {rows[name]['recognition']:.2f}",
                  flush=True)
        results["methods"][method] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: dict) -> str:
    """Markdown: per method and kind (objects, styles), the mean gap closed by both readings (over the concepts
    with a gap to close: "mean (k of n)") and recognition."""
    lines = ["| method | kind | concepts | gap closed, evaluator | gap closed, independent | recognition |",
             "|---|---|---|---|---|---|"]
    for method, rows in results["methods"].items():
        for kind in ("object", "style"):
            r = [v for n, v in rows.items() if pools.spec(n).kind == kind]
            if r:
                lines.append(f"| {method} | {kind} | {len(r)} | {_mean_of_gaps(r, 'evaluator')} | "
                             f"{_mean_of_gaps(r, 'independent')} | {statistics.mean(x['recognition'] for x in r):.2f} |")
    return "\n".join(lines)


def _mean_of_gaps(rows: list[dict], reading: str) -> str:
    """"0.62 (7 of 8)": the mean over the concepts whose gap is wide enough to divide by (the others are NaN)."""
    gaps = [x["gap_closed"][reading] for x in rows if not math.isnan(x["gap_closed"][reading])]
    mean = f"{statistics.mean(gaps):.2f}" if gaps else "-"
    return mean if len(gaps) == len(rows) else f"{mean} ({len(gaps)} of {len(rows)})"


if __name__ == "__main__":
    main()

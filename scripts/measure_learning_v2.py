"""Each concept of a World v2 pool learned alone, per method: gap closed by both readings, and recognition.

    python scripts/measure_learning_v2.py --pool tuning --methods custom-diffusion c-lora --out docs/logs/tuning/v2-defaults.json
    python scripts/measure_learning_v2.py --pool benchmark --out docs/world-v2/learning.json   # never tune on this one
    python scripts/measure_learning_v2.py --pool tuning --methods c-lora --around lr --out docs/logs/tuning/c-lora-lr.json
    python scripts/measure_learning_v2.py --pool tuning --methods c-lora --grid lr=2e-4,4e-4 --seeds 3 --out ...

``--around KEY`` tries each method at half, once and twice its default KEY (the defaults are chosen this way, on the
tuning pool only: docs/logs/tuning/); ``--grid KEY=V1,V2`` tries the values given. The table then has a row per
setting, and the setting with the highest mean gap closed by the evaluator is marked (the independent reading
beside it must agree for a default to change). ``--seeds K`` learns every concept with training seeds 0..K-1 (the
images are drawn with the same generation seeds every time): each figure is then the mean over seeds of the mean over
concepts, with a 95% t-interval over seeds, so two settings whose intervals overlap are not told apart.

For every concept: the base model draws the class prompts (8 quick prompts x 2 seeds); the upper anchor is the
concept rendered in each prompt's own scene (``Concept.prompt_renders``, what a perfect method would draw). For every method: learn the concept in an empty museum on ``--pipeline`` with the
method's defaults (and ``--set`` overrides), draw the concept prompts with the same seeds, and report
(museum.evaluation.concept_fidelity) the gap closed by the evaluator's image alignment and by the independent
reading, the evaluator's top-1 recognition among all concepts of the pool, its text alignment (CLIP-T: each image
against the class prompt it was drawn for, with the concept's words left out; the base model's beside it) and the
bytes of the concept's own file. Writes JSON and prints a table.
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
from museum.evaluation.benchmark.v2.results import interval
from museum.evaluation.concept_fidelity import GapClosed, fidelity, recognition, reference_bank
from museum.evaluation.metrics import text_alignment
from museum.generation import generate_images
from museum.methods import method_names
from museum.methods.base import get_method, parse_setting
from museum.museum import Museum
from museum.world.v2 import concepts as pools

N_PROMPTS, N_SEEDS = 8, 2


def class_prompts(concept) -> list[str]:
    """The quick class prompts, each once per generation seed: what each drawn image is read against."""
    return [p for p in concept.class_prompts(quick=True) for _ in range(N_SEEDS)]


def class_images(pipe, concept) -> list:
    return generate_images(pipe, class_prompts(concept), seeds=[s for _ in range(N_PROMPTS) for s in range(N_SEEDS)])


def learned_images(folder: Path, pipeline: Path, concept, method: str, overrides: dict, seed: int) -> tuple[list, dict]:
    m = Museum.init(folder, base=pipeline)
    learned = m.learn(concept.name, concept.train_images, method=method, style=concept.is_style, seed=seed,
                      class_word=None if concept.is_style else concept.class_word, progress=False, **overrides)
    prompts = concept.concept_prompts(m.concept(concept.name).phrase, quick=True)
    info = {"seconds": learned.info["train_seconds"], "steps": learned.info["steps"],
            "bytes": (learned.path / "tensors.safetensors").stat().st_size}
    return m.generate(prompts, n=N_SEEDS, seed=0), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", choices=list(pools.POOLS), default="tuning")
    parser.add_argument("--concepts", nargs="+", help="a subset of the pool")
    parser.add_argument("--methods", nargs="+", default=["custom-diffusion", "c-lora", "perfusion", "textual-inversion"])
    parser.add_argument("--pipeline", type=Path, default=Path.home() / ".cache/museum/pretrain-v2/pipeline")
    parser.add_argument("--evaluator", type=Path, default=Path.home() / ".cache/museum/pretrain-v2/evaluator")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="method config overrides")
    tune = parser.add_mutually_exclusive_group()
    tune.add_argument("--around", metavar="KEY", help="try each method at 0.5x, 1x and 2x its default KEY (tuning pool)")
    tune.add_argument("--grid", metavar="KEY=V1,V2", help="try these values of KEY (tuning pool)")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per concept (0..K-1)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    unknown = set(args.methods) - set(method_names())
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; known: {', '.join(method_names())}")
    pool = pools.POOLS[args.pool]
    names = args.concepts or list(pool)
    outside = set(names) - set(pool)
    if outside:
        parser.error(f"not in the {args.pool} pool: {sorted(outside)}")
    overrides = dict(parse_setting(kv) for kv in args.set)
    if (args.around or args.grid) and args.pool != "tuning":
        parser.error("defaults are chosen on the tuning pool only: --around and --grid need --pool tuning")
    evaluator, pipe = load_evaluator(args.evaluator), load_pipeline(args.pipeline)
    built = {n: pools.build_concept(n) for n in pool}
    bank = reference_bank(evaluator, {n: c.reference_images for n, c in built.items()})
    base_images = {n: class_images(pipe, built[n]) for n in names}
    anchors = {n: (fidelity(evaluator, base_images[n], built[n].reference_images),
                   fidelity(evaluator, built[n].prompt_renders(quick=True, per_prompt=N_SEEDS), built[n].reference_images))
               for n in names}
    results = {"pool": args.pool, "overrides": overrides, "seeds": args.seeds, "date": time.strftime("%Y-%m-%d"),
               "base_text_alignment": {n: text_alignment(evaluator, base_images[n], class_prompts(built[n])) for n in names},
               "machine": f"{platform.platform()}, {torch.get_num_threads()} threads", "methods": {}}
    for method in args.methods:
        for setting in settings_to_try(method, args):
            rows = {name: [] for name in names}
            for seed in range(args.seeds):
                for name in names:
                    with tempfile.TemporaryDirectory() as tmp:
                        images, info = learned_images(Path(tmp) / "museum", args.pipeline, built[name], method,
                                                      dict(overrides, **setting), seed)
                    gap = GapClosed(fidelity(evaluator, images, built[name].reference_images), *anchors[name])
                    rows[name].append(dict(gap.to_dict(), recognition=recognition(evaluator, images, name, bank),
                                           text_alignment=text_alignment(evaluator, images, class_prompts(built[name])),
                                           seed=seed, **info))
                    print(method, setting, f"seed {seed}", name, json.dumps(rows[name][-1]["gap_closed"]),
                          f"recognition {rows[name][-1]['recognition']:.2f}", flush=True)
            results["methods"][run_name(method, setting)] = rows
            results.setdefault("settings", {})[run_name(method, setting)] = {"method": method, **overrides, **setting}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


def settings_to_try(method: str, args) -> list[dict]:
    """The overrides to learn with, one run each: ``{}`` (the defaults and ``--set``) unless ``--around`` or ``--grid``."""
    if args.around:
        default = getattr(get_method(method).config, args.around)
        return [{args.around: type(default)(default * f)} for f in (0.5, 1.0, 2.0)]
    if args.grid:
        key, values = parse_setting(args.grid)
        return [{key: parse_setting(f"{key}={v}")[1]} for v in str(values).split(",")]
    return [{}]


def run_name(method: str, setting: dict) -> str:
    """"c-lora" or "c-lora lr=0.0004"."""
    return " ".join([method, *(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())])


def table(results: dict) -> str:
    """Markdown: per run and kind (objects, styles), the mean gap closed by both readings (over the concepts with a
    gap to close: "mean (k of n)"; with several seeds "mean [low, high]" over seeds) and recognition."""
    lines = ["| method | kind | concepts | gap closed, evaluator | gap closed, independent | recognition | "
             "text alignment (base) | bytes / concept |", "|---|---|---|---|---|---|---|---|"]
    best = best_runs(results)
    for run, rows in results["methods"].items():
        for kind in ("object", "style"):
            r = {n: seeds for n, seeds in rows.items() if pools.spec(n).kind == kind}
            if r:
                lines.append(f"| {run}{' (best)' if run in best else ''} | {kind} | {len(r)} | "
                             f"{_mean_of_gaps(r, 'evaluator')} | {_mean_of_gaps(r, 'independent')} | "
                             f"{_shown(interval(_per_seed(r, lambda x: x['recognition'])))} | "
                             f"{_shown(interval(_per_seed(r, lambda x: x['text_alignment'])))} "
                             f"({statistics.mean(results['base_text_alignment'][n] for n in r):.2f}) | "
                             f"{statistics.median(x['bytes'] for seeds in r.values() for x in seeds):,.0f} |")
    return "\n".join(lines)


def best_runs(results: dict) -> set[str]:
    """Per method tried in several settings, the run with the highest mean gap closed by the evaluator."""
    by_method: dict[str, list[str]] = {}
    for run, setting in results.get("settings", {}).items():
        by_method.setdefault(setting["method"], []).append(run)

    def score(run: str) -> float:
        mean = interval(_per_seed(results["methods"][run], lambda x: x["gap_closed"]["evaluator"]))
        return -math.inf if mean is None else mean["mean"]
    return {max(runs, key=score) for runs in by_method.values() if len(runs) > 1}


def _per_seed(rows: dict[str, list[dict]], read) -> list[float]:
    """Per training seed, the mean of ``read(row)`` over the concepts where it is a number (NaN gaps left out)."""
    n_seeds = len(next(iter(rows.values())))
    means = []
    for seed in range(n_seeds):
        values = [read(seeds[seed]) for seeds in rows.values()]
        values = [v for v in values if not math.isnan(v)]
        means.append(statistics.mean(values) if values else math.nan)
    return means


def _shown(summary: dict | None) -> str:
    if summary is None:
        return "-"
    if summary["low"] is None:
        return f"{summary['mean']:.2f}"
    return f"{summary['mean']:.2f} [{summary['low']:.2f}, {summary['high']:.2f}]"


def _mean_of_gaps(rows: dict[str, list[dict]], reading: str) -> str:
    """"0.62 (7 of 8)": the mean over the concepts whose gap is wide enough to divide by (the others are NaN), and
    over seeds; with several seeds its 95% interval over seeds."""
    shown = _shown(interval(_per_seed(rows, lambda x: x["gap_closed"][reading])))
    wide = sum(not math.isnan(seeds[0]["gap_closed"][reading]) for seeds in rows.values())
    return shown if wide == len(rows) else f"{shown} ({wide} of {len(rows)})"


if __name__ == "__main__":
    main()

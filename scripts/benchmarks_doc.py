"""Write docs/BENCHMARKS.md from a `museum bench` output folder: the results table, the curves over
tasks, each method's R[t, j] heatmaps, the command that produced the folder and the machine.

    museum bench --methods finetune,c-lora --tasks 5 --quick --out museum-bench
    python scripts/benchmarks_doc.py museum-bench --command "museum bench --methods finetune,c-lora --tasks 5 --quick --out museum-bench"
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import time
from pathlib import Path

import torch

from museum.evaluation.benchmark.results import read_results
from museum.report.benchmark_report import (
    RESULTS_HEADER,
    curves_plot,
    heatmaps,
    results_rows,
)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
                      *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench_dir", type=Path)
    parser.add_argument("--command", required=True, help="the `museum bench` command that filled bench_dir")
    parser.add_argument("--out", type=Path, default=Path("docs/BENCHMARKS.md"))
    parser.add_argument("--notes", type=Path, help="a markdown file appended as the reading of the numbers")
    parser.add_argument("--prefix", default="bench", help="file-name prefix of the plots in docs/images/")
    parser.add_argument("--title", default="Continual benchmark")
    args = parser.parse_args()
    results = read_results(args.bench_dir)
    words = shlex.split(args.command)
    notes = ["--notes", str(args.notes)] if args.notes else []
    for option, default in (("--out", "docs/BENCHMARKS.md"), ("--prefix", "bench"), ("--title", "Continual benchmark")):
        value = str(getattr(args, option[2:]))
        if value != default:
            notes += [option, shlex.quote(value)]
    shown_dir = words[words.index("--out") + 1] if "--out" in words[:-1] else str(args.bench_dir)
    images = args.out.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    curves_plot(results).save(images / f"{args.prefix}_curves.png")
    parts = []
    for method, r in results["methods"].items():
        if r["grids"]:
            heatmaps(r, results, method).save(images / f"{args.prefix}_heatmaps_{method}.png")
            parts.append(f"### {method}\n\n![{method} R[t, j]](images/{args.prefix}_heatmaps_{method}.png)\n")
    s = results.get("settings") or {}
    per_concept = []
    for method, r in results["methods"].items():
        final = r["R"]["image_alignment"][-1]
        per_concept.append([method, *(f"{v:.3f}" if v is not None else "–" for v in final)])
    base = results.get("base")
    if base:
        per_concept.append(["base model", *(f"{base['scores'][c]['image_alignment']:.3f}" for c in results["concepts"])])
    text = f"""# {args.title}

The protocol of docs/METHODS.md and issue "Benchmark": each method learns the task sequence
{', '.join(results['concepts'])} one concept after another from an empty museum on the embedded
model, with the same seeds; after every task each seen concept is drawn with {s.get('n_prompts')} prompts x
{s.get('n_seeds')} seeds ({s.get('gen_steps')} DDIM steps) and scored by the evaluator. A: final average
image alignment over all concepts; F: forgetting (mean drop of each earlier concept from its best
to its final score, lower is better); BWT: backward transfer; CLIP-T, KID (lower is better) and
recognition accuracy are final averages. The full HTML report (samples, every heatmap) is written
by `museum report DIR`.

    {args.command}
    python {' '.join(['scripts/benchmarks_doc.py', shown_dir, '--command', shlex.quote(args.command), *notes])}

Run on {time.strftime('%Y-%m-%d', time.gmtime())}, `{platform.platform()}`, {os.cpu_count()} CPU cores, torch
{torch.__version__}. Seconds are wall time on a machine other jobs may share: compare them as ratios only.

## Results

{markdown_table(RESULTS_HEADER, results_rows(results))}

Final image alignment per concept (after the last task):

{markdown_table(['method', *results['concepts']], per_concept)}

## Over the tasks

![average and forgetting](images/{args.prefix}_curves.png)

## R[t, j] per method

{chr(10).join(parts)}
"""
    if args.notes:
        text += "\n" + args.notes.read_text()
    args.out.write_text(text)
    print(f"wrote {args.out} and {images}/{args.prefix}_*.png")


if __name__ == "__main__":
    main()

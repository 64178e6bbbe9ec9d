"""The report of a World v2 benchmark (``results.json`` version 2; ``museum report DIR``): one self-contained page.

What it shows: the results table (every figure as the mean over training seeds and its 95% interval; each
method beside its upper bound and the base model); the summary bars and the curves over tasks with the
intervals as error bars; the per-concept matrix of final gap closed (both readings); the base vocabulary's
prompt following over the tasks and per attribute; the side-by-side table; per method its mean R[t, j] and a
sample table (each concept drawn by the base model, rendered, after its own task, after the last task and
learned alone, for an independent method the same as after its own task); the CPU seconds each unit took.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

# RESULTS_VERSION is read here by report/benchmark_report.py to tell a World v2 run's results from the first world's
from museum.evaluation.benchmark.v2.results import RESULTS_VERSION, UPPER_OWN_TASK, read_results  # noqa: F401
from museum.report.figures import fmt, fmt_int, grid_cells, heatmap, heatmap_axes, render_figure
from museum.report.html import Raw, img_tag, table, write_page

REPORT = "report.html"
GAP_LABELS = {"gap_evaluator": "gap closed (evaluator)", "gap_independent": "gap closed (independent)"}
FIDELITY_HEADER = ["method", "A, evaluator", "F, evaluator", "own, evaluator", "A / alone, evaluator",
                   "A, independent", "F, independent", "own, independent", "A / alone, independent"]
BEYOND_HEADER = ["method", "CLIP-T", "recognition", "generality drop (points)", "side by side: placed",
                 "side by side: gap closed (evaluator)", "side by side: gap closed (independent)", "bytes/concept",
                 "CPU s/task"]
SAMPLE_WIDTH = 160  # pixels a sample cell is shown at (4 images of 64 px, 2 x 2)
SAMPLE_COLUMNS = ["concept", "class prompt (base model)", "rendered (what a perfect method draws)",
                  "after its own task", "after the last task", "learned alone (upper bound)"]


def fmt_ci(iv: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    """"0.512 ± 0.031" (the 95% interval's half-width), the mean alone with one seed, "–" without a value."""
    if not iv:
        return "–"
    mean = iv["mean"] * scale
    if iv["low"] is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(iv['high'] - iv['low']) * scale / 2:.{digits}f}"


def _mean(iv: dict | None) -> float:
    return np.nan if not iv else iv["mean"]


def _err(iv: dict | None) -> float:
    return 0.0 if not iv or iv["low"] is None else (iv["high"] - iv["low"]) / 2


def _ratio(a: dict | None, b: dict | None) -> str:
    return "–" if not a or not b or not b["mean"] else f"{a['mean'] / b['mean']:.2f}"


# --------------------------------------------------------------------------- tables


def fidelity_rows(results: dict) -> list[list[str]]:
    """Both gap-closed readings: one row per method, then each method alone, then the base model."""
    rows = []
    for method, r in results["methods"].items():
        s, upper = r["summary"], ((r["upper_bound"] or {}).get("summary") or {})
        rows.append([method if r["complete"] else f"{method} (incomplete)",
                     *(cell for g in GAP_LABELS for cell in (*(fmt_ci(s[g][k]) for k in ("A", "F", "own")),
                                                             _ratio(s[g]["A"], upper.get(g))))])
    for label, method, o in oracles(results):
        upper = (results["methods"][method]["upper_bound"] or {}).get("summary") or {}
        rows.append([label, *(cell for g in GAP_LABELS for cell in (fmt_ci(o["summary"][g]), "–", "–",
                                                                    _ratio(o["summary"][g], upper.get(g))))])
    if results.get("base"):
        rows.append(["base model (class prompt)", *(cell for _ in GAP_LABELS for cell in ("0", "–", "–", "–"))])
    return rows


def beyond_rows(results: dict) -> list[list[str]]:
    """Everything else: CLIP-T, recognition, generality, side by side, storage and time."""
    rows = []
    for method, r in results["methods"].items():
        s, c = r["summary"], r["composition"] or {}
        rows.append([method, fmt_ci(s["text_alignment"]["A"]), fmt_ci(s["recognition"]["A"], 2),
                     fmt_ci(r["generality"]["drop"], 1, 100.0), fmt_ci(c.get("placed"), 2),
                     fmt_ci(c.get("gap_evaluator")), fmt_ci(c.get("gap_independent")), fmt_int(r["bytes_per_concept"]),
                     fmt(_per_task_cpu(r, len(results["concepts"])), 1)])
    for label, _, o in oracles(results):
        u, g, c = o["summary"], o.get("generality") or {}, o.get("composition") or {}
        rows.append([label, fmt_ci(u["text_alignment"]), fmt_ci(u["recognition"], 2), fmt_ci(g.get("drop"), 1, 100.0),
                     fmt_ci(c.get("placed"), 2), fmt_ci(c.get("gap_evaluator")), fmt_ci(c.get("gap_independent")),
                     fmt_int(o["bytes_per_concept"]), "–"])
    base = results.get("base")
    if base:
        m = base["mean"]["class_prompt"]
        rows.append(["base model (class prompt)", fmt(m["text_alignment"]), fmt(m["recognition"], 2), "0", "–", "0",
                     "0", "0", "–"])
    return rows


def oracles(results: dict) -> list[tuple[str, str, dict]]:
    """(row label, method, results) of every method's upper bound ("alone: m") and joint oracle ("joint: m")."""
    return [(f"{kind}: {m}", m, r[key]) for kind, key in (("alone", "upper_bound"), ("joint", "joint"))
            for m, r in results["methods"].items() if r.get(key)]


def own_task_uppers(results: dict) -> list[str]:
    """The methods whose upper bound is their sequence's own-task readings (``Method.independent``)."""
    return [m for m, r in results["methods"].items() if (r["upper_bound"] or {}).get("source") == UPPER_OWN_TASK]


def _per_task_cpu(r: dict, tasks: int) -> float | None:
    """CPU seconds a method's sequence took per task (learning and reading), averaged over seeds."""
    return r["cpu_seconds"]["mean"] / tasks if r.get("cpu_seconds") else None


def concept_rows(results: dict, reading: str) -> list[list[str]]:
    """The per-concept matrix as a table: final value per method and per method alone, mean ± interval."""
    concepts = results["concepts"]
    rows = [[m, *(fmt_ci(r["final"][reading].get(c)) for c in concepts)] for m, r in results["methods"].items()]
    return rows + [[label, *(fmt_ci(o["final"][reading].get(c)) for c in concepts)] for label, _, o in oracles(results)]


def generality_rows(results: dict) -> list[list[str]]:
    """Prompt following per attribute (percent), the base model's and after the last task per method."""
    base = (results.get("base") or {}).get("generality")
    attributes = list(next(iter(results["methods"].values()))["generality"]["attributes"]) if results["methods"] else []
    rows = [["base model (before the first task)", *(fmt(100 * base[a], 1) for a in attributes),
             fmt(100 * base["mean"], 1), "–"]] if base else []
    for m, r in results["methods"].items():
        g = r["generality"]
        final = g["mean"][-1] if g["mean"] else None
        rows.append([f"{m} (after the last task)", *(fmt_ci(g["attributes"][a]["after"], 1, 100.0) for a in attributes),
                     fmt_ci(final, 1, 100.0), fmt_ci(g["drop"], 1, 100.0)])
    return rows


def composition_rows(results: dict) -> list[list[str]]:
    rows = []
    for m, r in results["methods"].items():
        for key, p in ((r["composition"] or {}).get("pairs") or {}).items():
            (a, ha), (b, hb) = p["halves"].items()
            anchors = p.get("anchors") or {}
            rows.append([m, f"{a} (left) + {b} (right), {p['background']}", fmt_ci(p["placed"], 2),
                         fmt(anchors.get("class_words"), 2), fmt(anchors.get("renders"), 2),
                         fmt_ci(ha["gap_evaluator"]), fmt_ci(hb["gap_evaluator"]), fmt_ci(ha["gap_independent"]),
                         fmt_ci(hb["gap_independent"])])
    return rows


def time_rows(results: dict) -> list[list[str]]:
    rows = [[m, fmt_ci(r["cpu_seconds"], 0), fmt_ci(r["learn_cpu_seconds"], 1),
             "0 (own-task readings)" if m in own_task_uppers(results) else
             fmt_ci((r["upper_bound"] or {}).get("cpu_seconds"), 0)] for m, r in results["methods"].items()]
    base = results.get("base")
    return rows + ([["base row (anchors, generality, pairs)", fmt(base["cpu_seconds"], 0), "–", "–"]] if base else [])


# --------------------------------------------------------------------------- figures


def summary_bars(results: dict) -> Image.Image:
    """A (beside each concept alone) and F per method for both gap-closed readings, 95% intervals as error bars."""
    methods = list(results["methods"])
    x = np.arange(len(methods))
    fig = Figure(figsize=(max(8.0, 2.4 * len(methods)), 6.4))
    for row, reading in enumerate(GAP_LABELS):
        ax_a, ax_f = fig.add_subplot(2, 2, 2 * row + 1), fig.add_subplot(2, 2, 2 * row + 2)
        a = [results["methods"][m]["summary"][reading]["A"] for m in methods]
        u = [((results["methods"][m]["upper_bound"] or {}).get("summary") or {}).get(reading) for m in methods]
        f = [results["methods"][m]["summary"][reading]["F"] for m in methods]
        ax_a.bar(x - 0.2, [_mean(v) for v in a], 0.4, yerr=[_err(v) for v in a], capsize=3, label="continual")
        ax_a.bar(x + 0.2, [_mean(v) for v in u], 0.4, yerr=[_err(v) for v in u], capsize=3, label="each alone")
        ax_f.bar(x, [_mean(v) for v in f], 0.5, yerr=[_err(v) for v in f], capsize=3, color="tab:red")
        for ax, title in ((ax_a, f"A: final average {GAP_LABELS[reading]}"), (ax_f, f"F: forgetting, {reading[4:]}")):
            ax.set_xticks(x, methods, rotation=20, ha="right", fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.grid(axis="y", alpha=0.3)
        ax_a.legend(fontsize=8)
    fig.tight_layout()
    return render_figure(fig)


def curves_plot(results: dict) -> Image.Image:
    """The average over the concepts seen and the forgetting over the tasks, both readings, error bars."""
    fig = Figure(figsize=(11, 6.4))
    for row, reading in enumerate(GAP_LABELS):
        axes = fig.add_subplot(2, 2, 2 * row + 1), fig.add_subplot(2, 2, 2 * row + 2)
        for method, r in results["methods"].items():
            c = r["curves"][reading]
            for ax, kind in zip(axes, ("average", "forgetting")):
                ax.errorbar(c["tasks"], [_mean(v) for v in c[kind]], yerr=[_err(v) for v in c[kind]], marker="o",
                            capsize=3, label=method)
        for ax, kind in zip(axes, ("average over the concepts seen", "forgetting")):
            ax.set_xlabel("tasks learned")
            ax.set_title(f"{kind}, {GAP_LABELS[reading]}", fontsize=9)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    return render_figure(fig)


def concept_matrix(results: dict, reading: str) -> Image.Image:
    """Final value per concept (columns) for every method and every method alone (rows), means over seeds."""
    concepts = results["concepts"]
    finals = [(m, r["final"]) for m, r in results["methods"].items()] + [(label, o["final"])
                                                                       for label, _, o in oracles(results)]
    rows = [[_mean(final[reading].get(c)) for c in concepts] for _, final in finals]
    return heatmap(rows, concepts, f"{GAP_LABELS.get(reading, reading)} after the last task",
                   rows=[label for label, _ in finals])


def generality_plot(results: dict) -> Image.Image:
    """Prompt following of the held-out prompts over the tasks (task 0: the base model), error bars."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    for method, r in results["methods"].items():
        g = r["generality"]
        ax.errorbar(g["tasks"], [100 * _mean(v) for v in g["mean"]], yerr=[100 * _err(v) for v in g["mean"]],
                    marker="o", capsize=3, label=method)
    ax.set_xlabel("tasks learned (0: the base model)")
    ax.set_ylabel("prompt following (%)")
    ax.set_title("retained generality: attributes read as the prompt says", fontsize=9)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return render_figure(fig)


def method_heatmaps(r: dict, concepts: list[str], method: str) -> Image.Image:
    """A method's mean R[t, j] over seeds, both gap-closed readings."""
    T = len(concepts)
    fig = Figure(figsize=(2 * (2.2 + 0.55 * T), 1.6 + 0.5 * T))
    for k, reading in enumerate(GAP_LABELS):
        heatmap_axes(fig, fig.add_subplot(1, 2, k + 1), r["R_mean"][reading], concepts,
                     f"{method}: {GAP_LABELS[reading]} R[t, j]")
    fig.tight_layout()
    return render_figure(fig)


# --------------------------------------------------------------------------- samples


def _cell(path: Path, n_rows: int, row: int, alt: str):
    cells = grid_cells(path, n_rows)
    return Raw(img_tag(cells[row], width=SAMPLE_WIDTH, alt=alt)) if cells and row < len(cells) else ""


def samples_rows(out_dir: Path, results: dict, method: str) -> list[list]:
    """Per concept: the base model's class prompt, the renders, the first seed's museum after the concept's own task
    and after the last, and the concept learned alone."""
    r, base = results["methods"][method], results.get("base") or {}
    grids, last = r["grids"], r["grids"][-1] if r["grids"] else None
    upper = (r["upper_bound"] or {}).get("grids") or {}
    own_task = method in own_task_uppers(results)
    rows = []
    for t, c in enumerate(results["concepts"]):
        row = [c]
        for k in (0, 1):  # the base grid: class prompt, then renders
            row.append(_cell(out_dir / base["grids"][c], 2, k, f"{('base model', 'rendered')[k]}: {c}")
                       if c in base.get("grids", {}) else "")
        for grid, when in ((grids[t] if t < len(grids) else None, "own task"), (last, "last task")):
            row.append(_cell(out_dir / grid["grid"], len(grid["concepts"]), grid["concepts"].index(c),
                             f"{method} after {when}: {c}") if grid and c in grid["concepts"] else "")
        row.append("the same as after its own task" if own_task else
                   _cell(out_dir / upper[c], 1, 0, f"{method} alone: {c}") if c in upper else "")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the page


def introduction(results: dict) -> list[str]:
    s, seeds, concepts = results.get("settings") or {}, results["seeds"], results["concepts"]
    base, independent = results.get("base") or {}, own_task_uppers(results)
    excluded = "; ".join(f"{GAP_LABELS[g]}: {', '.join(cs)}" for g, cs in (base.get("excluded") or {}).items() if cs)
    intervals = (f"Every figure is the mean over {seeds} training seeds and its 95% interval (Student's t), "
                 "shown as ± and as error bars." if seeds > 1 else
                 "One training seed: figures have no interval (run with --seeds 3 or more for 95% intervals).")
    return [
        f"<p>World v2. {len(results['methods'])} method(s), {len(concepts)} task(s): "
        f"{html.escape(', '.join(concepts))}. Each concept is drawn with {s.get('n_prompts')} prompt(s) x "
        f"{s.get('n_seeds')} image(s), {s.get('gen_steps')} denoising steps; every seen concept is read after every "
        f"{s.get('score_every')} task(s) and after the last; base model <code>{html.escape(str(s.get('base')))}"
        f"</code>. {intervals}</p>",
        "<p>Gap closed: 0 is the base model drawing the class prompt, 1 the concept rendered in each prompt's own "
        "scene; read by the evaluator's image alignment and independently (colour and patches, no learned model). "
        "A: average after the last task; F: forgetting (each earlier concept's drop from its best to its final "
        "value); own: each concept right after its own task; A / alone: A over the average of each concept learned "
        "alone from the base model (alone: m)"
        + (f"; for {html.escape(', '.join(independent))}, whose concepts are independent of one another, that is "
           "their own-task readings (the same bit for bit, so nothing was learned twice)" if independent else "")
        + ". Joint: m: every concept learned at once, in one run (the methods that can). Generality drop: the base "
        "model's prompt following (held-out prompts, every concept's effect installed) minus the method's after the "
        "last task, in percentage points."
        + (f" Left out of gap closed (anchors under 0.02 apart): {html.escape(excluded)}." if excluded else "")
        + "</p>",
    ]


def write_report(out_dir: str | Path) -> Path:
    """Write ``out_dir/report.html`` from a version-2 ``out_dir/results.json`` and return its path."""
    out_dir = Path(out_dir)
    results = read_results(out_dir)
    concepts = results["concepts"]
    body = [*introduction(results), "<h2>Results</h2>", table(FIDELITY_HEADER, fidelity_rows(results), "results"),
            table(BEYOND_HEADER, beyond_rows(results), "beyond")]
    if results["methods"]:
        body += [img_tag(summary_bars(results), alt="summary with intervals"),
                 "<h2>Over the tasks</h2>", img_tag(curves_plot(results), alt="average and forgetting over tasks"),
                 "<h2>Per concept</h2>"]
        for reading in GAP_LABELS:
            body += [img_tag(concept_matrix(results, reading), alt=f"per-concept matrix, {reading}"),
                     table(["method", *concepts], concept_rows(results, reading), f"concepts-{reading}")]
        g = generality_rows(results)
        attributes = list(next(iter(results["methods"].values()))["generality"]["attributes"])
        body += ["<h2>Retained generality</h2>", img_tag(generality_plot(results), alt="generality over tasks"),
                 table(["", *attributes, "mean", "drop (points)"], g, "generality"),
                 "<h2>Two concepts side by side</h2>",
                 "<p>Placed: the share of images with each concept's main colour in its own half (base model with the "
                 "class words, and renders, for reference); gap closed of each concept in its half (0: the base model's "
                 "class words, 1: the renders).</p>",
                 table(["method", "pair", "placed", "placed, base model", "placed, renders", "left: gap (evaluator)",
                        "right: gap (evaluator)", "left: gap (independent)", "right: gap (independent)"],
                       composition_rows(results), "composition")]
    for method, r in results["methods"].items():
        body += [f"<h2 id='method-{html.escape(method)}'>{html.escape(method)}</h2>",
                 img_tag(method_heatmaps(r, concepts, method), alt=f"{method} heatmaps"),
                 "<p>Samples (the first training seed; the first prompt's first images):</p>",
                 table(SAMPLE_COLUMNS, samples_rows(out_dir, results, method), f"samples-{method}", "samples")]
    body += ["<h2>Time</h2>", "<p>CPU seconds (all threads of the process that ran the unit).</p>",
             table(["unit", "CPU s, sequence (per seed)", "CPU s, learning one concept", "CPU s, upper bound (per seed)"],
                   time_rows(results), "times")]
    return write_page(out_dir / REPORT, "Museum continual benchmark (World v2)", body)

"""The benchmark report: one self-contained HTML page from ``results.json`` (``museum report DIR``).

What it shows: the results table (every method, the base model, the upper bounds); average
image alignment and forgetting over the tasks for all methods; per method the R[t, j]
heatmaps of every metric, its final scores per concept, a table of samples (rows: the base
model, after each task, each concept learned alone; columns: the concepts) and, for a gated
method (Perfusion), the gate curve.

Figures are drawn with matplotlib into PNG bytes in memory and embedded as base64, like the
sample grids, so the page can be mailed or opened offline.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from museum.evaluation.benchmark.results import read_results
from museum.evaluation.benchmark.units import RESULTS, read_json
from museum.report.figures import fmt, fmt_int, grid_cells, heatmap_axes, nan_list, render_figure
from museum.report.html import Raw, img_tag, table, write_page
from museum.report.v2 import benchmark_report as world_v2

REPORT = "report.html"
LABELS = {"image_alignment": "image alignment (CLIP-I)", "text_alignment": "text alignment (CLIP-T)",
          "kid": "KID", "recognition": "recognition accuracy"}
SHORT = {"image_alignment": "CLIP-I", "text_alignment": "CLIP-T", "kid": "KID", "recognition": "recognition"}
RESULTS_HEADER = ["method", "A (CLIP-I)", "F", "BWT", "CLIP-T", "KID", "recognition", "bytes/concept", "seconds/task"]
GATE_HEADER = ["gate bias beta", "CLIP-I", "CLIP-T", "KID", "recognition", "note"]


def _digits(metric: str) -> int:
    return 4 if metric == "kid" else 3


def heatmaps(r: dict, results: dict, method: str) -> Image.Image:
    """Every metric's R[t, j] of one method, two heatmaps a row."""
    metrics = results["metrics"]
    T = len(r["R"][metrics[0]])
    cols = 2
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(cols * (2.2 + 0.55 * T), rows * (1.6 + 0.5 * T)))
    for k, metric in enumerate(metrics):
        hib = results["higher_is_better"][metric]
        title = f"{method}: {LABELS[metric]} R[t, j]" + ("" if hib else " (lower is better)")
        heatmap_axes(fig, fig.add_subplot(rows, cols, k + 1), r["R"][metric], r["concepts"], title, hib)
    fig.tight_layout()
    return render_figure(fig)


def curves_plot(results: dict, metric: str = "image_alignment") -> Image.Image:
    """Average alignment over the seen concepts and forgetting after every task, all methods."""
    fig = Figure(figsize=(10, 3.6))
    ax_a, ax_f = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for method, r in results["methods"].items():
        c = r["curves"][metric]
        x = np.arange(1, len(c["average"]) + 1)
        ax_a.plot(x, nan_list(c["average"]), marker="o", label=method)
        ax_f.plot(x, nan_list(c["forgetting"]), marker="o", label=method)
    base = results.get("base")
    if base:  # the untrained model's average over the same concepts seen so far
        vals = np.array(nan_list(base["scores"].get(c, {}).get(metric) for c in results["concepts"]), dtype=float)
        avg = [float(np.nanmean(vals[:t + 1])) if np.isfinite(vals[:t + 1]).any() else np.nan
               for t in range(len(vals))]
        ax_a.plot(np.arange(1, len(avg) + 1), avg, color="grey", linestyle="--", label="base model")
    for ax, title in ((ax_a, f"average {LABELS[metric]} over the concepts seen"),
                      (ax_f, f"forgetting of {LABELS[metric]}")):
        ax.set_xlabel("tasks learned")
        ax.set_title(title, fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    ax_a.legend(fontsize=8)
    fig.tight_layout()
    return render_figure(fig)


def gate_plot(curve: dict, method: str) -> Image.Image:
    """The gate curve: mean image and text alignment over the concepts against beta, and CLIP-T against CLIP-I."""
    points = curve["points"]
    betas = [p["beta"] for p in points]
    x = nan_list(p["mean"]["image_alignment"] for p in points)
    y = nan_list(p["mean"]["text_alignment"] for p in points)
    fig = Figure(figsize=(12, 3.4))
    ax_i, ax_t, ax_p = (fig.add_subplot(1, 3, k) for k in (1, 2, 3))
    for ax, values, metric in ((ax_i, x, "image_alignment"), (ax_t, y, "text_alignment")):
        ax.plot(betas, values, marker="o")
        ax.set_xlabel("gate bias beta")
        ax.set_title(f"{method}: mean {LABELS[metric]}", fontsize=9)
    ax_p.plot(x, y, marker="o")
    for p, xi, yi in zip(points, x, y):
        ax_p.annotate(f"beta {p['beta']:g}" + (" (own)" if p.get("from_final_row") else ""), (xi, yi),
                      textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax_p.set_xlabel(LABELS["image_alignment"])
    ax_p.set_ylabel(LABELS["text_alignment"])
    ax_p.set_title("fidelity against text alignment", fontsize=9)
    for ax in (ax_i, ax_t, ax_p):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return render_figure(fig)


def results_rows(results: dict) -> list[list[str]]:
    """The results table: one row per method, then the base model and the upper bounds."""
    rows = []
    for method, r in results["methods"].items():
        s = r["summary"]
        name = method if r.get("complete") else f"{method} (after {len(r['grids'])} of {len(results['concepts'])} tasks)"
        rows.append([name, fmt(s["image_alignment"]["A"]), fmt(s["image_alignment"]["F"]),
                     fmt(s["image_alignment"]["BWT"]), fmt(s["text_alignment"]["A"]), fmt(s["kid"]["A"], 4),
                     fmt(s["recognition"]["A"], 2), fmt_int(r["bytes_per_concept"]), fmt(r["seconds_per_task"], 1)])
    base = results.get("base")
    if base:
        m = base["mean"]
        rows.append(["base model (no training)", fmt(m["image_alignment"]), "–", "–", fmt(m["text_alignment"]),
                     fmt(m["kid"], 4), fmt(m["recognition"], 2), "0", "0"])
    for method, u in (results.get("upper_bound") or {}).items():
        m = u["mean"]
        rows.append([f"upper bound: {method} (each concept alone)", fmt(m["image_alignment"]), "–", "–",
                     fmt(m["text_alignment"]), fmt(m["kid"], 4), fmt(m["recognition"], 2),
                     fmt_int(u.get("bytes_per_concept")), fmt(u.get("seconds_per_task"), 1)])
    return rows


def gate_rows(curve: dict) -> list[list[str]]:
    return [[f"{p['beta']:g}", fmt(p["mean"]["image_alignment"]), fmt(p["mean"]["text_alignment"]),
             fmt(p["mean"]["kid"], 4), fmt(p["mean"]["recognition"], 2),
             "the concepts' own (the last row of R)" if p.get("from_final_row") else ""] for p in curve["points"]]


def samples_rows(out_dir: Path, results: dict, method: str) -> list[list]:
    """The samples table of one method: rows the base model, after each task, each concept alone;
    columns the concepts; a cell holds the first samples of that concept (empty if not drawn)."""
    r = results["methods"][method]
    concepts = r["concepts"]

    def cell(path: Path | None, alt: str):
        cells = grid_cells(path, 1) if path is not None else None
        return Raw(img_tag(cells[0], alt=alt)) if cells else ""

    rows = []
    base = results.get("base") or {}
    if base.get("grids"):
        rows.append(["base model (class prompt)"]
                    + [cell(out_dir / base["grids"][c] if c in base["grids"] else None, f"base model: {c}")
                       for c in concepts])
    for t, rel in enumerate(r["grids"]):
        cells = grid_cells(out_dir / rel, t + 1) if rel else None
        row = [f"after task {t + 1} ({concepts[t]})"]
        for j, c in enumerate(concepts):
            if cells and j <= t:
                row.append(Raw(img_tag(cells[j], alt=f"{method} after task {t + 1}: {c}")))
            elif j <= t:
                row.append(f"(missing {rel})")
            else:
                row.append("")
        rows.append(row)
    upper = (results.get("upper_bound") or {}).get(method) or {}
    if upper.get("grids"):
        rows.append(["each concept alone (upper bound)"]
                    + [cell(out_dir / upper["grids"][c] if c in upper["grids"] else None, f"{method} alone: {c}")
                       for c in concepts])
    return rows


def write_report(out_dir: str | Path) -> Path:
    """Write ``out_dir/report.html`` from ``out_dir/results.json`` and return its path (a World v2 run's, version 2:
    ``museum.report.v2.benchmark_report``)."""
    out_dir = Path(out_dir)
    if (read_json(out_dir / RESULTS) or {}).get("version") == world_v2.RESULTS_VERSION:
        return world_v2.write_report(out_dir)
    results = read_results(out_dir)
    concepts = results["concepts"]
    settings = results.get("settings") or {}
    body = [
        f"<p>{len(results['methods'])} method(s), {len(concepts)} task(s): "
        f"{html.escape(', '.join(concepts))}. Each concept is drawn with {settings.get('n_prompts')} prompt(s) x "
        f"{settings.get('n_seeds')} seed(s), {settings.get('gen_steps')} denoising steps; base model "
        f"<code>{html.escape(str(settings.get('base')))}</code>.</p>",
        "<p>A: average over all concepts after the last task; F: forgetting, the mean drop of each earlier "
        "concept from its best score to its final one (lower is better); BWT: backward transfer, the mean "
        "final-minus-just-learned score (negative: later tasks hurt earlier ones). A, F and BWT are on image "
        "alignment; CLIP-T, KID (lower is better) and recognition are final averages.</p>",
        "<h2>Results</h2>",
        table(RESULTS_HEADER, results_rows(results), "results"),
    ]
    if results["methods"]:
        body += ["<h2>Over the tasks</h2>", img_tag(curves_plot(results), alt="average and forgetting over tasks")]
    for method, r in results["methods"].items():
        body.append(f"<h2 id='method-{html.escape(method)}'>{html.escape(method)}</h2>")
        if r["grids"]:
            body.append(img_tag(heatmaps(r, results, method), alt=f"{method} heatmaps"))
        final = len(r["R"]["image_alignment"]) - 1
        if final >= 0:
            rows = [[c] + [fmt(r["R"][metric][final][j], _digits(metric)) for metric in results["metrics"]]
                    for j, c in enumerate(r["concepts"])]
            body.append(f"<p>Scores after task {final + 1}:</p>")
            body.append(table(["concept"] + [LABELS[m] for m in results["metrics"]], rows, f"final-{method}"))
        body.append("<p>Samples (rows: the base model with the class prompt, the museum after each task, each "
                    "concept learned alone; columns: the concepts; the first prompt's first seeds):</p>")
        body.append(table(["", *concepts[:len(r["concepts"])]], samples_rows(out_dir, results, method),
                          f"samples-{method}", "samples"))
        curve = r.get("gate_curve")
        if curve:
            tau = ", ".join(f"{t:g}" for t in curve.get("tau") or [] if t is not None) or "the concepts' own"
            body.append(f"<h3 id='gate-curve-{html.escape(method)}'>{html.escape(method)}: gate curve</h3>")
            body.append(f"<p>After the last task, every concept drawn again with the same prompts and seeds at each "
                        f"gate bias beta (temperature tau {html.escape(tau)}): a lower beta opens the gate wider "
                        f"(more of the concept, less of the rest of the prompt).</p>")
            body.append(img_tag(gate_plot(curve, method), alt=f"{method} gate curve"))
            body.append(table(GATE_HEADER, gate_rows(curve), f"gate-{method}"))
    return write_page(out_dir / REPORT, "Museum continual benchmark", body)

"""The benchmark report: one self-contained HTML page from ``results.json`` (``museum report DIR``).

Figures are drawn with matplotlib into PNG bytes in memory and embedded as base64, like the
sample grids, so the page can be mailed or opened offline.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from museum.evaluation.benchmark import read_results
from museum.report.html import figure, img_tag, table, write_page

REPORT = "report.html"
LABELS = {"image_alignment": "image alignment (CLIP-I)", "text_alignment": "text alignment (CLIP-T)",
          "kid": "KID", "recognition": "recognition accuracy"}
RESULTS_HEADER = ["method", "A (CLIP-I)", "F", "BWT", "CLIP-T", "KID", "recognition", "bytes/concept", "seconds/task"]


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _int(x) -> str:
    return "–" if x is None else f"{int(round(x)):,}"


def _render(fig) -> Image.Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _matrix(R) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in R], dtype=float)


def heatmap(R, concepts, title: str) -> Image.Image:
    """R[t, j] as a heatmap: rows the task just learned, columns the concept scored."""
    from matplotlib.figure import Figure

    arr = _matrix(R)
    T = len(arr)
    fig = Figure(figsize=(1.2 + 0.55 * T, 1.0 + 0.5 * T))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(arr), cmap="viridis", vmin=np.nanmin(arr) if np.isfinite(arr).any() else 0,
                   vmax=np.nanmax(arr) if np.isfinite(arr).any() else 1)
    ax.set_xticks(range(T), concepts[:T], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(T), [f"after {c}" for c in concepts[:T]], fontsize=8)
    ax.set_xlabel("concept j")
    ax.set_title(title, fontsize=9)
    lo, hi = im.get_clim()
    for t in range(T):
        for j in range(T):
            if np.isfinite(arr[t, j]):
                light = hi > lo and (arr[t, j] - lo) / (hi - lo) > 0.6  # viridis is light at the top
                ax.text(j, t, f"{arr[t, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if light else "white")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _render(fig)


def curves_plot(results: dict, metric: str = "image_alignment") -> Image.Image:
    """Average alignment over the seen concepts and forgetting after every task, all methods."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    ax_a, ax_f = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for method, r in results["methods"].items():
        c = r["curves"][metric]
        x = np.arange(1, len(c["average"]) + 1)
        ax_a.plot(x, [np.nan if v is None else v for v in c["average"]], marker="o", label=method)
        ax_f.plot(x, [np.nan if v is None else v for v in c["forgetting"]], marker="o", label=method)
    base = results.get("base")
    if base:  # the untrained model's average over the same concepts seen so far
        vals = [base["scores"].get(c, {}).get(metric) for c in results["concepts"]]
        avg = [np.nanmean([np.nan if v is None else v for v in vals[:t + 1]]) for t in range(len(vals))]
        ax_a.plot(np.arange(1, len(avg) + 1), avg, color="grey", linestyle="--", label="base model")
    for ax, title in ((ax_a, f"average {LABELS[metric]} over the concepts seen"),
                      (ax_f, f"forgetting of {LABELS[metric]}")):
        ax.set_xlabel("tasks learned")
        ax.set_title(title, fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    ax_a.legend(fontsize=8)
    fig.tight_layout()
    return _render(fig)


def results_rows(results: dict) -> list[list[str]]:
    """The results table: one row per method, then the base model and the upper bounds."""
    rows = []
    for method, r in results["methods"].items():
        s = r["summary"]
        name = method if r.get("complete") else f"{method} (after {len(r['grids'])} of {len(results['concepts'])} tasks)"
        rows.append([name, _f(s["image_alignment"]["A"]), _f(s["image_alignment"]["F"]),
                     _f(s["image_alignment"]["BWT"]), _f(s["text_alignment"]["A"]), _f(s["kid"]["A"], 4),
                     _f(s["recognition"]["A"], 2), _int(r["bytes_per_concept"]), _f(r["seconds_per_task"], 1)])
    base = results.get("base")
    if base:
        m = base["mean"]
        rows.append(["base model (no training)", _f(m["image_alignment"]), "–", "–", _f(m["text_alignment"]),
                     _f(m["kid"], 4), _f(m["recognition"], 2), "0", "0"])
    for method, u in (results.get("upper_bound") or {}).items():
        m = u["mean"]
        rows.append([f"upper bound: {method} (each concept alone)", _f(m["image_alignment"]), "–", "–",
                     _f(m["text_alignment"]), _f(m["kid"], 4), _f(m["recognition"], 2),
                     _int(u.get("bytes_per_concept")), _f(u.get("seconds_per_task"), 1)])
    return rows


def _grid(out_dir: Path, rel: str | None, caption: str) -> str:
    if not rel or not (out_dir / rel).is_file():
        return f"<p>(missing image: {html.escape(str(rel))})</p>"
    with Image.open(out_dir / rel) as im:
        return figure(im.convert("RGB"), caption)


def write_report(out_dir: str | Path) -> Path:
    """Write ``out_dir/report.html`` from ``out_dir/results.json`` and return its path."""
    out_dir = Path(out_dir)
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
        body.append(img_tag(heatmap(r["R"]["image_alignment"], r["concepts"],
                                    f"{method}: image alignment R[t, j]"), alt=f"{method} heatmap"))
        final = len(r["R"]["image_alignment"]) - 1
        if final >= 0:
            rows = [[c] + [_f(r["R"][metric][final][j], 4 if metric == "kid" else 3)
                           for metric in results["metrics"]] for j, c in enumerate(r["concepts"])]
            body.append(table(["concept"] + [LABELS[m] for m in results["metrics"]], rows, f"final-{method}"))
        body.append("<p>Samples after each task (rows: the concepts learned so far, in order):</p>")
        body += [_grid(out_dir, rel, f"after task {t + 1} ({r['concepts'][t]})") for t, rel in enumerate(r["grids"])]
    base = results.get("base")
    if base and base.get("grids"):
        body.append("<h2>Base model (class prompts, no training)</h2>")
        body += [_grid(out_dir, rel, c) for c, rel in base["grids"].items()]
    return write_page(out_dir / REPORT, "Museum continual benchmark", body)

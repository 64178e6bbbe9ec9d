"""The files of a benchmark folder: each unit's ``progress.json`` (its settings and every score it has, the point
a rerun continues from) and ``results.json``, everything the report needs, gathered from them
(``RESULTS_VERSION``; docs/BENCHMARKS.md and the report read it)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from museum.evaluation.benchmark.metrics import HIGHER_IS_BETTER, METRICS, curves, summarize
from museum.evaluation.benchmark.units import PROGRESS, RESULTS, RunSettings, read_json, read_results_file
from museum.store.atomic import atomic_write_json

RESULTS_VERSION = 1


@dataclass
class Settings(RunSettings):
    """The first world's settings: one seed draws the concepts' renders and trains every method."""

    seed: int = 0


def _mean_scores(scores: Iterable[dict]) -> dict[str, float | None]:
    """Each metric's mean over concepts' scores (those that have it), None where none does."""
    scores = list(scores)
    mean = {}
    for metric in METRICS:
        vals = [s[metric] for s in scores if s.get(metric) is not None]
        mean[metric] = float(np.mean(vals)) if vals else None
    return mean


def method_results(progress: dict, concepts: Sequence[str]) -> dict:
    """A method's progress file -> its matrices, summaries, storage and times."""
    # tasks beyond ``concepts`` (a longer earlier run into the same folder) are not part of these results
    tasks = {t["task"]: t for t in progress.get("tasks", []) if t["task"] < len(concepts)}
    T = max(tasks) + 1 if tasks else 0
    rows = [tasks.get(t) for t in range(T)]
    R = {metric: [[(rows[t]["scores"].get(concepts[j], {}).get(metric) if rows[t] and j <= t else None)
                   for j in range(T)] for t in range(T)] for metric in METRICS}
    summary = {metric: summarize(R[metric], HIGHER_IS_BETTER[metric]) for metric in METRICS}
    done = [r for r in rows if r]
    concept_bytes = [r["concept_bytes"] for r in done]
    state_bytes = done[-1]["state_bytes"] if done else 0
    seconds = [r["train_seconds"] for r in done if r.get("train_seconds") is not None]
    return {
        "concepts": list(concepts[:T]),
        "complete": T == len(concepts) and all(rows),
        "R": R,
        "summary": summary,
        "curves": {metric: curves(R[metric], HIGHER_IS_BETTER[metric]) for metric in METRICS},
        "concept_bytes": concept_bytes,
        "state_bytes": state_bytes,
        "bytes_per_concept": (sum(concept_bytes) + state_bytes) / len(done) if done else None,
        "train_seconds": [r.get("train_seconds") for r in done],
        "seconds_per_task": float(np.mean(seconds)) if seconds else None,
        "grids": [r.get("grid") for r in done],
        "gate_curve": gate_curve_results(progress.get("gate_curve"), concepts[:T]),
    }


def gate_curve_results(curve: dict | None, concepts: Sequence[str]) -> dict | None:
    """The stored gate curve -> points sorted by beta, each with per-concept scores and their means;
    None without one, or if it was measured after another task than the last of ``concepts``."""
    if not curve or not curve.get("points") or curve.get("concepts") != list(concepts):
        return None
    points = [{"beta": p["beta"], "mean": _mean_scores(p["scores"].values()), "scores": p["scores"],
               "from_final_row": p.get("from_final_row", False)}
              for p in sorted(curve["points"].values(), key=lambda p: p["beta"])]
    return {"tau": curve.get("tau"), "points": points}


def _row_results(rows: dict, concepts: Sequence[str]) -> dict:
    """Per-concept scores (base model or upper bound) and their means over the concepts present."""
    present = [c for c in concepts if c in rows]
    out = {"concepts": present, "scores": {c: rows[c]["scores"] for c in present},
           "mean": _mean_scores(rows[c]["scores"] for c in present)}
    if present and "concept_bytes" in rows[present[0]]:
        out["bytes_per_concept"] = float(np.mean([rows[c]["concept_bytes"] + rows[c]["state_bytes"] for c in present]))
        secs = [rows[c]["train_seconds"] for c in present if rows[c].get("train_seconds") is not None]
        out["seconds_per_task"] = float(np.mean(secs)) if secs else None
    if present and "grid" in rows[present[0]]:
        out["grids"] = {c: rows[c]["grid"] for c in present}
    return out


def collect_results(out_dir: str | Path, methods: Sequence[str] | None = None,
                    concepts: Sequence[str] | None = None, settings: Settings | dict | None = None) -> dict:
    """Gather every progress file of ``out_dir`` into the results object (``results.json``'s schema)."""
    out_dir = Path(out_dir)
    if methods is None:
        methods = sorted(p.parent.name for p in out_dir.glob(f"*/{PROGRESS}") if p.parent.name != "base")
    results = {"version": RESULTS_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "metrics": list(METRICS), "higher_is_better": HIGHER_IS_BETTER, "concepts": None,
               "settings": settings.to_dict() if isinstance(settings, Settings) else settings,
               "methods": {}, "base": None, "upper_bound": {}}
    for method in methods:
        progress = read_json(out_dir / method / PROGRESS)
        if progress is None:
            continue
        seq = list(concepts) if concepts is not None else [t["concept"] for t in progress.get("tasks", [])]
        results["methods"][method] = method_results(progress, seq)
        results["concepts"] = results["concepts"] or seq
        results["settings"] = results["settings"] or {k: v for k, v in progress["settings"].items() if k != "overrides"}
        upper = read_json(out_dir / method / "upper" / PROGRESS)
        if upper is not None:
            results["upper_bound"][method] = _row_results(upper.get("concepts", {}), seq)
    seq = list(concepts) if concepts is not None else results["concepts"] or []
    base = read_json(out_dir / "base" / PROGRESS)
    if base is not None:
        rows = base.get("concepts", {})
        results["base"] = _row_results(rows, seq or list(rows))
    results["concepts"] = seq
    return results


def write_results(out_dir: str | Path, methods=None, concepts=None, settings=None) -> dict:
    results = collect_results(out_dir, methods, concepts, settings)
    atomic_write_json(Path(out_dir) / RESULTS, results)
    return results


def read_results(out_dir: str | Path) -> dict:
    return read_results_file(out_dir, RESULTS_VERSION, "museum bench")

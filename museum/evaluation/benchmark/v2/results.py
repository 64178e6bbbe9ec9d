"""``results.json`` of a World v2 benchmark folder (version 2), gathered from the units' progress files: every
figure per training seed, and as the mean and 95% interval over seeds (:func:`interval`, Student's t; with one
seed there is no interval and the report says so).

Per method: the matrices R[t][j] of every reading (the four of ``metrics.READINGS`` and the two gaps closed,
``metrics.GAPS``; None where concept j was not read after task t), and from them A (final average), F
(forgetting: each earlier concept's drop from its best to its final value), BWT (backward transfer) and "own"
(each concept's value right after its own task); the curves of the average and forgetting over the tasks
whose row was read in full; the base vocabulary's prompt following after those tasks and its drop from the
base model's; the side-by-side pairs; the upper bound (``source``: each concept learned alone, or for a method
whose concepts are independent, ``Method.independent``, the sequence's own-task readings, which are the same); storage
and the wall and CPU seconds the units took.
A concept whose anchors are too close for a reading's gap closed is listed under ``excluded`` and left out
of that reading's figures (never averaged in as 0).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable, Sequence

import numpy as np
from scipy import stats

from museum.evaluation.benchmark.units import PROGRESS, RESULTS, RunSettings, read_json, read_results_file
from museum.evaluation.benchmark.v2.metrics import GAPS, READINGS, gaps_closed
from museum.evaluation.metrics import backward_transfer, forgetting
from museum.evaluation.prompt_following import ATTRIBUTES
from museum.methods import METHODS
from museum.store.atomic import atomic_write_json
from museum.world.v2.concepts import spec

RESULTS_VERSION = 2
ALL_READINGS = (*GAPS, *READINGS)
CONFIDENCE = 0.95


@dataclass
class Settings(RunSettings):
    """World v2's settings (``n_seeds``: images per prompt; the training seeds are the units' own)."""

    score_every: int = 1
    generality_prompts: int = 64
    n_pairs: int = 4
    world: str = "v2"

    #: settings a kind of unit does not depend on
    IGNORED: ClassVar[dict] = {"base": ("steps", "overrides", "score_every"),
                               "sequence": (),
                               "upper_bound": ("score_every", "generality_prompts", "n_pairs"),
                               "joint": ("score_every",)}

    def of_unit(self, kind: str, method: str | None = None) -> dict:
        """The settings a unit of ``kind`` depends on (a method's: with its own overrides)."""
        out = {k: v for k, v in self.to_dict().items() if k not in self.IGNORED[kind]}
        if "overrides" in out:
            out["overrides"] = self.overrides.get(method, {})
        return out


# --------------------------------------------------------------------------- statistics


def interval(values: Iterable[float | None]) -> dict | None:
    """Mean and 95% t-interval over the finite ``values`` (one per seed); low/high None with one value."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    mean = float(np.mean(vals))
    if len(vals) < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(vals) - 1) * np.std(vals, ddof=1) / math.sqrt(len(vals)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(vals)}


def _matrix(R) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in R], dtype=float).reshape(len(R), -1)


def _value(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def summary(R: Sequence[Sequence[float | None]]) -> dict[str, float | None]:
    """A, F, BWT and own of a lower-triangular matrix (None where not read)."""
    arr = _matrix(R)
    if not len(arr):
        return {"A": None, "F": None, "BWT": None, "own": None}
    final, own = arr[-1][np.isfinite(arr[-1])], np.diag(arr)[np.isfinite(np.diag(arr))]
    return {"A": _value(final.mean()) if final.size else None, "F": _value(forgetting(arr)),
            "BWT": _value(backward_transfer(arr)), "own": _value(own.mean()) if own.size else None}


def curves(R, rows: Sequence[int]) -> dict[str, list]:
    """The average over the concepts seen and the forgetting after each task of ``rows`` (those read in full)."""
    arr = _matrix(R)
    average = [_value(np.nanmean(arr[t, :t + 1])) if np.isfinite(arr[t, :t + 1]).any() else None for t in rows]
    return {"tasks": [t + 1 for t in rows], "average": average,
            "forgetting": [_value(forgetting(arr[:t + 1, :t + 1])) for t in rows]}


# --------------------------------------------------------------------------- one seed


def _with_gaps(reading: dict | None, anchors: dict | None) -> dict | None:
    if reading is None:
        return None
    gaps = gaps_closed(reading, anchors["class_prompt"], anchors["upper"]) if anchors else dict.fromkeys(GAPS)
    return {**reading, **gaps}


def sequence_results(progress: dict, names: Sequence[str], anchors: dict) -> dict:
    """One training seed's sequence: its matrices, summaries, curves, generality, pairs, storage and times."""
    T = len(names)
    tasks = {t["task"]: t for t in progress.get("tasks", []) if t["task"] < T}
    rows = [tasks.get(t) for t in range(T)]
    cell = {(t, j): _with_gaps(rows[t]["scores"].get(names[j]), anchors.get(names[j]))
            for t in range(T) if rows[t] for j in range(t + 1)}
    R = {r: [[(cell.get((t, j)) or {}).get(r) for j in range(T)] for t in range(T)] for r in ALL_READINGS}
    full = [t for t in range(T) if rows[t] and rows[t].get("scored")]
    done = [r for r in rows if r]
    learning = [r["learning"] for r in done if r.get("learning")]
    composition = progress.get("composition") or {}
    return {
        "complete": bool(done) and len(done) == T and T - 1 in full,
        "R": R, "summary": {r: summary(R[r]) for r in ALL_READINGS},
        "curves": {r: curves(R[r], full) for r in ALL_READINGS},
        "generality": {"tasks": [t + 1 for t in full], "mean": [rows[t]["generality"]["mean"] for t in full],
                       "final": rows[T - 1]["generality"] if T - 1 in full else None},
        "composition": composition.get("pairs") if composition.get("concepts") == list(names) else None,
        "grids": [{"grid": r["grid"], "concepts": r["grid_concepts"]} if r else None for r in rows],
        "bytes_per_concept": (sum(r["concept_bytes"] for r in done) + done[-1]["state_bytes"]) / len(done)
        if done else None,
        "train_seconds": [r.get("train_seconds") for r in done],
        "cpu_seconds": sum(r["reading"]["cpu_seconds"] for r in done) + sum(x["cpu_seconds"] for x in learning)
        + composition.get("cpu_seconds", 0.0),
        "learn_cpu_seconds": float(np.mean([x["cpu_seconds"] for x in learning])) if learning else None,
    }


UPPER_ALONE = "each concept learned alone"
UPPER_OWN_TASK = "own-task readings (independent method)"


def upper_results(progress: dict, names: Sequence[str], anchors: dict) -> dict:
    """One training seed's upper bound: per concept every reading, their means, storage and times."""
    rows = progress.get("concepts", {})
    present = [n for n in names if n in rows]
    learning = [rows[n]["learning"] for n in present if rows[n].get("learning")]
    return {**_alone(rows, present, anchors), "source": UPPER_ALONE, "grids": {n: rows[n]["grid"] for n in present},
            "cpu_seconds": sum(rows[n]["reading"]["cpu_seconds"] for n in present)
            + sum(x["cpu_seconds"] for x in learning)}


def own_task_results(progress: dict, names: Sequence[str], anchors: dict) -> dict:
    """One training seed's upper bound of a method whose concepts are independent (``Method.independent``), from its
    sequence's progress: each concept as read right after its own task, which is what learning it alone from the base
    model with the same seed would read, bit for bit. No unit of its own ran: no CPU seconds, no grids (the
    sequence's show the same images)."""
    tasks = {t["concept"]: t for t in progress.get("tasks", []) if t["task"] < len(names)}
    present = [n for n in names if n in tasks]
    rows = {n: {**tasks[n], "scores": tasks[n]["scores"][n]} for n in present}
    return {**_alone(rows, present, anchors), "source": UPPER_OWN_TASK, "grids": {}, "cpu_seconds": None}


def _alone(rows: dict, present: list[str], anchors: dict) -> dict:
    """Each concept alone (``rows``: concept -> its scores and bytes): every reading, their means, storage."""
    scores = {n: _with_gaps(rows[n]["scores"], anchors.get(n)) for n in present}
    return {"concepts": present, "scores": scores,
            "mean": {r: _mean(scores[n][r] for n in present) for r in ALL_READINGS},
            "bytes_per_concept": float(np.mean([rows[n]["concept_bytes"] + rows[n]["state_bytes"] for n in present]))
            if present else None}


def joint_results(progress: dict, names: Sequence[str], anchors: dict) -> dict:
    """One training seed's joint oracle: per concept every reading, their means, its prompt following and pairs."""
    scores = {n: _with_gaps(progress["scores"][n], anchors.get(n)) for n in names if n in progress["scores"]}
    learning = progress.get("learning") or {}
    return {"concepts": list(scores), "scores": scores,
            "mean": {r: _mean(s[r] for s in scores.values()) for r in ALL_READINGS},
            "generality": {"tasks": [len(names)], "mean": [progress["generality"]["mean"]],
                           "final": progress["generality"]},
            "composition": progress.get("composition"), "grid": progress.get("grid"),
            "cpu_seconds": progress["reading"]["cpu_seconds"] + learning.get("cpu_seconds", 0.0)}


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


# --------------------------------------------------------------------------- over seeds


def _over_seeds(blocks: list[dict], get) -> dict | None:
    """The interval over seeds of ``get(block)`` (None where a seed lacks it)."""
    return interval(get(b) for b in blocks)


def _curves_over_seeds(blocks: list[dict], reading: str) -> dict:
    tasks = sorted({t for b in blocks for t in b["curves"][reading]["tasks"]})

    def at(b, kind, t):
        c = b["curves"][reading]
        return c[kind][c["tasks"].index(t)] if t in c["tasks"] else None

    return {"tasks": tasks, **{kind: [_over_seeds(blocks, lambda b: at(b, kind, t)) for t in tasks]
                               for kind in ("average", "forgetting")}}


def _mean_matrix(blocks: list[dict], reading: str) -> list[list[float | None]]:
    """The elementwise mean over seeds of a reading's matrices (None where no seed has a value)."""
    stacked = np.stack([_matrix(b["R"][reading]) for b in blocks])
    count = np.isfinite(stacked).sum(0)
    mean = np.where(count > 0, np.nansum(stacked, 0) / np.maximum(count, 1), np.nan)
    return [[_value(v) for v in row] for row in mean]


def generality_results(blocks: list[dict], base: dict | None) -> dict:
    """Prompt following before the first task (the base model) and after each read task, over seeds; its drop
    (before - after the last task) and each attribute before and after."""
    before = (base or {}).get("generality")
    tasks = sorted({t for b in blocks for t in b["generality"]["tasks"]})

    def at(b, t):
        g = b["generality"]
        return g["mean"][g["tasks"].index(t)] if t in g["tasks"] else None

    finals = [b["generality"]["final"] for b in blocks]
    return {
        "tasks": [0, *tasks] if before else tasks,
        "mean": ([interval([before["mean"]])] if before else []) + [_over_seeds(blocks, lambda b: at(b, t)) for t in tasks],
        "drop": interval(before["mean"] - f["mean"] for f in finals if f) if before else None,
        "attributes": {a: {"before": before.get(a) if before else None,
                           "after": interval(f[a] for f in finals if f)} for a in ATTRIBUTES},
    }


def _halves(pairs: dict, anchors: dict) -> dict[str, dict[str, dict]]:
    """One seed's pairs -> pair -> concept -> its half's fidelity readings and gaps closed."""
    out = {}
    for key, row in pairs.items():
        a = anchors.get(key)
        out[key] = {c: {**h, **(gaps_closed(h, a["class_words"]["halves"][c], a["renders"]["halves"][c]) if a
                                else dict.fromkeys(GAPS))} for c, h in row["halves"].items()}
    return out


def composition_results(blocks: list[dict], base: dict | None) -> dict | None:
    """Per pair and overall, over seeds: placement, and each concept's fidelity and gap closed in its half (0: the
    base model drawing the class words, 1: the renders of the pair)."""
    anchors = (base or {}).get("composition") or {}
    per_seed = [b["composition"] for b in blocks if b["composition"]]
    if not per_seed:
        return None
    halves = [_halves(p, anchors) for p in per_seed]
    pairs = {key: {"background": row["background"], "placed": interval(p[key]["placed"] for p in per_seed),
                   "halves": {c: {r: interval(h[key][c][r] for h in halves) for r in (*GAPS, "image_alignment",
                                                                                    "independent")}
                              for c in row["halves"]},
                   "anchors": {k: anchors[key][k]["placed"] for k in ("class_words", "renders")} if key in anchors
                   else None}
             for key, row in per_seed[0].items()}
    overall = {"placed": interval(_mean(p[k]["placed"] for k in p) for p in per_seed)}
    overall.update({r: interval(_mean(v[r] for cs in h.values() for v in cs.values()) for h in halves) for r in GAPS})
    return {"pairs": pairs, **overall}


def upper_bound_results(blocks: list[dict]) -> dict | None:
    """Each concept alone, over seeds, and where its readings come from (``source``)."""
    return {**_concepts_over_seeds(blocks), "source": blocks[0]["source"]} if blocks else None


def _concepts_over_seeds(blocks: list[dict]) -> dict:
    """Every reading's mean over concepts and per concept, over seeds; storage and CPU seconds."""
    concepts = blocks[0]["concepts"]
    return {"concepts": concepts,
            "summary": {r: _over_seeds(blocks, lambda b: b["mean"][r]) for r in ALL_READINGS},
            "final": {r: {c: interval(b["scores"][c][r] for b in blocks if c in b["scores"]) for c in concepts}
                      for r in ALL_READINGS},
            "grids": blocks[0].get("grids"), "bytes_per_concept": blocks[0].get("bytes_per_concept"),
            "cpu_seconds": _over_seeds(blocks, lambda b: b["cpu_seconds"])}


def joint_oracle_results(blocks: list[dict], base: dict | None) -> dict | None:
    """Every concept learned at once, over seeds: what the upper bound has, and generality and the pairs."""
    if not blocks:
        return None
    return {**_concepts_over_seeds(blocks),
            "generality": generality_results(blocks, base), "composition": composition_results(blocks, base),
            "grid": blocks[0]["grid"]}


def method_results(seeds: dict[int, dict], uppers: dict[int, dict], joints: dict[int, dict], base: dict | None,
                   names: Sequence[str], n_seeds: int) -> dict:
    """A method over its training seeds (``seeds``/``uppers``: seed -> one seed's sequence/upper-bound results)."""
    blocks = [seeds[k] for k in sorted(seeds)]
    return {
        "seeds": {str(k): seeds[k] for k in sorted(seeds)},
        "complete": len(blocks) == n_seeds and all(b["complete"] for b in blocks),
        "summary": {r: {stat: _over_seeds(blocks, lambda b: b["summary"][r][stat]) for stat in ("A", "F", "BWT", "own")}
                    for r in ALL_READINGS},
        "final": {r: {c: _over_seeds(blocks, lambda b: b["R"][r][-1][j]) for j, c in enumerate(names)}
                  for r in ALL_READINGS},
        "R_mean": {r: _mean_matrix(blocks, r) for r in ALL_READINGS},
        "curves": {r: _curves_over_seeds(blocks, r) for r in ALL_READINGS},
        "generality": generality_results(blocks, base),
        "composition": composition_results(blocks, base),
        "upper_bound": upper_bound_results([uppers[k] for k in sorted(uppers)]),
        "joint": joint_oracle_results([joints[k] for k in sorted(joints)], base),
        "grids": blocks[0]["grids"],
        "bytes_per_concept": _mean(b["bytes_per_concept"] for b in blocks),
        "cpu_seconds": _over_seeds(blocks, lambda b: b["cpu_seconds"]),
        "learn_cpu_seconds": _over_seeds(blocks, lambda b: b["learn_cpu_seconds"]),
    }


def base_results(progress: dict | None, names: Sequence[str]) -> dict | None:
    """The base row: each concept's anchors (class prompt, renders), the base model's prompt following, the pairs
    drawn with class words and rendered."""
    if progress is None:
        return None
    rows = progress.get("concepts", {})
    present = [n for n in names if n in rows]
    excluded = {g: [n for n in present if gaps_closed(rows[n]["upper"], rows[n]["class_prompt"], rows[n]["upper"])[g]
                    is None] for g in GAPS}
    return {"concepts": present, "anchors": {n: {k: rows[n][k] for k in ("class_prompt", "upper")} for n in present},
            "mean": {k: {r: _mean(rows[n][k][r] for n in present) for r in READINGS} for k in ("class_prompt", "upper")},
            "excluded": excluded, "grids": {n: rows[n]["grid"] for n in present},
            "generality": progress.get("generality"), "composition": progress.get("composition") or {},
            "cpu_seconds": sum(rows[n]["cpu_seconds"] for n in present)
            + sum((progress.get(k) or {}).get("cpu_seconds", 0.0) for k in ("generality_seconds", "composition_seconds"))}


def _seed_folders(folder: Path) -> dict[int, dict]:
    """seed -> progress of ``folder/seed-<k>/progress.json``."""
    out = {}
    for path in sorted(folder.glob(f"seed-*/{PROGRESS}")):
        out[int(path.parent.name.removeprefix("seed-"))] = read_json(path)
    return out


def collect_results(out_dir: str | Path, methods: Sequence[str], names: Sequence[str], n_seeds: int,
                    settings: Settings) -> dict:
    """Gather every progress file of ``out_dir`` into the results object (``results.json``'s schema, version 2);
    seeds beyond ``n_seeds`` (an earlier run with more) are left out."""
    out_dir = Path(out_dir)
    base = base_results(read_json(out_dir / "base" / PROGRESS), names)
    anchors = base["anchors"] if base else {}
    results = {"version": RESULTS_VERSION, "world": "v2", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "settings": settings.to_dict(), "concepts": list(names), "kinds": {n: spec(n).kind for n in names},
               "readings": list(ALL_READINGS), "seeds": n_seeds, "confidence": CONFIDENCE, "base": base, "methods": {}}
    for method in methods:
        seeds = {k: sequence_results(p, names, anchors) for k, p in _seed_folders(out_dir / method).items()
                 if k < n_seeds}
        uppers = _uppers(out_dir, method, names, n_seeds, anchors)
        joints = {k: joint_results(p, names, anchors) for k, p in _seed_folders(out_dir / method / "joint").items()
                  if k < n_seeds}
        if seeds:
            results["methods"][method] = method_results(seeds, uppers, joints, base, names, n_seeds)
    return results


def _uppers(out_dir: Path, method: str, names: Sequence[str], n_seeds: int, anchors: dict) -> dict[int, dict]:
    """seed -> the method's upper bound: its upper-bound units', or an independent method's own-task readings
    (there whenever its sequence was read: they cost nothing, whether or not the run asked for the upper bound)."""
    independent = METHODS[method].independent
    folder = out_dir / method if independent else out_dir / method / "upper"
    read = own_task_results if independent else upper_results
    return {k: read(p, names, anchors) for k, p in _seed_folders(folder).items() if k < n_seeds}


def write_results(out_dir: str | Path, methods: Sequence[str], names: Sequence[str], n_seeds: int,
                  settings: Settings) -> dict:
    results = collect_results(out_dir, methods, names, n_seeds, settings)
    atomic_write_json(Path(out_dir) / RESULTS, results)
    return results


def read_results(out_dir: str | Path) -> dict:
    return read_results_file(out_dir, RESULTS_VERSION, "museum bench --world v2")

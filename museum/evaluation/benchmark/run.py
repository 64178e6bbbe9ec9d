"""The benchmark run (``museum bench``): for each method, an empty museum on the same base model learns the
benchmark concepts one after another (same images, same seeds for every method); after each task t every concept
seen so far (j <= t) is drawn with fixed prompts and seeds (``museum.evaluation.protocol``) and scored
(``museum.evaluation.benchmark.metrics``); the scores go to each unit's progress file and ``results.json``
(``museum.evaluation.benchmark.results``).

Layout of ``out_dir``::

    results.json                   everything the report needs (``RESULTS_VERSION``)
    <method>/museum/               the method's museum, concept after concept
    <method>/progress.json         settings and the scores of every finished task (resume point)
    <method>/grids/task-NN.png     4 samples of every seen concept after task NN (rows: concepts,
                                   a row padded with white where a concept has fewer samples)
    <method>/upper/<concept>/museum, <method>/upper/progress.json,
    <method>/upper/grids/<concept>.png                              the upper bound (optional)
    base/progress.json, base/grids/<concept>.png                    the untrained base model

For a method with a generation gate (one of its ``generation_options`` is ``swept``: Perfusion's gate
bias), the method's progress file also holds the gate curve: after the last task, every concept drawn
again with the same prompts and seeds at each gate bias beta of ``gate_betas`` (its other settings, e.g.
the temperature, stay each concept's own) and scored.
Where beta is the concepts' own, the point is the last row of R (no images are drawn again).

A rerun with the same settings skips whatever is done: learned concepts are read back from
the museum, scored tasks from ``progress.json``.

Several processes (``accelerate launch -m museum bench ...``, or several ``museum bench`` runs
on one ``out_dir``) share the work: each unit (the base row, a method's task sequence with its
gate curve, a method's upper bound) is claimed with an ``flock`` on ``.claims/<unit>.lock``, so
each process takes the next free unit and learns it alone (no data parallelism, no
collectives); a process then waits for the units others hold and finishes any that a dead
process left. Every unit has its own seeds, so the results do not depend on who ran what.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from museum.evaluation.benchmark.metrics import build_prototypes, score_images
from museum.evaluation.benchmark.results import RESULTS_VERSION, Settings, write_results
from museum.evaluation.benchmark.units import (
    PROGRESS, BenchmarkError, Units, check_sequence, evaluator_fingerprint, grid_row, progress_bar, progress_of,
    storage, this_process,
)
from museum.evaluation.protocol import base_images, class_prompts, concept_images
from museum.methods import METHODS, method_names
from museum.models.loading import base_hash, is_embedded, load_evaluator, load_pipeline
from museum.store.atomic import atomic_write_json
from museum.training.trainer import TrainOptions
from museum.world.concepts import BENCHMARK_CONCEPTS, build_concept, concept_names

#: (templates, seeds per template) evaluated per concept
QUICK = (8, 4)
FULL = (20, 8)
#: gate biases of the gate curve (methods with a swept generation option); Perfusion's own default is 0.7
GATE_BETAS = (0.5, 0.6, 0.7, 0.8, 0.9)


class _Run(Units):
    """One benchmark run: shared data (concepts, prototypes, prompts) and the scoring of images."""

    def __init__(self, concepts, evaluator, settings: Settings, out_dir: Path, bar, device: str = "cpu"):
        super().__init__(out_dir, bar, device)
        self.names = list(concepts)
        self.settings = settings
        self.evaluator = evaluator
        self.data = {n: build_concept(n, n_train=settings.n_train, n_ref=settings.n_ref, seed=settings.seed)
                     for n in dict.fromkeys([*self.names, *BENCHMARK_CONCEPTS])}
        self.prototypes = build_prototypes(evaluator, {n: c.reference_images for n, c in self.data.items()})

    # ------------------------------------------------------------------ helpers
    def class_prompts(self, name: str) -> list[str]:
        return class_prompts(self.data[name], self.settings.n_prompts, self.settings.n_seeds)

    def score(self, name: str, images) -> dict:
        self.worked = True  # every unit that is not yet done scores something
        return score_images(self.evaluator, images, self.data[name], self.class_prompts(name), self.prototypes)

    def generate(self, m, name: str):
        s = self.settings
        return concept_images(m, name, self.data[name], n_prompts=s.n_prompts, n_seeds=s.n_seeds, steps=s.gen_steps,
                              guidance=s.guidance)

    def learn(self, m, name: str, method: str) -> float:
        c = self.data[name]
        s = self.settings
        start = time.time()
        m.learn(name, c.train_images, method=method, class_word=None if c.is_style else c.class_word,
                style=c.is_style, steps=s.steps, seed=s.seed, progress=False, options=TrainOptions(data_parallel=False),
                **s.overrides.get(method, {}))
        return time.time() - start

    def method_settings(self, method: str) -> dict:
        """The settings a method's units depend on: the run's, with the method's own overrides."""
        return {**self.settings.to_dict(), "overrides": self.settings.overrides.get(method, {})}

    # ------------------------------------------------------------------ a method, task after task
    def run_method(self, method: str) -> dict:
        folder = self.out_dir / method
        path = folder / PROGRESS
        progress = progress_of(path, "method", self.method_settings(method), RESULTS_VERSION)
        progress["method"] = method
        tasks: list[dict] = progress.setdefault("tasks", [])
        done = {t["task"] for t in tasks}
        m = self.open_museum(folder / "museum", self.settings.base)
        have = check_sequence(m, folder / "museum", path, self.names, method, done)
        for t, name in enumerate(self.names):
            if t in done:
                self.advance()
                continue
            wall = None
            if name not in have:
                self.step(f"{method}: learning {name}")
                wall = self.learn(m, name, method)
                have.add(name)
            self.step(f"{method}: scoring after {name}")
            scores, grid_rows = {}, []
            for j in self.names[:t + 1]:
                images = self.generate(m, j)
                scores[j] = self.score(j, images)
                grid_rows.extend(grid_row(images))
            grid = self.save_grid(folder / "grids" / f"task-{t:02d}.png", grid_rows)
            concept_bytes, state_bytes = storage(m, name)
            info = m.concept(name).info
            tasks.append({"task": t, "concept": name, "scores": scores,
                          "train_seconds": info.get("train_seconds"), "learn_wall_seconds": wall,
                          "steps": info.get("steps"), "concept_bytes": concept_bytes, "state_bytes": state_bytes,
                          "grid": grid})
            tasks.sort(key=lambda r: r["task"])
            atomic_write_json(path, progress)
            self.advance()
        return progress

    # ------------------------------------------------------------------ the gate curve
    def run_gate_curve(self, method: str, betas: Sequence[float]) -> dict:
        """Score every concept of the finished run at each gate bias (see the module docstring)."""
        folder = self.out_dir / method
        path = folder / PROGRESS
        progress = progress_of(path, "method", self.method_settings(method), RESULTS_VERSION)
        tasks = {t["task"]: t for t in progress.get("tasks", [])}
        T = len(self.names)
        if any(t not in tasks for t in range(T)):
            raise BenchmarkError(f"{path}: the gate curve needs every task scored first")
        m = self.open_museum(folder / "museum", self.settings.base)
        if [c.name for c in m.concepts] != self.names:
            # the museum went on to later tasks (an earlier, longer run): it cannot be drawn as it was after task T
            for _ in betas:
                self.advance()
            return progress
        final = tasks[T - 1]["scores"]
        cls = METHODS[method]
        swept = cls.swept_option()
        configs = [m.concept(n).info.get("config", {}) for n in self.names]
        own = {c.get(swept.config_key) for c in configs}
        if (progress.get("gate_curve") or {}).get("concepts") != self.names:  # none yet, or after another task
            progress["gate_curve"] = {"concepts": list(self.names)}
        curve = progress["gate_curve"]
        for option in cls.generation_options:  # the settings that stay each concept's own (Perfusion: tau)
            if option.config_key and option is not swept:
                curve[option.config_key] = sorted({c.get(option.config_key) for c in configs}, key=str)
        points = curve.setdefault("points", {})
        for beta in betas:
            key = f"{float(beta):g}"
            if key in points:
                self.advance()
                continue
            if own == {float(beta)}:  # the concepts' own gate: exactly the images of the last row of R
                points[key] = {"beta": float(beta), "scores": final, "from_final_row": True}
            else:
                self.step(f"{method}: gate beta {key}")
                scores = {}
                with cls.generation_settings(**{swept.name: float(beta)}):
                    for name in self.names:
                        scores[name] = self.score(name, self.generate(m, name))
                points[key] = {"beta": float(beta), "scores": scores, "from_final_row": False}
            atomic_write_json(path, progress)
            self.advance()
        return progress

    # ------------------------------------------------------------------ each concept alone
    def run_upper_bound(self, method: str) -> dict:
        folder = self.out_dir / method / "upper"
        path = folder / PROGRESS
        progress = progress_of(path, "upper_bound", self.method_settings(method), RESULTS_VERSION)
        progress["method"] = method
        rows = progress.setdefault("concepts", {})
        for name in self.names:
            if name not in rows:
                m = self.open_museum(folder / name / "museum", self.settings.base)
                wall = None
                if name not in m.manifest.names():
                    self.step(f"{method} alone: learning {name}")
                    wall = self.learn(m, name, method)
                self.step(f"{method} alone: scoring {name}")
                concept_bytes, state_bytes = storage(m, name)
                images = self.generate(m, name)
                grid = self.save_grid(folder / "grids" / f"{name}.png", grid_row(images))
                rows[name] = {"scores": self.score(name, images),
                              "train_seconds": m.concept(name).info.get("train_seconds"), "learn_wall_seconds": wall,
                              "concept_bytes": concept_bytes, "state_bytes": state_bytes,
                              "grid": grid}
                atomic_write_json(path, progress)
            self.advance()
        return progress

    # ------------------------------------------------------------------ the untrained base model
    def run_base(self) -> dict:
        folder = self.out_dir / "base"
        path = folder / PROGRESS
        settings = {k: v for k, v in self.settings.to_dict().items() if k not in ("steps", "overrides")}
        progress = progress_of(path, "base", settings, RESULTS_VERSION)
        rows = progress.setdefault("concepts", {})
        todo = [n for n in self.names if n not in rows]
        pipe = load_pipeline(self.settings.base).to(self.device) if todo else None
        s = self.settings
        for name in self.names:
            if name in rows:
                self.advance()
                continue
            self.step(f"base model: {name}")
            images = base_images(pipe, self.data[name], n_prompts=s.n_prompts, n_seeds=s.n_seeds, steps=s.gen_steps,
                                 guidance=s.guidance)
            grid = self.save_grid(folder / "grids" / f"{name}.png", grid_row(images))
            rows[name] = {"scores": self.score(name, images), "grid": grid}
            atomic_write_json(path, progress)
            self.advance()
        return progress


def run_benchmark(methods: str | Sequence[str] = "all", concepts: Sequence[str] | None = None,
                  out_dir: str | Path = "museum-bench", *, quick: bool = True, base: str | Path = "embedded",
                  evaluator=None, steps: int | None = None, method_overrides: dict[str, dict] | None = None,
                  progress: bool = True, upper_bound: bool = False, base_row: bool = True,
                  n_prompts: int | None = None, n_seeds: int | None = None, gen_steps: int = 25,
                  guidance: float = 7.5, seed: int = 0, n_train: int = 5, n_ref: int = 16,
                  gate_betas: Sequence[float] = GATE_BETAS, device: str = "cpu") -> dict:
    """Run (or continue) the continual benchmark into ``out_dir``; returns the results (also in
    ``out_dir/results.json``).

    ``methods``: "all" or method names. ``concepts``: the task sequence (default: all of
    ``BENCHMARK_CONCEPTS``). ``quick`` evaluates 8 templates x 4 seeds per concept, full mode
    20 x 8; ``n_prompts`` / ``n_seeds`` override either. ``steps``: training steps (default: each
    method's); ``method_overrides``: method name -> config overrides. ``gen_steps``: denoising
    steps of the evaluation samples. ``evaluator``: default the shipped one. ``gate_betas``: the
    gate biases of the gate curve of a gated method (Perfusion); empty for none. ``device``: where
    to learn and draw; "cuda" under several processes means each process's own GPU.

    Under ``accelerate launch`` (or with other runs on the same ``out_dir``) the processes share
    the units of work (see the module docstring); each returns once all of them are done."""
    out_dir = Path(out_dir)
    methods, concepts = _check_request(methods, concepts)
    default_prompts, default_seeds = QUICK if quick else FULL
    if evaluator is None:
        evaluator = load_evaluator()
    evaluator.eval()
    base = str(base) if is_embedded(base) else str(Path(base).resolve())
    settings = Settings(n_prompts=n_prompts or default_prompts, n_seeds=n_seeds or default_seeds, gen_steps=gen_steps,
                        guidance=guidance, steps=steps, seed=seed, n_train=n_train, n_ref=n_ref, base=base,
                        base_hash=base_hash(base), evaluator=evaluator_fingerprint(evaluator),
                        overrides={k: dict(v) for k, v in (method_overrides or {}).items()})
    if settings.n_seeds < 1 or settings.n_prompts < 1 or gen_steps < 1:
        raise BenchmarkError("n_prompts, n_seeds and gen_steps must be at least 1")
    gate_betas = list(dict.fromkeys(float(b) for b in gate_betas))
    out_dir.mkdir(parents=True, exist_ok=True)
    T = len(concepts)
    total = (len(methods) * T * (2 if upper_bound else 1) + (T if base_row else 0)
             + len(gate_betas) * sum(METHODS[m].swept_option() is not None for m in methods))
    procs, rank, device = this_process(device)
    with progress_bar(total, progress, procs, rank) as bar:
        run = _Run(concepts, evaluator, settings, out_dir, bar, device)

        def continual(method: str) -> None:
            run.run_method(method)
            if METHODS[method].swept_option() is not None and gate_betas:
                run.run_gate_curve(method, gate_betas)
            write_results(out_dir, methods, concepts, settings)

        units = [("base", run.run_base)] if base_row else []
        units += [(method, lambda method=method: continual(method)) for method in methods]
        units += [(f"{method}.upper", lambda method=method: run.run_upper_bound(method))
                  for method in methods if upper_bound]
        run.run_units(units, procs, rank)
    return write_results(out_dir, methods, concepts, settings)


def _check_request(methods: str | Sequence[str], concepts: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The methods ("all" or names) and the task sequence (default: ``BENCHMARK_CONCEPTS``) asked for, checked."""
    known = method_names()
    methods = known if methods == "all" else list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise BenchmarkError(f"unknown method(s) {unknown}; available: {', '.join(known)}")
    concepts = list(BENCHMARK_CONCEPTS if concepts is None else concepts)
    bad = [c for c in concepts if c not in concept_names()]
    if bad or not concepts or len(set(concepts)) != len(concepts):
        raise BenchmarkError(f"the task sequence must name distinct concepts among {', '.join(concept_names())}; "
                             f"got {concepts}")
    return methods, concepts

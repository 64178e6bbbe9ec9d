"""The benchmark run on World v2 (``museum bench --world v2``): for each method and each training seed, an
empty museum on the base model learns the task sequence (:func:`task_sequence`: the benchmark pool, every third
task a style), the same images and evaluation seeds for every method and seed. After a task the new concept is
drawn and read (``metrics.read_images``); every ``score_every`` tasks, and after the last, every concept seen so
far is, and the base vocabulary's prompt following (retained generality). After the last task, pairs of
learned objects are drawn side by side. The upper bound learns each concept alone from the base model, with
the same seed. The base row reads each concept's two anchors, the base model's prompt following and the
pairs drawn with class words. Every unit records the wall and CPU seconds it spent (``units.Clock``).

A method whose concepts are independent of one another (``Method.independent``: textual inversion, Custom Diffusion,
Perfusion) runs no upper-bound unit: learned alone, a concept is bit for bit what its sequence learned at its own
task with the same seed, so its upper bound is the sequence's own-task readings (``results.own_task_results``).

Layout of ``out_dir``::

    results.json                                   everything the report needs (``results.RESULTS_VERSION``)
    base/progress.json, base/grids/<concept>.png   anchors (row 1: class prompt, base model; row 2: renders)
    <method>/seed-<k>/museum/                      the sequence learned with training seed k
    <method>/seed-<k>/progress.json                its settings and every reading so far (resume point)
    <method>/seed-<k>/grids/task-NN.png            4 samples of each concept drawn after task NN (rows)
    <method>/upper/seed-<k>/<concept>/museum/, <method>/upper/seed-<k>/progress.json,
    <method>/upper/seed-<k>/grids/<concept>.png    each concept alone (``upper_bound=True``; not independent methods)

A rerun with the same settings continues: learned concepts are read back from the museums, read tasks from the
progress files; ``accelerate launch --num_processes 2 -m museum bench --world v2 ...`` shares the units between
processes (``museum.evaluation.benchmark.units``), each unit learned by one process alone.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from museum.drawing import Drawing
from museum.evaluation.benchmark.units import (
    PROGRESS, BenchmarkError, Clock, Units, check_sequence, evaluator_fingerprint, grid_row, progress_bar, progress_of,
    storage, this_process,
)
from museum.evaluation.benchmark.v2 import metrics as M
from museum.evaluation.benchmark.v2.results import RESULTS_VERSION, Settings, write_results
from museum.evaluation.concept_fidelity import reference_bank
from museum.evaluation.protocol import base_images, class_prompts, concept_images, seeded
from museum.generation.sampling import generate_images
from museum.methods import METHODS, method_names
from museum.models.loading import base_hash, load_pipeline
from museum.store.atomic import atomic_write_json
from museum.training.trainer import TrainOptions
from museum.world.v2.concepts import BENCHMARK_OBJECTS, BENCHMARK_POOL, BENCHMARK_STYLES, build_concept

#: (templates, images per template) drawn per concept
QUICK = (8, 4)
FULL = (24, 8)
GENERALITY_PROMPTS = 64
PAIRS = 4


def task_sequence(n: int = len(BENCHMARK_POOL)) -> list[str]:
    """The first ``n`` tasks: the benchmark pool's objects in order with a style every third task while styles
    last (10 tasks: 7 objects and 3 styles; all 32: 24 and 8)."""
    if not 1 <= n <= len(BENCHMARK_POOL):
        raise BenchmarkError(f"the benchmark pool has {len(BENCHMARK_POOL)} concepts; ask for 1 to "
                             f"{len(BENCHMARK_POOL)} tasks (got {n})")
    objects, styles = list(BENCHMARK_OBJECTS), list(BENCHMARK_STYLES)
    return [(styles if t % 3 == 2 and styles else objects).pop(0) for t in range(n)]


@lru_cache(maxsize=None)
def _concept(name: str, n_train: int, n_ref: int):
    """A pool concept's renders, built once per process (the reference bank needs the whole pool)."""
    return build_concept(name, n_train=n_train, n_ref=n_ref)


class _Run(Units):
    """One process's share of a run: the concepts, the reference bank, the fixed prompts, and the units."""

    def __init__(self, names: Sequence[str], evaluator, settings: Settings, out_dir: Path, bar, device: str):
        super().__init__(out_dir, bar, device)
        self.names, self.settings, self.evaluator = list(names), settings, evaluator
        self.data = {n: _concept(n, settings.n_train, settings.n_ref) for n in BENCHMARK_POOL}
        self.bank = reference_bank(evaluator, {n: c.reference_images for n, c in self.data.items()})
        self.scenes, self.captions, self.caption_seeds = M.generality_prompts(settings.generality_prompts)
        self.pairs = M.composition_pairs(self.names, settings.n_pairs)

    # ------------------------------------------------------------------ reading
    def read(self, name: str, images) -> dict:
        self.worked = True  # every unit that is not yet done reads something
        s = self.settings
        return M.read_images(self.evaluator, images, self.data[name],
                             class_prompts(self.data[name], s.n_prompts, s.n_seeds), self.bank)

    def draw(self, m, name: str) -> list:
        s = self.settings
        return concept_images(m, name, self.data[name], n_prompts=s.n_prompts, n_seeds=s.n_seeds, steps=s.gen_steps,
                              guidance=s.guidance)

    def generality(self, pipe, drawing: Drawing | None = None) -> dict:
        """Prompt following of the held-out prompts, drawn with every concept of ``drawing`` active (None: the base
        model)."""
        self.worked = True
        s = self.settings
        with drawing.activated(drawing.entries) if drawing else nullcontext():
            images = generate_images(pipe, self.captions, seeds=self.caption_seeds, steps=s.gen_steps,
                                     guidance=s.guidance)
        return M.read_generality(self.evaluator, images, self.scenes)

    def read_pairs(self, draw) -> dict:
        """Every pair drawn by ``draw(scene, (a, b))`` (a list of ``PAIR_IMAGES`` images) and read."""
        out = {}
        for a, b, ground in self.pairs:
            scene = M.pair_scene(a, b, ground)
            refs = {a: self.data[a].reference_images, b: self.data[b].reference_images}
            out[f"{a}+{b}"] = {"background": ground, **M.read_pair(self.evaluator, draw(scene, (a, b)), scene, refs)}
        return out

    def learn(self, m, name: str, method: str, seed: int) -> None:
        c, s = self.data[name], self.settings
        m.learn(name, c.train_images, method=method, class_word=None if c.is_style else c.class_word,
                style=c.is_style, steps=s.steps, seed=seed, progress=False, options=TrainOptions(data_parallel=False),
                **s.overrides.get(method, {}))

    def scored(self, t: int) -> bool:
        """Is every seen concept read after task ``t``?"""
        return (t + 1) % self.settings.score_every == 0 or t == len(self.names) - 1

    # ------------------------------------------------------------------ the units
    def run_base(self) -> dict:
        """Each concept's anchors, the base model's prompt following and the pairs with class words."""
        path = self.out_dir / "base" / PROGRESS
        progress = progress_of(path, "base", self.settings.of_unit("base"), RESULTS_VERSION)
        clock, pipe = Clock(), None
        rows = progress.setdefault("concepts", {})
        for name in self.names:
            if name not in rows:
                pipe = pipe or load_pipeline(self.settings.base).to(self.device)
                self.step(f"base model: {name}")
                rows[name] = self.anchors(pipe, name)
                rows[name].update(clock.lap())
                atomic_write_json(path, progress)
            self.advance()
        if "generality" not in progress:
            pipe = pipe or load_pipeline(self.settings.base).to(self.device)
            progress["generality"] = self.generality(pipe)
            progress["generality_seconds"] = clock.lap()
        pairs = progress.setdefault("composition", {})
        if any(f"{a}+{b}" not in pairs for a, b, _ in self.pairs):
            pipe = pipe or load_pipeline(self.settings.base).to(self.device)
            words = self.read_pairs(lambda scene, ab: self.base_pair(pipe, scene, ab))
            renders = self.read_pairs(lambda scene, ab: M.pair_renders(scene))
            for key in words:
                pairs.setdefault(key, {"class_words": words[key], "renders": renders[key]})
            progress["composition_seconds"] = clock.lap()
        atomic_write_json(path, progress)
        return progress

    def anchors(self, pipe, name: str) -> dict:
        """A concept's class-prompt images drawn by the base model and its renders, read, with their grid."""
        s, c = self.settings, self.data[name]
        low = base_images(pipe, c, n_prompts=s.n_prompts, n_seeds=s.n_seeds, steps=s.gen_steps, guidance=s.guidance)
        high = M.upper_images(c, s.n_prompts, s.n_seeds)
        grid = self.save_grid(self.out_dir / "base" / "grids" / f"{name}.png", grid_row(low) + grid_row(high))
        return {"class_prompt": self.read(name, low), "upper": self.read(name, high), "grid": grid}

    def base_pair(self, pipe, scene, names: tuple[str, str]) -> list:
        s = self.settings
        prompts, seeds = seeded([M.pair_prompt(scene, tuple(self.data[n].class_word for n in names))], M.PAIR_IMAGES)
        return generate_images(pipe, prompts, seeds=seeds, steps=s.gen_steps, guidance=s.guidance)

    def run_sequence(self, method: str, seed: int) -> dict:
        """The task sequence learned with training seed ``seed`` (see the module docstring)."""
        folder = self.out_dir / method / f"seed-{seed}"
        path = folder / PROGRESS
        progress = progress_of(path, "sequence", self.settings.of_unit("sequence", method), RESULTS_VERSION)
        progress.update(method=method, seed=seed)
        tasks: list[dict] = progress.setdefault("tasks", [])
        m = self.open_museum(folder / "museum", self.settings.base)
        have = check_sequence(m, folder / "museum", path, self.names, method, {t["task"] for t in tasks})
        for t, name in enumerate(self.names):
            if t not in {r["task"] for r in tasks}:
                tasks.append(self.task(m, folder, t, name in have, method, seed))
                have.add(name)
                tasks.sort(key=lambda r: r["task"])
                atomic_write_json(path, progress)
            self.advance()
        if [c.name for c in m.concepts] == self.names and progress.get("composition", {}).get("concepts") != self.names:
            clock = Clock()
            progress["composition"] = {"concepts": list(self.names), "pairs": self.museum_pairs(m), **clock.lap()}
            atomic_write_json(path, progress)
        return progress

    def museum_pairs(self, m) -> dict:
        """Every pair drawn from the museum ``m``, each concept named by its phrase, and read."""
        s = self.settings
        return self.read_pairs(lambda scene, ab: m.generate(
            M.pair_prompt(scene, tuple(m.concept(n).phrase for n in ab)), n=M.PAIR_IMAGES, seed=0, steps=s.gen_steps,
            guidance=s.guidance))

    def task(self, m, folder: Path, t: int, learned: bool, method: str, seed: int) -> dict:
        """Learn task ``t`` (unless the museum already holds it) and read what it asks for."""
        name, clock = self.names[t], Clock()
        if not learned:
            self.step(f"{method} seed {seed}: learning {name}")
            self.learn(m, name, method, seed)
        learning = clock.lap() if not learned else None
        self.step(f"{method} seed {seed}: reading after {name}")
        drawn = self.names[:t + 1] if self.scored(t) else [name]
        scores, rows = {}, []
        for j in drawn:
            images = self.draw(m, j)
            scores[j] = self.read(j, images)
            rows += grid_row(images)
        generality = self.generality(m.pipe, Drawing(m)) if self.scored(t) else None
        concept_bytes, state_bytes = storage(m, name)
        info = m.concept(name).info
        return {"task": t, "concept": name, "scored": self.scored(t), "scores": scores, "generality": generality,
                "grid": self.save_grid(folder / "grids" / f"task-{t:02d}.png", rows), "grid_concepts": drawn,
                "train_seconds": info.get("train_seconds"), "steps": info.get("steps"), "learning": learning,
                "reading": clock.lap(), "concept_bytes": concept_bytes, "state_bytes": state_bytes}

    def run_joint(self, method: str, seed: int) -> dict:
        """Every concept learned at once (``Museum.learn_together``; methods with ``Method.joint``) with training
        seed ``seed``, then read as the last task of a sequence is: each concept, generality, the pairs."""
        folder = self.out_dir / method / "joint" / f"seed-{seed}"
        path = folder / PROGRESS
        progress = progress_of(path, "joint", self.settings.of_unit("joint", method), RESULTS_VERSION)
        progress.update(method=method, seed=seed)
        if "scores" not in progress:
            clock, m = Clock(), self.open_museum(folder / "museum", self.settings.base)
            learned = [c.name for c in m.concepts]
            if learned not in ([], self.names):
                raise BenchmarkError(f"{folder / 'museum'} holds {learned}, not this run's concepts; delete {folder}")
            if not learned:
                self.step(f"{method} seed {seed}: learning every concept at once")
                c, s = [self.data[n] for n in self.names], self.settings
                m.learn_together([(x.name, x.train_images, None if x.is_style else x.class_word, x.is_style) for x in c],
                                 method=method, steps=s.steps, seed=seed, progress=False, **s.overrides.get(method, {}))
            progress["learning"] = clock.lap() if not learned else None
            scores, rows = {}, []
            for n in self.names:
                images = self.draw(m, n)
                scores[n], rows = self.read(n, images), rows + grid_row(images)
            progress.update(scores=scores, generality=self.generality(m.pipe, Drawing(m)),
                            composition=self.museum_pairs(m), grid=self.save_grid(folder / "grids" / "all.png", rows),
                            reading=clock.lap())
            atomic_write_json(path, progress)
        for _ in self.names:
            self.advance()
        return progress

    def run_upper_bound(self, method: str, seed: int) -> dict:
        """Each concept learned alone from the base model with training seed ``seed``, and read."""
        folder = self.out_dir / method / "upper" / f"seed-{seed}"
        path = folder / PROGRESS
        progress = progress_of(path, "upper_bound", self.settings.of_unit("upper_bound", method), RESULTS_VERSION)
        progress.update(method=method, seed=seed)
        rows = progress.setdefault("concepts", {})
        for name in self.names:
            if name not in rows:
                clock = Clock()
                m = self.open_museum(folder / name / "museum", self.settings.base)
                learned = name in m.manifest.names()
                if not learned:
                    self.step(f"{method} seed {seed} alone: learning {name}")
                    self.learn(m, name, method, seed)
                learning = clock.lap() if not learned else None
                images = self.draw(m, name)
                concept_bytes, state_bytes = storage(m, name)
                rows[name] = {"scores": self.read(name, images), "learning": learning, "reading": clock.lap(),
                              "train_seconds": m.concept(name).info.get("train_seconds"),
                              "concept_bytes": concept_bytes, "state_bytes": state_bytes,
                              "grid": self.save_grid(folder / "grids" / f"{name}.png", grid_row(images))}
                atomic_write_json(path, progress)
            self.advance()
        return progress


def run_benchmark(methods: Sequence[str], concepts: Sequence[str] | int = 10, out_dir: str | Path = "museum-bench",
                  *, base: str | Path, evaluator, seeds: int = 3, quick: bool = True, steps: int | None = None,
                  method_overrides: dict[str, dict] | None = None, progress: bool = True, upper_bound: bool = True,
                  joint: bool = True, base_row: bool = True, n_prompts: int | None = None, n_seeds: int | None = None,
                  gen_steps: int = 25, guidance: float = 7.5, n_train: int = 5, n_ref: int = 16, score_every: int = 1,
                  generality_prompts: int = GENERALITY_PROMPTS, n_pairs: int = PAIRS, device: str = "cpu") -> dict:
    """Run (or continue) the benchmark on World v2 into ``out_dir``; returns the results (also in
    ``out_dir/results.json``).

    ``concepts``: the task sequence, or how many tasks of :func:`task_sequence`. ``seeds``: training seeds per
    method, per upper bound and per joint oracle (0..seeds-1). ``joint``: also learn every concept at once with
    each method that can (``Method.joint``). ``quick``: 8 prompts x 4 images per concept (full: 24 x 8);
    ``n_prompts`` / ``n_seeds`` override either. ``score_every``: every seen concept is read after every
    ``score_every`` tasks and the last (the new concept after each). ``generality_prompts``: held-out prompts of
    the generality reading; ``n_pairs``: side-by-side pairs read after the last task. ``base``, ``evaluator``: the
    World v2 pipeline folder and evaluator. Other options as in ``museum.evaluation.benchmark.run_benchmark``."""
    out_dir = Path(out_dir)
    names = task_sequence(concepts) if isinstance(concepts, int) else list(concepts)
    _check_request(methods, names, seeds, score_every)
    default_prompts, default_seeds = QUICK if quick else FULL
    evaluator.eval()
    base = str(Path(base).resolve())
    settings = Settings(n_prompts=n_prompts or default_prompts, n_seeds=n_seeds or default_seeds, gen_steps=gen_steps,
                        guidance=guidance, steps=steps, n_train=n_train, n_ref=n_ref, base=base,
                        base_hash=base_hash(base), evaluator=evaluator_fingerprint(evaluator),
                        overrides={k: dict(v) for k, v in (method_overrides or {}).items()}, score_every=score_every,
                        generality_prompts=generality_prompts, n_pairs=n_pairs)
    if min(settings.n_prompts, settings.n_seeds, gen_steps, generality_prompts) < 1:
        raise BenchmarkError("n_prompts, n_seeds, gen_steps and generality_prompts must be at least 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = [(m, k) for m in methods for k in range(seeds)]
    alone = [(m, k) for m, k in pairs if upper_bound and not METHODS[m].independent]  # an independent one: its sequence
    joined = [(m, k) for m, k in pairs if joint and METHODS[m].joint]
    total = len(names) * (len(pairs) + len(alone) + len(joined) + (1 if base_row else 0))
    procs, rank, device = this_process(device)
    with progress_bar(total, progress, procs, rank) as bar:
        run = _Run(names, evaluator, settings, out_dir, bar, device)
        units = [("base", run.run_base)] if base_row else []
        units += [(f"{m}.seed-{k}", lambda m=m, k=k: run.run_sequence(m, k)) for m, k in pairs]
        units += [(f"{m}.upper.seed-{k}", lambda m=m, k=k: run.run_upper_bound(m, k)) for m, k in alone]
        units += [(f"{m}.joint.seed-{k}", lambda m=m, k=k: run.run_joint(m, k)) for m, k in joined]
        run.run_units(units, procs, rank)
    return write_results(out_dir, methods, names, seeds, settings)


def _check_request(methods: Sequence[str], names: Sequence[str], seeds: int, score_every: int) -> None:
    unknown = [m for m in methods if m not in method_names()]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise BenchmarkError(f"name distinct known methods; unknown: {unknown}; available: {', '.join(method_names())}")
    bad = [c for c in names if c not in BENCHMARK_POOL]
    if bad or not names or len(set(names)) != len(names):
        raise BenchmarkError(f"the task sequence must name distinct concepts of World v2's benchmark pool "
                             f"({', '.join(BENCHMARK_POOL)}); got {list(names)}")
    if seeds < 1 or score_every < 1:
        raise BenchmarkError(f"seeds and score_every must be at least 1 (got {seeds} and {score_every})")

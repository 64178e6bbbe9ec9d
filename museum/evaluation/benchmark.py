"""The continual benchmark (METHODS.md, "Continual evaluation protocol").

For each method, an empty museum on the same base model learns the benchmark concepts one
after another (same images, same seeds for every method). After each task t, every concept
seen so far (j <= t) is drawn with fixed prompts and seeds and scored with the evaluator:

* ``image_alignment`` (CLIP-I): mean pairwise cosine against the concept's reference renders;
* ``text_alignment`` (CLIP-T): cosine between each image and its prompt with the concept
  replaced by its class word (``Concept.class_prompts``);
* ``kid``: Kernel Inception Distance to the reference renders in the evaluator's feature
  space (torchmetrics, ``subset_size`` capped by the sample counts); lower is better;
* ``recognition``: the fraction of images whose nearest prototype (mean reference embedding
  of every benchmark concept, plus the mean embedding of plain renders of every base shape)
  is the concept itself.

This fills a lower-triangular matrix R[t][j] per metric (None above the diagonal). From it:
the final average A, forgetting F and backward transfer BWT (``museum.evaluation.metrics``),
oriented so that for every metric F > 0 means "got worse" and BWT < 0 means "later tasks
hurt earlier ones" (for KID, lower is better, so they are computed on -KID).

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

import hashlib
import json
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from museum.errors import MuseumUserError
from museum.evaluation.metrics import backward_transfer, forgetting
from museum.evaluation.protocol import alignment, base_images, class_prompts, concept_images
from museum.generation.sampling import image_grid
from museum.methods import METHODS, method_names
from museum.models.evaluator import to_pixels
from museum.models.loading import base_hash, is_embedded, load_evaluator, load_pipeline
from museum.museum import Museum
from museum.store.atomic import atomic_write_json
from museum.store.lock import claim
from museum.store.manifest import MANIFEST
from museum.training.trainer import TrainOptions, get_accelerator
from museum.world.concepts import BENCHMARK_CONCEPTS, build_concept, concept_names
from museum.world.render import SHAPES, random_scene, render, replace

RESULTS_VERSION = 1
CLAIMS = ".claims"  # one lock file per unit of work (see the module docstring)
RESULTS = "results.json"
PROGRESS = "progress.json"
METRICS = ("image_alignment", "text_alignment", "kid", "recognition")
HIGHER_IS_BETTER = {"image_alignment": True, "text_alignment": True, "kid": False, "recognition": True}
#: (templates, seeds per template) evaluated per concept
QUICK = (8, 4)
FULL = (20, 8)
GRID_IMAGES = 4  # samples per concept (row) in a task's grid: the first template's first seeds
SHAPE_PROTOTYPE_RENDERS = 16
#: gate biases of the gate curve (methods with a swept generation option); Perfusion's own default is 0.7
GATE_BETAS = (0.5, 0.6, 0.7, 0.8, 0.9)


class BenchmarkError(MuseumUserError):
    """A benchmark folder does not fit the run asked for."""


# ============================================================================ metrics


class EvaluatorFeatures(nn.Module):
    """The evaluator's unnormalised image features as an ``nn.Module``: the KID feature extractor."""

    def __init__(self, evaluator):
        super().__init__()
        self.evaluator = evaluator

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.evaluator.image_features(pixels).double()


@torch.no_grad()
def kid(evaluator, generated, references, *, subsets: int = 100, seed: int = 0) -> float | None:
    """KID between two image sets in the evaluator's feature space (None with fewer than 2 of either).

    ``subset_size`` is the smaller set's size (torchmetrics refuses a larger one). The subset
    draws use their own seeded generator, so the value is reproducible. Note the unbiased
    estimator is not 0 for two identical finite sets: it is (2/m) * (mean off-diagonal kernel
    - mean diagonal kernel), slightly negative. Never synchronised across processes (torchmetrics would
    gather every process's features under ``accelerate launch``, where processes score different units)."""
    m = min(len(generated), len(references))
    if m < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer"
        metric = KernelInceptionDistance(feature=EvaluatorFeatures(evaluator), subsets=subsets, subset_size=m,
                                         normalize=True, sync_on_compute=False)  # this process's images only
    metric.update(to_pixels(references), real=True)
    metric.update(to_pixels(generated), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, _ = metric.compute()
    return float(mean)


@dataclass
class Prototypes:
    """Named unit vectors in the evaluator's embedding space; an image is recognised as its nearest one."""

    labels: list[str]
    vectors: torch.Tensor  # (P, D), unit norm

    @torch.no_grad()
    def nearest(self, evaluator, images) -> list[str]:
        emb = evaluator.embed_images(images)
        return [self.labels[i] for i in (emb @ self.vectors.T).argmax(-1).tolist()]

    def accuracy(self, evaluator, images, target: str) -> float:
        if target not in self.labels:
            raise ValueError(f"{target!r} is not among the prototypes {self.labels}")
        found = self.nearest(evaluator, images)
        return float(np.mean([f == target for f in found]))


def shape_renders(shape: str, n: int = SHAPE_PROTOTYPE_RENDERS) -> list:
    """``n`` renders of plain base scenes of ``shape`` (random colour, background, size, position)."""
    rng = random.Random(f"shape-prototype:{shape}")
    scenes = [replace(random_scene(rng, base_styles=False), shape=shape, pattern="plain") for _ in range(n)]
    base = int(hashlib.sha256(shape.encode()).hexdigest()[:6], 16) * 1000
    return [render(s, base + i) for i, s in enumerate(scenes)]


@torch.no_grad()
def build_prototypes(evaluator, concepts: dict[str, Sequence], shapes: Sequence[str] | None = None) -> Prototypes:
    """Prototypes: each concept's mean reference embedding (``concepts``: name -> reference images), and
    ``shape:<s>`` for every base shape (mean embedding of :func:`shape_renders`)."""
    shapes = SHAPES if shapes is None else shapes
    labels, vectors = [], []
    for name, refs in concepts.items():
        labels.append(name)
        vectors.append(evaluator.embed_images(list(refs)).mean(0))
    for s in shapes:
        labels.append(f"shape:{s}")
        vectors.append(evaluator.embed_images(shape_renders(s)).mean(0))
    return Prototypes(labels, torch.nn.functional.normalize(torch.stack(vectors), dim=-1))


def score_images(evaluator, images, concept, prompts: Sequence[str], prototypes: Prototypes) -> dict:
    """Every metric of one concept's generated ``images`` (``prompts[i]``, a class prompt, goes with image i): the
    protocol's alignments (``protocol.alignment``), KID and shape recognition."""
    aligned = alignment(evaluator, images, concept, list(prompts))
    return {
        "image_alignment": aligned.image_alignment,
        "text_alignment": aligned.text_alignment,
        "kid": kid(evaluator, images, concept.reference_images),
        "recognition": prototypes.accuracy(evaluator, images, concept.name),
        "n_images": aligned.n_images,
    }


def summarize(R: Sequence[Sequence[float | None]], higher_is_better: bool = True) -> dict:
    """A, F and BWT of a lower-triangular matrix (None above the diagonal and for missing values);
    F and BWT are computed on -R when lower is better, so their sign means the same for every metric."""
    if not R:
        return {"A": None, "F": None, "BWT": None}
    arr = np.array([[np.nan if v is None else v for v in row] for row in R], dtype=float)
    final = arr[-1][~np.isnan(arr[-1])]
    sign = 1.0 if higher_is_better else -1.0
    return {"A": float(final.mean()) if final.size else None,
            "F": _finite(forgetting(sign * arr)), "BWT": _finite(backward_transfer(sign * arr))}


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def curves(R: Sequence[Sequence[float | None]], higher_is_better: bool = True) -> dict[str, list]:
    """Average over seen concepts and forgetting after every task t (for the report's plot)."""
    sign = 1.0 if higher_is_better else -1.0
    arr = np.array([[np.nan if v is None else v for v in row] for row in R], dtype=float)
    avg, fgt = [], []
    for t in range(len(arr)):
        row = arr[t, :t + 1]
        avg.append(_finite(np.nanmean(row)) if np.isfinite(row).any() else None)
        fgt.append(_finite(forgetting(sign * arr[:t + 1, :t + 1])))
    return {"average": avg, "forgetting": fgt}


# ============================================================================ the run


@dataclass
class Settings:
    """What a benchmark folder's results depend on; a rerun must use the same (or it is refused)."""

    n_prompts: int
    n_seeds: int
    gen_steps: int
    guidance: float
    steps: int | None
    seed: int
    n_train: int
    n_ref: int
    base: str
    base_hash: str
    evaluator: str  # fingerprint of the evaluator's weights
    overrides: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def grid_row(images: Sequence, n: int = GRID_IMAGES) -> list:
    """The first ``n`` of a concept's images, padded with white ones so the concept fills exactly one grid row."""
    row = list(images[:n])
    return row + [Image.new("RGB", row[0].size, "white") for _ in range(n - len(row))]


def evaluator_fingerprint(evaluator) -> str:
    digest = hashlib.sha256()
    for k, v in sorted(evaluator.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_settings(path: Path, stored: dict, current: dict) -> None:
    # the base model is identified by its hash; the path it was given by may differ between runs
    diff = {k: (stored.get(k), v) for k, v in current.items() if k != "base" and stored.get(k) != v}
    if diff:
        what = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise BenchmarkError(f"{path} was made with other settings ({what}); rerun with the same settings "
                             f"to continue it, or choose another output folder")


def _storage(m, name: str) -> tuple[int, int]:
    """(bytes of the concept's .safetensors, bytes of its method's shared state file now)."""
    c = m.concept(name)
    concept_bytes = sum(p.stat().st_size for p in c.path.glob("*.safetensors"))
    record = m.manifest.state.get(c.method)
    state_bytes = (m.folder / record["file"]).stat().st_size if record else 0
    return concept_bytes, state_bytes


class _Run:
    """One benchmark run: shared data (concepts, prototypes, prompts) and the scoring of images."""

    def __init__(self, concepts, evaluator, settings: Settings, out_dir: Path, bar, device: str = "cpu"):
        self.device = device
        self.worked = False
        self.names = list(concepts)
        self.settings = settings
        self.out_dir = out_dir
        self.evaluator = evaluator
        self.bar = bar
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

    def step(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60])

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def open_museum(self, folder: Path, base: str):
        m = Museum.open(folder) if (folder / MANIFEST).is_file() else Museum.init(folder, base=base)
        return m.to(self.device) if self.device != "cpu" else m

    def progress_of(self, path: Path, kind: str, settings: dict) -> dict:
        if path.is_file():
            progress = json.loads(path.read_text())
            _check_settings(path, progress.get("settings", {}), settings)
            return progress
        return {"version": RESULTS_VERSION, "kind": kind, "settings": settings}

    # ------------------------------------------------------------------ a method, task after task
    def run_method(self, method: str) -> dict:
        folder = self.out_dir / method
        path = folder / PROGRESS
        settings = {**self.settings.to_dict(), "overrides": self.settings.overrides.get(method, {})}
        progress = self.progress_of(path, "method", settings)
        progress["method"] = method
        tasks: list[dict] = progress.setdefault("tasks", [])
        done = {t["task"] for t in tasks}
        m = self.open_museum(folder / "museum", self.settings.base)
        have = [c.name for c in m.concepts]
        n = min(len(have), len(self.names))  # a longer or a shorter run of the same sequence continues it
        if have[:n] != self.names[:n]:
            raise BenchmarkError(f"{folder / 'museum'} holds concepts {have}, another task sequence than this run's "
                                 f"({self.names}); choose another output folder")
        wrong = [c.name for c in m.concepts if c.method != method]
        if wrong:
            raise BenchmarkError(f"{folder / 'museum'}: concepts {wrong} were learned with another method")
        for t, name in enumerate(self.names):
            if t in done:
                if name not in have:
                    raise BenchmarkError(f"{path} has scores of task {t} ({name}) but the museum in {folder / 'museum'} "
                                         f"does not hold {name}; delete {folder} and rerun to redo this method")
                self.advance()
                continue
            if len(have) > t + 1:
                raise BenchmarkError(f"{path} lacks the scores of task {t} ({name}), but the museum has already "
                                     f"learned later concepts, so they cannot be measured any more; delete {folder} "
                                     f"and rerun to redo this method")
            wall = None
            if name not in have:
                self.step(f"{method}: learning {name}")
                wall = self.learn(m, name, method)
                have.append(name)
            self.step(f"{method}: scoring after {name}")
            scores, grid_rows = {}, []
            for j in self.names[:t + 1]:
                images = self.generate(m, j)
                scores[j] = self.score(j, images)
                grid_rows.extend(grid_row(images))
            grid = folder / "grids" / f"task-{t:02d}.png"
            grid.parent.mkdir(parents=True, exist_ok=True)
            image_grid(grid_rows, cols=GRID_IMAGES, scale=2).save(grid)
            concept_bytes, state_bytes = _storage(m, name)
            info = m.concept(name).info
            tasks.append({"task": t, "concept": name, "scores": scores,
                          "train_seconds": info.get("train_seconds"), "learn_wall_seconds": wall,
                          "steps": info.get("steps"), "concept_bytes": concept_bytes, "state_bytes": state_bytes,
                          "grid": str(grid.relative_to(self.out_dir))})
            tasks.sort(key=lambda r: r["task"])
            atomic_write_json(path, progress)
            self.advance()
        return progress

    # ------------------------------------------------------------------ the gate curve
    def run_gate_curve(self, method: str, betas: Sequence[float]) -> dict:
        """Score every concept of the finished run at each gate bias (see the module docstring)."""
        folder = self.out_dir / method
        path = folder / PROGRESS
        settings = {**self.settings.to_dict(), "overrides": self.settings.overrides.get(method, {})}
        progress = self.progress_of(path, "method", settings)
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
        settings = {**self.settings.to_dict(), "overrides": self.settings.overrides.get(method, {})}
        progress = self.progress_of(path, "upper_bound", settings)
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
                concept_bytes, state_bytes = _storage(m, name)
                images = self.generate(m, name)
                grid = folder / "grids" / f"{name}.png"
                grid.parent.mkdir(parents=True, exist_ok=True)
                image_grid(grid_row(images), cols=GRID_IMAGES, scale=2).save(grid)
                rows[name] = {"scores": self.score(name, images),
                              "train_seconds": m.concept(name).info.get("train_seconds"), "learn_wall_seconds": wall,
                              "concept_bytes": concept_bytes, "state_bytes": state_bytes,
                              "grid": str(grid.relative_to(self.out_dir))}
                atomic_write_json(path, progress)
            self.advance()
        return progress

    # ------------------------------------------------------------------ the untrained base model
    def run_base(self) -> dict:
        folder = self.out_dir / "base"
        path = folder / PROGRESS
        settings = {k: v for k, v in self.settings.to_dict().items() if k not in ("steps", "overrides")}
        progress = self.progress_of(path, "base", settings)
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
            grid = folder / "grids" / f"{name}.png"
            grid.parent.mkdir(parents=True, exist_ok=True)
            image_grid(grid_row(images), cols=GRID_IMAGES, scale=2).save(grid)
            rows[name] = {"scores": self.score(name, images), "grid": str(grid.relative_to(self.out_dir))}
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
    accelerator = get_accelerator()
    procs, rank = accelerator.num_processes, accelerator.process_index
    if device == "cuda" and procs > 1:
        device = f"cuda:{accelerator.local_process_index}"
    desc = "benchmark" if procs == 1 else f"benchmark [process {rank + 1}/{procs}]"
    with tqdm(total=total, desc=desc, unit="task", disable=not progress, position=rank) as bar:
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
        held_elsewhere = []
        for unit, work in units:
            with claim(out_dir / CLAIMS / f"{unit}.lock", wait=False) as mine:
                if mine:
                    run.worked = False
                    work()
                    if procs > 1 and run.worked:
                        tqdm.write(f"process {rank + 1}/{procs} ran {unit}")
                else:
                    held_elsewhere.append((unit, work))
        for unit, work in held_elsewhere:  # wait for them; rerunning a finished unit only reads its progress
            run.step(f"waiting for {unit} (another process)")
            with claim(out_dir / CLAIMS / f"{unit}.lock", wait=True):
                work()
    return write_results(out_dir, methods, concepts, settings)


# ============================================================================ results.json


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


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
    points = []
    for p in sorted(curve["points"].values(), key=lambda p: p["beta"]):
        mean = {}
        for metric in METRICS:
            vals = [s[metric] for s in p["scores"].values() if s.get(metric) is not None]
            mean[metric] = float(np.mean(vals)) if vals else None
        points.append({"beta": p["beta"], "mean": mean, "scores": p["scores"],
                       "from_final_row": p.get("from_final_row", False)})
    return {"tau": curve.get("tau"), "points": points}


def _row_results(rows: dict, concepts: Sequence[str]) -> dict:
    """Per-concept scores (base model or upper bound) and their means over the concepts present."""
    present = [c for c in concepts if c in rows]
    mean = {}
    for metric in METRICS:
        vals = [rows[c]["scores"][metric] for c in present if rows[c]["scores"].get(metric) is not None]
        mean[metric] = float(np.mean(vals)) if vals else None
    out = {"concepts": present, "scores": {c: rows[c]["scores"] for c in present}, "mean": mean}
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
        progress = _read(out_dir / method / PROGRESS)
        if progress is None:
            continue
        seq = list(concepts) if concepts is not None else [t["concept"] for t in progress.get("tasks", [])]
        results["methods"][method] = method_results(progress, seq)
        results["concepts"] = results["concepts"] or seq
        results["settings"] = results["settings"] or {k: v for k, v in progress["settings"].items() if k != "overrides"}
        upper = _read(out_dir / method / "upper" / PROGRESS)
        if upper is not None:
            results["upper_bound"][method] = _row_results(upper.get("concepts", {}), seq)
    seq = list(concepts) if concepts is not None else results["concepts"] or []
    base = _read(out_dir / "base" / PROGRESS)
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
    path = Path(out_dir) / RESULTS
    results = _read(path)
    if results is None:
        raise BenchmarkError(f"no benchmark results at {path}; run `museum bench --out {out_dir}` first")
    if results.get("version") != RESULTS_VERSION:
        raise BenchmarkError(f"{path} has version {results.get('version')}; this museum reads version {RESULTS_VERSION}")
    return results


__all__ = [
    "run_benchmark", "collect_results", "write_results", "read_results", "kid", "build_prototypes", "Prototypes",
    "score_images", "summarize", "curves", "shape_renders", "EvaluatorFeatures", "BenchmarkError", "METRICS",
    "HIGHER_IS_BETTER", "RESULTS_VERSION", "QUICK", "FULL", "GATE_BETAS", "gate_curve_results",
]

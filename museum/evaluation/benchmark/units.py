"""What every benchmark run shares, whichever world it measures: the units of work (claimed with an ``flock`` so
that several processes share them), each unit's ``progress.json`` (its settings and every score it has, the point
a rerun continues from), the sample grids, the storage and time a unit spends.

A unit is a named piece of work (the base row, one method's task sequence, its upper bound, ...). Each process
takes the next unit nobody holds (``.claims/<unit>.lock``) and runs it alone (no data parallelism, no
collectives); it then waits for the units others hold and finishes any that a dead process left. Every unit has
its own seeds, so the results do not depend on who ran what.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from PIL import Image
from tqdm.auto import tqdm

from museum.errors import MuseumUserError
from museum.generation.sampling import image_grid
from museum.museum import Museum
from museum.store.lock import claim
from museum.store.manifest import MANIFEST
from museum.training.trainer import get_accelerator

CLAIMS = ".claims"  # one lock file per unit of work
PROGRESS = "progress.json"
RESULTS = "results.json"
GRID_IMAGES = 4  # samples per concept (row) in a grid: the first template's first seeds


class BenchmarkError(MuseumUserError):
    """A benchmark folder does not fit the run asked for."""


@dataclass
class RunSettings:
    """What a benchmark folder's results depend on; a rerun must use the same (or it is refused). Each world's
    ``Settings`` adds its own."""

    n_prompts: int
    n_seeds: int
    gen_steps: int
    guidance: float
    steps: int | None
    n_train: int
    n_ref: int
    base: str
    base_hash: str
    evaluator: str  # fingerprint of the evaluator's weights
    overrides: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_results_file(out_dir: str | Path, version: int, command: str) -> dict:
    """``out_dir/results.json``, refused when missing (``command`` makes it) or of another version."""
    path = Path(out_dir) / RESULTS
    results = read_json(path)
    if results is None:
        raise BenchmarkError(f"no benchmark results at {path}; run `{command} --out {out_dir}` first")
    if results.get("version") != version:
        raise BenchmarkError(f"{path} has version {results.get('version')}; this reader reads version {version}")
    return results


def this_process(device: str) -> tuple[int, int, str]:
    """(processes, this one's index, its device) under ``accelerate launch`` (1, 0, ``device`` alone): "cuda" with
    several processes means each process's own GPU."""
    accelerator = get_accelerator()
    procs, rank = accelerator.num_processes, accelerator.process_index
    if device == "cuda" and procs > 1:
        device = f"cuda:{accelerator.local_process_index}"
    return procs, rank, device


def progress_of(path: Path, kind: str, settings: dict, version: int) -> dict:
    """A unit's progress file, or a new one; refused when it was made with other ``settings``."""
    progress = read_json(path)
    if progress is not None:
        _check_settings(path, progress.get("settings", {}), settings)
        return progress
    return {"version": version, "kind": kind, "settings": settings}


def _check_settings(path: Path, stored: dict, current: dict) -> None:
    # the base model is identified by its hash; the path it was given by may differ between runs
    diff = {k: (stored.get(k), v) for k, v in current.items() if k != "base" and stored.get(k) != v}
    if diff:
        what = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise BenchmarkError(f"{path} was made with other settings ({what}); rerun with the same settings "
                             f"to continue it, or choose another output folder")


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


def storage(m, name: str) -> tuple[int, int]:
    """(bytes of the concept's .safetensors, bytes of its method's shared state file now)."""
    c = m.concept(name)
    concept_bytes = sum(p.stat().st_size for p in c.path.glob("*.safetensors"))
    record = m.manifest.state.get(c.method)
    state_bytes = (m.folder / record["file"]).stat().st_size if record else 0
    return concept_bytes, state_bytes


def check_sequence(m, museum_dir: Path, path: Path, names: Sequence[str], method: str, done: set[int]) -> set[str]:
    """The concepts the museum ``m`` holds, checked against the task sequence ``names`` and the tasks whose scores
    ``path`` already has (``done``); a museum that cannot continue this run is refused, saying what to do."""
    have = [c.name for c in m.concepts]
    n = min(len(have), len(names))  # a longer or a shorter run of the same sequence continues it
    if have[:n] != list(names[:n]):
        raise BenchmarkError(f"{museum_dir} holds concepts {have}, another task sequence than this run's "
                             f"({list(names)}); choose another output folder")
    wrong = [c.name for c in m.concepts if c.method != method]
    if wrong:
        raise BenchmarkError(f"{museum_dir}: concepts {wrong} were learned with another method")
    for t, name in enumerate(names):
        if t in done and name not in have:
            raise BenchmarkError(f"{path} has scores of task {t} ({name}) but the museum in {museum_dir} does not "
                                 f"hold {name}; delete {museum_dir.parent} and rerun to redo this method")
        if t not in done and len(have) > t + 1:
            raise BenchmarkError(f"{path} lacks the scores of task {t} ({name}), but the museum has already learned "
                                 f"later concepts, so they cannot be measured any more; delete {museum_dir.parent} "
                                 f"and rerun to redo this method")
    return set(have)


class Clock:
    """Wall and CPU seconds (this process's, all its threads: ``time.process_time``) since it started or was last
    read; what the docs quote as what a run took."""

    def __init__(self):
        self.wall, self.cpu = time.time(), time.process_time()

    def lap(self) -> dict[str, float]:
        wall, cpu = time.time(), time.process_time()
        out = {"wall_seconds": wall - self.wall, "cpu_seconds": cpu - self.cpu}
        self.wall, self.cpu = wall, cpu
        return out


class Units:
    """One process's share of a benchmark run into ``out_dir``: a progress bar, the device it draws on, and the
    units of work it claims (:meth:`run_units`)."""

    def __init__(self, out_dir: Path, bar, device: str = "cpu"):
        self.out_dir, self.bar, self.device = out_dir, bar, device
        self.worked = False  # set by a unit that computed something (not only read its progress back)

    def step(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60])

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def open_museum(self, folder: Path, base: str):
        m = Museum.open(folder) if (folder / MANIFEST).is_file() else Museum.init(folder, base=base)
        return m.to(self.device) if self.device != "cpu" else m

    def save_grid(self, path: Path, images: list) -> str:
        """Write a grid of ``images`` (rows of ``GRID_IMAGES``) to ``path``; its path in ``out_dir``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, cols=GRID_IMAGES, scale=2).save(path)
        return str(path.relative_to(self.out_dir))

    def run_units(self, units: list[tuple[str, Callable[[], object]]], procs: int, rank: int) -> None:
        """Run every unit (name, work) this process can claim, then wait for the ones other processes hold and
        finish any a dead process left (rerunning a finished unit only reads its progress)."""
        held_elsewhere = []
        for unit, work in units:
            with claim(self.out_dir / CLAIMS / f"{unit}.lock", wait=False) as mine:
                if mine:
                    self.worked = False
                    work()
                    if procs > 1 and self.worked:
                        tqdm.write(f"process {rank + 1}/{procs} ran {unit}")
                else:
                    held_elsewhere.append((unit, work))
        for unit, work in held_elsewhere:
            self.step(f"waiting for {unit} (another process)")
            with claim(self.out_dir / CLAIMS / f"{unit}.lock", wait=True):
                work()


@contextmanager
def progress_bar(total: int, enabled: bool, procs: int, rank: int) -> Iterator:
    """The run's bar, one line per process under ``accelerate launch``."""
    desc = "benchmark" if procs == 1 else f"benchmark [process {rank + 1}/{procs}]"
    with tqdm(total=total, desc=desc, unit="task", disable=not enabled, position=rank) as bar:
        yield bar

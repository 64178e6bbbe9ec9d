"""What the studio does, without the page: learning jobs (one per browser session, in a thread, with progress, cancel
and a turn at the museum's writer lock), uploads, the concept table, drawing, export and the benchmark report.

Everything goes through ``Museum`` as the CLI does, so the studio checks what the CLI checks (the images, the name,
the method's settings) and commits as it commits (writer lock, atomic writes): an error leaves the museum as it was.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image

from museum.errors import ImageFolderError, MuseumError, MuseumLockedError, MuseumUserError
from museum.methods.base import METHODS, GenerationOption, get_method, method_names
from museum.museum import Concept, Museum
from museum.report.benchmark_report import write_report
from museum.store.manifest import Manifest

#: how many images the studio takes for one concept (the few-shot setting every method is tuned for)
MIN_IMAGES, MAX_IMAGES = 3, 10
#: how often a learner that waits for the writer lock tries again (seconds)
LOCK_POLL = 1.0
PREPARING = "preparing: reading the images, loading the model, setting the method up"
WAITING = ("waiting for the other learner: another learning run (in another browser tab, or a `museum learn`) is "
           "writing this museum; this one starts as soon as it finishes")


class Cancelled(Exception):
    """Raised from the training loop's step callback when the user cancels: the run stops, nothing is committed."""


@dataclass
class LearnRequest:
    """What the Learn tab asks for: uploaded image files, the concept's name, what it is, the method and its steps."""

    name: str
    files: Sequence[str | Path]
    method: str
    steps: int
    class_word: str | None = None
    style: bool = False


@dataclass
class LearnStatus:
    """Where a learning job is: "waiting" (for the writer lock), "preparing", "training" ("cancelling" once asked to),
    then "done", "failed" or "cancelled"."""

    state: str
    message: str = ""
    name: str = ""  # the concept's
    step: int = 0
    total: int = 0
    loss: float | None = None
    seconds_left: float | None = None
    notes: list[str] = field(default_factory=list)  # what the trainer prints before training (memory estimate)
    concept: Concept | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


def stage_uploads(files: Sequence[str | Path], folder: Path) -> Path:
    """The uploaded ``files`` copied into the new ``folder`` under their own names, for ``Museum.learn`` to read and
    check as it reads any concept folder; refused unless there are ``MIN_IMAGES``-``MAX_IMAGES`` of them (hidden
    files, which a concept folder ignores, not counted)."""
    files = [Path(f) for f in files if not Path(f).name.startswith(".")]
    if not MIN_IMAGES <= len(files) <= MAX_IMAGES:
        raise ImageFolderError(f"{len(files)} file(s) given: a concept is learned from {MIN_IMAGES}-{MAX_IMAGES} "
                               f"images of it; {'add' if len(files) < MIN_IMAGES else 'remove'} some")
    folder.mkdir(parents=True)
    for i, file in enumerate(files):
        target = folder / file.name
        if target.exists():  # two uploads of the same name, from different folders
            target = folder / f"{i:02d}-{file.name}"
        shutil.copyfile(file, target)
    return folder


class LearnJob:
    """One concept learned in a thread; :meth:`statuses` follows it. Waits its turn when another writer holds the
    museum's lock (trying again every ``LOCK_POLL`` seconds, so that Cancel works while it waits)."""

    def __init__(self, folder: Path, request: LearnRequest, scratch: Path):
        self.folder, self.request, self.scratch = Path(folder), request, scratch
        self._cancel = threading.Event()
        self._finished = threading.Event()  # set just before the final status is posted
        self._updates: queue.Queue[LearnStatus] = queue.Queue()
        self._notes: list[str] = []
        self._first: tuple[float, int] | None = None  # (time, step) of the first step's end
        self._thread = threading.Thread(target=self._run, name=f"learn-{request.name}", daemon=True)

    def start(self) -> "LearnJob":
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._finished.is_set()

    def statuses(self) -> Iterator[LearnStatus]:
        """The job's statuses as they come (the latest of a burst), ending with its final one."""
        while True:
            status = self._updates.get()
            while not status.finished and not self._updates.empty():
                status = self._updates.get()
            yield status
            if status.finished:
                return

    def _post(self, state: str, message: str = "", **values) -> None:
        self._updates.put(LearnStatus(state, message, self.request.name, total=self.request.steps,
                                      notes=list(self._notes), **values))

    def _run(self) -> None:
        staged = self.scratch / "images"
        try:
            images = stage_uploads(self.request.files, staged)
            concept = self._learn(images)
            final = ("done", f"learned {concept.name} with {concept.method} in {concept.info['train_seconds']:.0f} s "
                             f"({concept.info['steps']} steps); use it as \"{concept.phrase}\"",
                     dict(step=self.request.steps, concept=concept))
        except Cancelled:
            final = ("cancelled", "cancelled: nothing was learned, the museum is as it was", {})
        except MuseumUserError as err:  # the images' names, not the scratch folder they were copied to
            final = ("failed", str(err).replace(f"{staged}{os.sep}", "").replace(str(staged), "the upload"), {})
        except Exception as err:  # a bug, not the user's: the message in the page, the traceback in the server's log
            traceback.print_exc()
            final = ("failed", f"{type(err).__name__}: {err} (the museum is as it was; see the server's log)", {})
        shutil.rmtree(self.scratch, ignore_errors=True)
        self._finished.set()
        self._post(final[0], final[1], **final[2])

    def _learn(self, images: Path) -> Concept:
        r = self.request
        self._post("preparing", PREPARING)
        while True:
            try:
                return Museum.open(self.folder).learn(
                    r.name, images, method=r.method, class_word=r.class_word, style=r.style, steps=r.steps,
                    progress=False, on_step=self._on_step, echo=self._note)
            except MuseumLockedError:  # still "waiting" after the lock is free, until the trainer's first note
                self._post("waiting", WAITING)
                if self._cancel.wait(LOCK_POLL):
                    raise Cancelled from None

    def _note(self, line: str) -> None:
        """What the trainer says before its first step (the memory estimate)."""
        self._notes.append(line)
        self._post("preparing", PREPARING)

    def _on_step(self, step: int, loss: float) -> None:
        if self._cancel.is_set():
            raise Cancelled
        now = time.monotonic()
        if self._first is None:
            self._first = (now, step)
        t0, s0 = self._first
        left = (now - t0) / (step - s0) * (self.request.steps - step) if step > s0 else None
        self._post("training", f"step {step}/{self.request.steps}", step=step, loss=loss, seconds_left=left)


@dataclass(frozen=True)
class Knob:
    """A generation setting the Generate tab offers: a method's ``GenerationOption``, for one concept when the option
    is per concept (Perfusion's strength)."""

    method: str
    option: GenerationOption
    concept: str | None = None

    @property
    def label(self) -> str:
        return f"{self.option.name} of {self.concept}" if self.concept else f"{self.option.name} ({self.method})"


def knobs(concepts: Sequence[dict]) -> list[Knob]:
    """The generation options of the methods the museum's ``concepts`` (``Studio.catalog``) were learned with."""
    method_names()
    out = []
    for method in dict.fromkeys(c["method"] for c in concepts):
        for option in METHODS[method].generation_options if method in METHODS else ():
            if option.per_concept:
                out += [Knob(method, option, c["name"]) for c in concepts if c["method"] == method]
            else:
                out.append(Knob(method, option))
    return out


def knob_options(chosen: Sequence[Knob], values: Sequence[str | None]) -> dict:
    """``Museum.generate``'s ``options`` from the page's fields for ``chosen`` (empty: the method's default)."""
    options: dict = {}
    for knob, text in zip(chosen, values):
        if text is None or not str(text).strip():
            continue
        try:
            value = float(text)
        except ValueError:
            raise MuseumError(f"{knob.label}: {text!r} is not a number; leave it empty for the method's "
                              "default") from None
        if knob.concept:
            options.setdefault(knob.option.name, {})[knob.concept] = value
        else:
            options[knob.option.name] = value
    return options


def size_text(n: int) -> str:
    for unit in ("bytes", "KB", "MB"):
        if n < 1024 or unit == "MB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def concept_row(c: Concept) -> list:
    """A concept as the Museum tab's table shows it."""
    cls = METHODS.get(c.method)
    removable = "yes" if cls is not None and cls.removable else "no"
    return [c.task_index, c.name, c.phrase, c.method, c.class_word, c.info.get("steps", ""),
            round(c.info.get("train_seconds", 0)), size_text(c.size), removable]


def sample_image(c: Concept) -> Image.Image | None:
    """The sample grid drawn when ``c`` was learned (None when a writer removed it this moment, or it is damaged:
    `museum list` names damaged concepts)."""
    try:
        with Image.open(c.path / "sample.png") as image:
            return image.convert("RGB")
    except OSError:
        return None


CONCEPT_HEADERS = ["#", "name", "use as", "method", "class", "steps", "seconds", "size", "removable"]


def bench_report(folder: str) -> str:
    """The HTML of a ``museum bench`` folder's report, written from its results.json as ``museum report`` does."""
    if not folder or not folder.strip():
        raise MuseumError("enter the folder a `museum bench --out FOLDER` run wrote")
    return write_report(Path(folder.strip()).expanduser()).read_text()


class Studio:
    """One museum folder served to every browser tab: a reader museum kept current with the manifest on disk (drawing
    and export share its pipeline, one at a time), one learning job per browser session, and a scratch folder for
    uploads and exports (removed by :meth:`close`)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.family = Museum.open(self.folder).family  # a clear error now when DIR is not a museum
        self.scratch = Path(tempfile.mkdtemp(prefix="museum-studio-"))
        self.jobs: dict[str, LearnJob] = {}
        self._reader: Museum | None = None
        self._reader_lock = threading.Lock()

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    @contextmanager
    def reader(self) -> Iterator[Museum]:
        """The museum as it is on disk now (reopened after a commit), held by one caller at a time."""
        with self._reader_lock:
            manifest = Manifest.read(self.folder)
            if self._reader is None or self._reader.manifest.to_json() != manifest.to_json():
                self._reader = Museum(self.folder, manifest)
            yield self._reader

    # ---------------------------------------------------------------- the museum's concepts
    def concepts(self) -> list[Concept]:
        return Museum.open(self.folder).concepts

    def catalog(self) -> list[dict]:
        """Each concept's name, phrase and method: what the Generate tab builds its buttons and knobs from."""
        return [{"name": c.name, "phrase": c.phrase, "method": c.method} for c in self.concepts()]

    def remove(self, name: str) -> str:
        if not name:
            raise MuseumError("choose the concept to remove")
        try:
            Museum.open(self.folder).remove(name)
        except MuseumLockedError:
            raise MuseumError("the museum is being written (a concept is being learned); remove the concept when "
                              "that has finished") from None
        return f"removed {name}"

    def export_zip(self, name: str, format: str = "diffusers") -> Path:
        """A zip of the folder ``Museum.export`` writes for concept ``name`` in ``format`` (every file in it)."""
        if not name:
            raise MuseumError("choose the concept to export")
        out = Path(tempfile.mkdtemp(dir=self.scratch))
        with self.reader() as m:
            folder = m.export(name, out / name, format)
        return Path(shutil.make_archive(str(out / f"{name}-export"), "zip", folder))

    # ---------------------------------------------------------------- methods, learning, drawing
    def method_defaults(self, method: str) -> dict:
        """The method's settings on this museum's base model (Stable Diffusion bases get the papers' settings)."""
        return get_method(method, family=self.family).config.to_dict()

    def learn(self, session: str, request: LearnRequest) -> LearnJob:
        """Start learning ``request`` for a browser ``session`` (one job at a time per session)."""
        job = self.jobs.get(session)
        if job is not None and job.running:
            raise MuseumError(f"this page is already learning {job.request.name!r}; wait for it, or cancel it")
        self.jobs[session] = job = LearnJob(self.folder, request, Path(tempfile.mkdtemp(dir=self.scratch)))
        return job.start()

    def cancel(self, session: str) -> LearnJob | None:
        """Cancel the session's running job (it stops after its current step); None when none runs."""
        job = self.jobs.get(session)
        if job is None or not job.running:
            return None
        job.cancel()
        return job

    def generate(self, prompt: str, *, n: int, seed: int, steps: int, guidance: float,
                 options: dict | None = None) -> list[tuple[Image.Image, str]]:
        """``n`` images of ``prompt`` (seeds ``seed``...), each captioned with its seed and prompt."""
        with self.reader() as m:
            images = m.generate(prompt, n=n, seed=seed, steps=steps, guidance=guidance, options=options)
        return [(image, f"seed {seed + k}: {prompt}") for k, image in enumerate(images)]

"""Learning one concept into a museum (``Museum.learn`` checks the request, then hands it to
:class:`LearningSession`): the writer lock, the handshake of a data-parallel run, the checkpoints and what they
must match to be resumed, training (``museum.training``), and the commit, a new concept folder and state file
written atomically and then one rename of ``museum.json`` (docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from contextlib import nullcontext

import torch
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file

from museum.drawing import Drawing
from museum.errors import MuseumError, TrainingDivergedError
from museum.generation.sampling import image_grid
from museum.methods.base import ConceptInfo, Method
from museum.plumbing.objectives import concept_prompt
from museum.store.atomic import atomic_dir, atomic_write_bytes, remove_leftovers
from museum.store.faults import fault_point
from museum.store.lock import writer_lock
from museum.store.manifest import TENSORS, ConceptEntry, Manifest, remove_unreferenced, sha256_file
from museum.training.trainer import (
    Checkpointer, LearnResult, TrainOptions, get_accelerator, train_concept, train_together,
)


class LearningSession:
    """One concept learned into ``museum`` (a ``museum.museum.Museum``) with ``method``. Under ``accelerate
    launch`` several processes train it together (data parallel): the main process holds the writer lock, cleans,
    checkpoints and commits; the others only train, and every process learns whether the others got ready."""

    def __init__(self, museum, method: Method, name: str, class_word: str, style: bool, images: list,
                 image_hashes: list[str], *, resume: bool, wait: bool, progress: bool, checkpoint_every: int | None,
                 options: TrainOptions | None, echo, on_step=None):
        self.museum, self.method, self.name, self.class_word, self.style = museum, method, name, class_word, style
        self.images, self.image_hashes = images, image_hashes
        self.resume, self.wait, self.progress, self.checkpoint_every = resume, wait, progress, checkpoint_every
        self.options, self.echo, self.on_step = options, echo, on_step
        self.accelerator = get_accelerator(options.mixed_precision if options else None)
        self.multi = self.accelerator.num_processes > 1 and (options is None or options.data_parallel)
        self.main = self.accelerator.is_main_process or not self.multi
        self.work = museum.folder / "work" / name
        self.image_sha256 = {name: image_hashes}

    def run(self) -> bool:
        """Learn and commit; True in the process that committed (False in the other processes of a run)."""
        agreed = False
        try:
            with writer_lock(self.museum.folder, wait=self.wait) if self.main else nullcontext():
                info, earlier, checkpoints = self._prepare()
                if self.multi:
                    agreed = True
                    if not _all_agree(self.accelerator, True):
                        raise MuseumError("another process of this data-parallel run failed before training (see "
                                          "its error); nothing was learned")
                if not self._train_and_commit(info, earlier, checkpoints):
                    return False
                shutil.rmtree(self.work, ignore_errors=True)
                fault_point("learn.done")
        except BaseException:
            if self.multi and not agreed:  # tell the other processes, which wait for this one
                _all_agree(self.accelerator, False)
            raise
        return True

    def _prepare(self) -> tuple[ConceptInfo, list[ConceptInfo], Checkpointer]:
        """Under the lock: the current manifest, what a killed writer left cleaned away, the name checked, and the
        checkpoints of an interrupted run kept only to be resumed."""
        museum, name, work, m = self.museum, self.name, self.work, self.method
        museum.manifest = Manifest.read(museum.folder)
        if self.main:
            remove_leftovers(museum.folder / "concepts")
            remove_leftovers(museum.folder / "state")
            remove_leftovers(museum.folder)
            for stale in (museum.folder / "work").glob("*"):  # left by a crash after its concept was committed
                if stale.name in museum.manifest.names():
                    shutil.rmtree(stale, ignore_errors=True)
        info = self._new_concept(name, self.class_word, self.style, len(museum.manifest.concepts))
        earlier = [museum.concept_info(e) for e in museum.manifest.concepts]
        if self.main and work.is_dir():
            remove_leftovers(work)
            if not self.resume:
                if any(work.glob("checkpoint-*")):
                    warnings.warn(f"discarding the checkpoints of an interrupted run of {name!r} in {work}; "
                                  "pass --resume (resume=True) to continue such a run instead")
                shutil.rmtree(work, ignore_errors=True)
        # what the run depends on: a checkpoint made with anything else is not resumed
        fingerprint = {"method": m.name, "config": m.config.to_dict(), "images": self.image_hashes,
                       "base": museum.manifest.base_hash, "class_word": self.class_word, "style": self.style,
                       "earlier": [[c.name, c.files.get(TENSORS)] for c in museum.manifest.concepts],
                       "state": (museum.manifest.state.get(m.name) or {}).get("sha256")}
        checkpoints = Checkpointer(work, every=self.checkpoint_every or max(25, m.config.steps // 4),
                                   fingerprint=fingerprint)
        return info, earlier, checkpoints

    def _new_concept(self, name: str, class_word: str, style: bool, task_index: int) -> ConceptInfo:
        """The concept about to be learned, its name and token checked against the museum and the base model."""
        museum = self.museum
        if name in museum.manifest.names():
            raise MuseumError(f"the museum already has a concept {name!r}; choose another name or "
                              f"`museum remove` it first")
        token = f"<{name}>"
        if token in museum.pipe.tokenizer.get_vocab():
            raise MuseumError(f"the token {token} is already in the base model's vocabulary; choose another name")
        return ConceptInfo(name, token, class_word, style, task_index, self.method.name)

    def _train_and_commit(self, info: ConceptInfo, earlier: list[ConceptInfo], checkpoints: Checkpointer) -> bool:
        museum = self.museum
        try:
            learned = self._train(info, earlier, checkpoints)
            if not self.main:
                museum.collection.unload()  # the pipeline holds the token; the main process commits the concept
                return False
            self._commit(learned)
        except BaseException as err:
            museum.collection.unload()  # the pipeline holds the uncommitted token: reload from disk next time
            if self.main and isinstance(err, TrainingDivergedError):  # resuming would diverge again
                shutil.rmtree(self.work, ignore_errors=True)
            raise
        return True

    def _train(self, info: ConceptInfo, earlier: list[ConceptInfo], checkpoints: Checkpointer
               ) -> list[tuple[ConceptInfo, LearnResult]]:
        museum = self.museum
        result = train_concept(
            museum.pipe, self.method, info, self.images, state=museum.method_state(self.method.name),
            earlier=earlier, cache_dir=museum.folder / "cache", checkpoints=checkpoints, resume=self.resume,
            progress=self.progress, on_step=self.on_step, options=self.options, echo=self.echo,
        )
        return [(info, result)]

    def _commit(self, learned: list[tuple[ConceptInfo, LearnResult]]) -> None:
        """Each concept's folder written atomically, then the method's new state (the last result's), then one
        rewrite of ``museum.json``: the commit point of them all."""
        museum, m = self.museum, self.method
        fault_point("commit.begin")
        pending = list(museum.manifest.concepts)
        for info, result in learned:
            pending.append(self._write_concept(info, result, pending))
        state, new_state = dict(museum.manifest.state), learned[-1][1].state
        if new_state:
            state_file = f"state/{m.name}-{learned[-1][0].task_index:03d}.safetensors"
            (museum.folder / "state").mkdir(exist_ok=True)
            atomic_write_bytes(museum.folder / state_file,
                               save_bytes({k: v.detach().cpu().contiguous() for k, v in new_state.items()}))
            state[m.name] = {"file": state_file, "sha256": sha256_file(museum.folder / state_file)}
            fault_point("commit.state")
        new = Manifest(museum.manifest.base_path, museum.manifest.base_hash, pending, state)
        new.write(museum.folder)  # the commit point
        fault_point("commit.manifest")
        museum.manifest = new
        remove_unreferenced(museum.folder, new)
        fault_point("commit.cleaned")

    def _write_concept(self, info: ConceptInfo, result: LearnResult, earlier: list[ConceptEntry]) -> ConceptEntry:
        """The concept's folder (tensors, concept.json, a sample drawn with it and the ``earlier`` entries), written
        atomically; its manifest entry."""
        museum, m = self.museum, self.method
        entry = ConceptEntry(info.name, info.token, m.name, info.task_index, info.class_word, info.is_style,
                             folder=f"concepts/{info.task_index:03d}-{info.name}")
        info.tensors = result.tensors
        record = {
            "name": info.name, "token": info.token, "phrase": m.phrase(info), "method": m.name,
            "config": m.config.to_dict(), "task_index": info.task_index, "class_word": info.class_word,
            "is_style": info.is_style, "image_sha256": self.image_sha256[info.name], "train_seconds": round(result.seconds, 2),
            "steps": result.steps, "final_loss": result.losses[-1] if result.losses else None,
            "base_hash": museum.manifest.base_hash, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        # the sample is drawn before the commit, with the new concept and its method's new state
        museum.collection.hold(info.name, result.tensors, record, m.name, result.state)
        prompt = concept_prompt(m, info)
        sample = image_grid(Drawing(museum, [*earlier, entry]).images([prompt] * 4, list(range(4))), cols=4, scale=2)
        fault_point("commit.sampled")
        with atomic_dir(museum.folder / entry.folder) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in result.tensors.items()}, tmp / TENSORS)
            fault_point("commit.partial")
            (tmp / "concept.json").write_text(json.dumps(record, indent=2))
            sample.save(tmp / "sample.png")
            entry.files = {f: sha256_file(tmp / f) for f in (TENSORS, "concept.json", "sample.png")}
        fault_point("commit.folder")
        return entry


class JointSession(LearningSession):
    """Several concepts learned in one run by a method that can (``Method.joint``; ``train_together``) and committed
    together, one rewrite of ``museum.json``: the benchmark's joint oracle. ``requests``: (name, class word,
    style, images, their hashes) per concept. One process, no checkpoints: an interrupted run starts again."""

    def __init__(self, museum, method: Method, requests: list[tuple], *, progress: bool, options: TrainOptions):
        name, class_word, style, images, hashes = requests[0]
        super().__init__(museum, method, name, class_word, style, images, hashes, resume=False, wait=False,
                         progress=progress, checkpoint_every=None, options=options, echo=None)
        self.requests = requests
        self.image_sha256 = {r[0]: r[4] for r in requests}

    def _prepare(self) -> tuple[list[ConceptInfo], list[ConceptInfo], Checkpointer]:
        info, earlier, checkpoints = super()._prepare()
        return [info, *(self._new_concept(n, c, s, info.task_index + k)
                        for k, (n, c, s, _, _) in enumerate(self.requests[1:], 1))], earlier, checkpoints

    def _train(self, infos: list[ConceptInfo], earlier: list[ConceptInfo], checkpoints: Checkpointer
               ) -> list[tuple[ConceptInfo, LearnResult]]:
        museum = self.museum
        results = train_together(museum.pipe, self.method, infos, [r[3] for r in self.requests],
                                 state=museum.method_state(self.method.name), earlier=earlier,
                                 cache_dir=museum.folder / "cache", progress=self.progress, options=self.options)
        return list(zip(infos, results))


def _all_agree(accelerator, ok: bool) -> bool:
    """Whether every process of a data-parallel run is ``ok`` (a collective: every process must call it)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)

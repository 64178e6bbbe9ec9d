"""A museum's collection, loaded: the base pipeline (checked against the hash the manifest records) with every
concept's token installed, each concept's tensors and ``concept.json``, and each method's shared state. Every
tensor is checked on load: its checksum (``museum.store.tensors``), that it is finite and that its shape fits the
base model (``museum.plumbing.fit``).

Readers take no lock: a reader that meets files a concurrent writer just removed reads the manifest again."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from museum.errors import MuseumError
from museum.methods.base import ConceptInfo, method_names
from museum.models.loading import base_hash, load_pipeline, resolve_base
from museum.plumbing import tokens
from museum.plumbing.fit import check_tensors, model_shapes
from museum.store.manifest import MANIFEST, ConceptEntry, Manifest, check_pipeline_files
from museum.store.tensors import read_concept_tensors, read_state

READ_ATTEMPTS = 5  # manifests read while concurrent writers keep committing, before the error is the reader's


class Collection:
    """The loaded contents of the museum at ``folder`` (``allow_pickle``: let a base model with pickle-only
    weights load; they can run code). Empty until :meth:`load`."""

    def __init__(self, folder: Path, *, allow_pickle: bool = False):
        self.folder, self.allow_pickle = Path(folder), allow_pickle
        self.pipe = None
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}  # concept name -> its tensors
        self.records: dict[str, dict] = {}  # concept name -> its concept.json
        self.state: dict[str, dict[str, torch.Tensor]] = {}  # method name -> its shared state

    def load(self, manifest: Manifest) -> Manifest:
        """Load the base pipeline and everything ``manifest`` names; returns the manifest loaded (read again
        when a writer committed since ``manifest`` was read)."""
        self._check_base(manifest)
        pipe = load_pipeline(manifest.base_path)
        shapes = model_shapes(pipe)
        for attempt in range(READ_ATTEMPTS):
            try:
                tensors, records, state = {}, {}, {}
                for entry in manifest.concepts:
                    tensors[entry.name] = self._concept_tensors(entry, shapes)
                    records[entry.name] = json.loads((self.folder / entry.folder / "concept.json").read_text())
                for method in manifest.state:
                    state[method] = self._state(manifest, method, shapes)
                break
            except (MuseumError, OSError):
                # a writer may have committed (and removed files) since this manifest was read: read it again
                fresh = Manifest.read(self.folder)
                if fresh.to_json() == manifest.to_json() or attempt == READ_ATTEMPTS - 1:
                    raise
                manifest = fresh
        for entry in manifest.concepts:
            tokens.install_token(pipe, entry.token, tensors[entry.name])
        self.pipe, self.tensors, self.records, self.state = pipe, tensors, records, state
        return manifest

    def _check_base(self, manifest: Manifest) -> None:
        """The base model is the one the museum was made on, safe to load, and every method is known."""
        try:
            actual = base_hash(manifest.base_path)
        except ValueError as err:
            raise MuseumError(f"this museum's base model is unavailable: {err}. Put the model back, or if it moved, "
                              f"set base.path in {self.folder / MANIFEST} to its new folder (its hash is checked)"
                              ) from None
        if actual != manifest.base_hash:
            raise MuseumError(
                f"this museum was made for base model {manifest.base_path} (hash {manifest.base_hash}) "
                f"but the model found there has hash {actual}; its concepts cannot load on another base model")
        check_pipeline_files(resolve_base(manifest.base_path), allow_pickle=self.allow_pickle)
        unknown = sorted({c.method for c in manifest.concepts} - set(method_names()))
        if unknown:
            raise MuseumError(f"this museum has concepts learned with method(s) {', '.join(unknown)}, which this "
                              f"version of museum does not have; upgrade museum to use them")

    def _concept_tensors(self, entry: ConceptEntry, shapes: dict) -> dict[str, torch.Tensor]:
        tensors = read_concept_tensors(self.folder, entry)
        check_tensors(tensors, shapes, f"concept {entry.name!r}", token=entry.token)
        return tensors

    def _state(self, manifest: Manifest, method: str, shapes: dict) -> dict[str, torch.Tensor]:
        tensors = read_state(self.folder, method, manifest.state[method])
        check_tensors(tensors, shapes, f"state of method {method!r}")
        return tensors

    def read_concept(self, entry: ConceptEntry) -> dict[str, torch.Tensor]:
        """Concept ``entry``'s tensors as stored, checked against the loaded pipeline."""
        return self._concept_tensors(entry, model_shapes(self.pipe))

    def method_state(self, manifest: Manifest, method: str) -> dict[str, torch.Tensor]:
        """``method``'s shared state as ``manifest`` records it (read once; empty when it keeps none)."""
        if method in self.state:  # loaded, or just learned (:meth:`hold`)
            return self.state[method]
        if manifest.state.get(method) is None:
            return {}
        if method not in self.state:
            self.state[method] = self._state(manifest, method, model_shapes(self.pipe))
        return self.state[method]

    def concept_info(self, entry: ConceptEntry) -> ConceptInfo:
        """What a method sees of a loaded concept."""
        return ConceptInfo(entry.name, entry.token, entry.class_word, entry.is_style, entry.task_index, entry.method,
                           self.tensors[entry.name], self.records[entry.name]["config"])

    def hold(self, name: str, tensors: dict[str, torch.Tensor], record: dict, method: str,
             state: dict[str, torch.Tensor]) -> None:
        """Keep a concept just learned (its tensors, its concept.json, its method's new state) as if loaded, so the
        sample it is committed with is drawn with it; the pipeline already holds its token."""
        self.tensors[name], self.records[name] = tensors, record
        if state:  # as the commit records it: a method that returns no new state keeps its stored one
            self.state[method] = state

    def unload(self) -> None:
        """Forget the pipeline and the method states: the next use loads them from disk again (after a change to
        the museum, or a pipeline left holding an uncommitted token)."""
        self.pipe = None
        self.state = {}

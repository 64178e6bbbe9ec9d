"""Reading the tensors a museum keeps: a concept's ``tensors.safetensors`` and a method's state file, each checked
against the sha256 the manifest records before it is read. Whether the tensors fit the base model is checked
above this layer (``museum.plumbing.fit``)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from museum.errors import MuseumError
from museum.store.manifest import MANIFEST, TENSORS, ConceptEntry, verify_files


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A safetensors file, or a clear error saying what to do when it is not one."""
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise MuseumError(f"{what}: {path} is not a valid safetensors file ({err}); restore it from a backup, "
                          "or `museum remove` the concept") from None


def read_concept_tensors(folder: Path, entry: ConceptEntry) -> dict[str, torch.Tensor]:
    """The tensors of concept ``entry`` of the museum at ``folder``: its files checked, its token's embedding there."""
    what = f"concept {entry.name!r}"
    verify_files(folder / entry.folder, entry.files, what)
    if TENSORS not in entry.files:
        raise MuseumError(f"{what}: {MANIFEST} lists no {TENSORS}; the manifest was edited or damaged")
    tensors = load_tensors(folder / entry.folder / TENSORS, what)
    if entry.token not in tensors:
        raise MuseumError(f"{what}: {TENSORS} has no embedding for {entry.token}")
    return tensors


def read_state(folder: Path, method: str, record: dict[str, str]) -> dict[str, torch.Tensor]:
    """The shared state of ``method`` (its manifest ``record``: file and sha256) in the museum at ``folder``."""
    what = f"state of method {method!r}"
    verify_files(folder, {record["file"]: record["sha256"]}, what)
    return load_tensors(folder / record["file"], what)

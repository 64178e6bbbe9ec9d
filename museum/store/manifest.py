"""The museum on disk.

    DIR/
      museum.json                    the manifest (the single commit point of every change)
      concepts/<NNN>-<name>/         one folder per concept, in learning order
        concept.json                 method, full config, class word, image hashes, time, steps
        tensors.safetensors          token embedding(s) + the method's per-concept tensors
        sample.png                   what the concept looked like right after learning
      state/<method>-<NNN>.safetensors   state a method shares across tasks (as of task NNN)
      cache/                         derived data (class images, covariances); safe to delete
      work/<name>/checkpoint-<step>/ training checkpoints of an unfinished concept (--resume)
      .lock                          writer lock

Only JSON and safetensors are ever read: nothing in a museum can execute code. Every file
the manifest names carries its sha256, checked on load. A manifest edited by hand is
validated before use: names, folders and file names must be the ones Museum writes (no
path separators, no '..', no file types other than safetensors, JSON and PNG). A base model
whose loading would run code (pickle-only weights, Python files) is refused unless the user
passes ``allow_pickle`` (for pickle weights; code is always refused).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from museum.errors import BaseModelError, MuseumError
from museum.store.atomic import atomic_write_json

SCHEMA_VERSION = 1
MANIFEST = "museum.json"
TENSORS = "tensors.safetensors"  # a concept's tensors, in its folder
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
FOLDER_RE = re.compile(r"^concepts/[0-9]{3,}-([a-z0-9][a-z0-9_-]{0,39})$")
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.(safetensors|json|png)$")
STATE_RE = re.compile(r"^state/[a-z0-9][a-z0-9_.-]*\.safetensors$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise MuseumError(f"invalid concept name {name!r}: use 1-40 lowercase letters, digits, '-' or '_', "
                          "starting with a letter or digit (no spaces, slashes or '..')")
    return name


@dataclass
class ConceptEntry:
    name: str
    token: str
    method: str
    task_index: int
    class_word: str
    is_style: bool
    folder: str
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256

    @classmethod
    def from_dict(cls, d: dict) -> "ConceptEntry":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass
class Manifest:
    base_path: str
    base_hash: str
    concepts: list[ConceptEntry] = field(default_factory=list)
    state: dict[str, dict[str, str]] = field(default_factory=dict)  # method -> {"file", "sha256"}
    schema: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "museum",
            "schema": self.schema,
            "base": {"path": self.base_path, "hash": self.base_hash},
            "concepts": [asdict(c) for c in self.concepts],
            "state": self.state,
        }

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise MuseumError(f"{folder} is not a museum (no {MANIFEST}); create one with `museum init {folder}`")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MuseumError(f"{path} is not valid JSON ({err}); restore it from a backup "
                              "(the concept folders are intact)") from None
        if not isinstance(data, dict) or data.get("format") != "museum":
            raise MuseumError(f"{path} is not a museum manifest")
        schema = data.get("schema")
        if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
            raise MuseumError(f"{path} has an invalid schema version {schema!r}; the manifest was edited or damaged "
                              "(restore it from a backup)")
        if schema > SCHEMA_VERSION:
            raise MuseumError(f"{path} has schema version {schema}, newer than this museum's "
                              f"({SCHEMA_VERSION}); upgrade museum to open it")
        try:
            manifest = cls(
                base_path=data["base"]["path"], base_hash=data["base"]["hash"],
                concepts=[ConceptEntry.from_dict(c) for c in data["concepts"]],
                state={k: dict(v) for k, v in data.get("state", {}).items()}, schema=schema,
            )
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise MuseumError(f"{path} is missing field {err} or has a field of the wrong type; the manifest was "
                              "edited or damaged (restore it from a backup)") from None
        problem = manifest.problem()
        if problem:
            raise MuseumError(f"{path}: {problem}; the manifest was edited or damaged (restore it from a backup)")
        return manifest

    def problem(self) -> str | None:
        """What is wrong with a manifest read from disk (None if nothing): everything must be what Museum writes."""
        if not isinstance(self.base_path, str) or not isinstance(self.base_hash, str):
            return "base.path and base.hash must be strings"
        seen = set()
        for c in self.concepts:
            if not isinstance(c.name, str) or not NAME_RE.match(c.name):
                return f"invalid concept name {c.name!r}"
            if c.name in seen:
                return f"concept {c.name!r} is listed twice"
            seen.add(c.name)
            if c.token != f"<{c.name}>":
                return f"concept {c.name!r} has token {c.token!r}, expected <{c.name}>"
            match = FOLDER_RE.match(c.folder) if isinstance(c.folder, str) else None
            if not match or match.group(1) != c.name:
                return f"concept {c.name!r} has folder {c.folder!r}, expected concepts/NNN-{c.name}"
            if not isinstance(c.files, dict) or not c.files:
                return f"concept {c.name!r} lists no files"
            for rel, digest in c.files.items():
                if not isinstance(rel, str) or not FILE_RE.match(rel):
                    return f"concept {c.name!r} lists file {rel!r}; a concept holds only safetensors, JSON and PNG files"
                if not isinstance(digest, str) or not SHA256_RE.match(digest):
                    return f"concept {c.name!r}: file {rel!r} has no valid sha256"
            if not isinstance(c.method, str) or not isinstance(c.class_word, str) or not isinstance(c.task_index, int):
                return f"concept {c.name!r} has a field of the wrong type"
        for method, record in self.state.items():
            if not isinstance(record.get("file"), str) or not STATE_RE.match(record["file"]):
                return f"state of method {method!r} is file {record.get('file')!r}; state files are state/NAME.safetensors"
            if not isinstance(record.get("sha256"), str) or not SHA256_RE.match(record["sha256"]):
                return f"state of method {method!r} has no valid sha256"
        return None

    def write(self, folder: Path) -> None:
        atomic_write_json(Path(folder) / MANIFEST, self.to_json())

    # ------------------------------------------------------------------ queries
    def concept(self, name: str) -> ConceptEntry:
        for c in self.concepts:
            if c.name == name:
                return c
        raise MuseumError(f"no concept {name!r} in this museum; it has: {', '.join(self.names()) or '(none)'}")

    def names(self) -> list[str]:
        return [c.name for c in self.concepts]


def check_pipeline_files(path: Path, *, allow_pickle: bool = False) -> None:
    """Refuse a base-model folder whose loading could run code: Python files, components from libraries other
    than diffusers/transformers, or weights only in pickle formats (.bin, .pt, .ckpt; allowed with ``allow_pickle``)."""
    path = Path(path)
    code = sorted(str(p.relative_to(path)) for p in path.rglob("*.py"))
    if code:
        raise BaseModelError(f"base model {path} contains Python code ({', '.join(code[:3])}); Museum never runs code "
                             "from a model folder: remove the .py files or use a plain diffusers pipeline")
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise BaseModelError(f"base model {path}: model_index.json is unreadable ({err})") from None
    for name, spec in (index.items() if isinstance(index, dict) else []):
        if isinstance(spec, list) and spec and spec[0] not in (None, "diffusers", "transformers"):
            raise BaseModelError(f"base model {path}: component {name!r} comes from {spec[0]!r}; Museum loads only "
                                 "diffusers and transformers components (custom code is never run)")
    if allow_pickle:
        return
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        files = [f for f in sub.rglob("*") if f.is_file()]
        pickles = [f for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not any(f.suffix == ".safetensors" for f in files):
            raise BaseModelError(
                f"base model {path}: {sub.name} has weights only in a pickle format ({pickles[0].name}), which can run "
                "code when loaded; convert them to safetensors, or pass --allow-pickle (allow_pickle=True) if you "
                "trust where the model came from")


def verify_files(folder: Path, files: dict[str, str], what: str) -> None:
    """Check that every named file exists and has its recorded sha256."""
    for rel, digest in files.items():
        path = Path(folder) / rel
        if not path.is_file():
            raise MuseumError(f"{what}: file {path} is missing; the museum was damaged (restore it from a backup, "
                              f"or `museum remove` the concept)")
        if sha256_file(path) != digest:
            raise MuseumError(f"{what}: file {path} does not match its checksum in {MANIFEST}; it was modified "
                              "or damaged (restore it from a backup, or `museum remove` the concept)")


def remove_unreferenced(folder: Path, manifest: Manifest) -> None:
    """Delete the concept folders and state files of the museum at ``folder`` that ``manifest`` no longer names
    (after a commit that removed or replaced them)."""
    keep_dirs = {folder / c.folder for c in manifest.concepts}
    for p in (folder / "concepts").glob("*"):
        if p.is_dir() and p not in keep_dirs:
            shutil.rmtree(p, ignore_errors=True)
    keep_state = {folder / r["file"] for r in manifest.state.values()}
    for p in (folder / "state").glob("*.safetensors") if (folder / "state").is_dir() else []:
        if p not in keep_state:
            p.unlink(missing_ok=True)

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
the manifest names carries its sha256, checked on load.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST = "museum.json"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


from museum.errors import MuseumError  # noqa: F401  (re-exported)


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
        if not isinstance(schema, int) or schema > SCHEMA_VERSION:
            raise MuseumError(f"{path} has schema version {schema!r}, newer than this museum's "
                              f"({SCHEMA_VERSION}); upgrade museum to open it")
        try:
            return cls(
                base_path=data["base"]["path"], base_hash=data["base"]["hash"],
                concepts=[ConceptEntry.from_dict(c) for c in data["concepts"]],
                state={k: dict(v) for k, v in data.get("state", {}).items()}, schema=schema,
            )
        except (KeyError, TypeError) as err:
            raise MuseumError(f"{path} is missing field {err}; the manifest was edited or damaged") from None

    def write(self, folder: Path) -> None:
        from museum.store.atomic import atomic_write_json

        atomic_write_json(Path(folder) / MANIFEST, self.to_json())

    # ------------------------------------------------------------------ queries
    def concept(self, name: str) -> ConceptEntry:
        for c in self.concepts:
            if c.name == name:
                return c
        raise MuseumError(f"no concept {name!r} in this museum; it has: {', '.join(self.names()) or '(none)'}")

    def names(self) -> list[str]:
        return [c.name for c in self.concepts]


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

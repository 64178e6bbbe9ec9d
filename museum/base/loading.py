"""Loading a base model: the embedded default or a user's diffusers pipeline directory.

One code path serves both: ``StableDiffusionPipeline.from_pretrained(path)``. The embedded
model ships inside the package (``museum/embedded/pipeline``), as does the evaluator
(``museum/embedded/evaluator``).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from museum.errors import BaseModelError

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"
EMBEDDED_PIPELINE = EMBEDDED_DIR / "pipeline"
EMBEDDED_EVALUATOR = EMBEDDED_DIR / "evaluator"
EMBEDDED = "embedded"


def resolve_base(base: str | Path) -> Path:
    """``"embedded"`` or a path to a diffusers pipeline directory -> the directory."""
    path = EMBEDDED_PIPELINE if str(base) == EMBEDDED else Path(base).expanduser()
    if not (path / "model_index.json").is_file():
        if str(base) == EMBEDDED:
            raise BaseModelError(
                f"the embedded model is missing at {path}; reinstall museum or run `museum pretrain --out {EMBEDDED_DIR}`"
            )
        raise BaseModelError(f"no diffusers pipeline at {path} (expected {path / 'model_index.json'}); "
                             "pass a directory written by `save_pretrained`, or `embedded`")
    return path


def base_hash(base: str | Path) -> str:
    """A content hash of a pipeline's weights and configs (sha256 over sorted files), cached per path."""
    path = resolve_base(base)
    return _hash_dir(str(path), _mtime_signature(path))


def _mtime_signature(path: Path) -> tuple:
    return tuple(sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in path.rglob("*") if p.is_file()))


@lru_cache(maxsize=8)
def _hash_dir(path: str, signature: tuple) -> str:
    digest = hashlib.sha256()
    root = Path(path)
    for rel, _, _ in signature:
        if rel.endswith((".json", ".safetensors", ".txt", ".bin")):
            digest.update(rel.encode())
            digest.update(hashlib.sha256((root / rel).read_bytes()).digest())
    return digest.hexdigest()[:16]


def load_pipeline(base: str | Path = EMBEDDED, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline with plain diffusers, progress bars off."""
    path = resolve_base(base)
    index = json.loads((path / "model_index.json").read_text())
    cls = StableDiffusionPipeline if index.get("_class_name") == "StableDiffusionPipeline" else DiffusionPipeline
    extra = dict(safety_checker=None, requires_safety_checker=False) if cls is StableDiffusionPipeline else {}
    pipe = cls.from_pretrained(path, dtype=dtype, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_evaluator(path: str | Path = EMBEDDED_EVALUATOR):
    from museum.evaluation.evaluator import Evaluator

    if not (Path(path) / "config.json").is_file():
        raise BaseModelError(f"no evaluator at {path}; reinstall museum or run `museum pretrain`")
    return Evaluator.from_pretrained(path)


def resolution(pipe) -> int:
    """The pixel resolution the pipeline's UNet was trained for."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)

"""Loading a base model: the embedded default or a user's diffusers pipeline directory.

One code path serves both: ``StableDiffusionPipeline.from_pretrained(path)``. The embedded
model ships inside the package (``museum/embedded/pipeline``), as does the evaluator
(``museum/embedded/evaluator``). A second embedded model, ``embedded-two-objects``
(``museum/embedded/pipeline-two-objects``), is the first one pretrained further with two-object
scenes, for prompts that place two objects side by side (docs/two-objects/); it is opt-in.

A museum can also start from a single-file checkpoint (``.safetensors``, or a pickle ``.ckpt``
with ``allow_pickle``): :func:`load_single_file` reads it with diffusers' ``from_single_file``
and ``Museum.init`` saves it once, with ``save_pretrained``, as the museum's own pipeline folder
(``DIR/base``), so every later load is the same ``from_pretrained`` path. diffusers needs the
model family's configs (and tokenizer) for a single file: Museum passes the folder given as
``config`` or, without one, the matching hub repository's configs only if they are already in the
local Hugging Face cache: nothing is downloaded. A hub id (``owner/name``) as base is looked up in
the local cache first and downloaded only when it is not there and the machine is online.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import (
    fetch_diffusers_config, infer_diffusers_model_type, load_single_file_checkpoint,
)
from huggingface_hub import snapshot_download
from safetensors import safe_open

from museum.errors import BaseModelError
from museum.models.evaluator import Evaluator

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"
EMBEDDED_PIPELINE = EMBEDDED_DIR / "pipeline"
EMBEDDED_EVALUATOR = EMBEDDED_DIR / "evaluator"
EMBEDDED = "embedded"
EMBEDDED_TWO_OBJECTS = "embedded-two-objects"
EMBEDDED_MODELS = {EMBEDDED: EMBEDDED_PIPELINE, EMBEDDED_TWO_OBJECTS: EMBEDDED_DIR / "pipeline-two-objects"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
PICKLE_SINGLE_FILE = (".ckpt",)
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
WHAT_BASE = ("pass a diffusers pipeline folder (written by `save_pretrained`), a single-file checkpoint "
             "(.safetensors, or .ckpt with --allow-pickle), a Hugging Face hub id while online, or `embedded` / "
             "`embedded-two-objects`")


def is_embedded(base: str | Path) -> bool:
    """Is ``base`` the name of a shipped model (:data:`EMBEDDED_MODELS`) rather than a path?"""
    return str(base) in EMBEDDED_MODELS


def resolve_base(base: str | Path) -> Path:
    """A shipped model's name (``"embedded"``, ``"embedded-two-objects"``) or a path to a diffusers pipeline
    directory -> the directory."""
    path = EMBEDDED_MODELS[str(base)] if is_embedded(base) else Path(base).expanduser()
    if not (path / "model_index.json").is_file():
        if is_embedded(base):
            raise BaseModelError(
                f"the embedded model {base!r} is missing at {path}; reinstall museum (docs/BASE_MODEL.md and "
                "docs/two-objects/ say how the shipped models were pretrained)")
        if not path.exists():
            raise BaseModelError(f"base model {path} does not exist (Museum never downloads a model by itself); "
                                 + WHAT_BASE)
        if path.is_file():
            raise BaseModelError(f"{path} is a file, not a diffusers pipeline folder; a single-file checkpoint "
                                 "(.safetensors/.ckpt) is read by `museum init DIR --base FILE`, which saves it as "
                                 "the museum's pipeline folder")
        raise BaseModelError(f"no diffusers pipeline at {path} (expected {path / 'model_index.json'}); " + WHAT_BASE)
    return path


def is_single_file(base: str | Path) -> bool:
    return not is_embedded(base) and Path(base).suffix.lower() in SINGLE_FILE_SUFFIXES and not Path(base).is_dir()


def is_hub_id(base: str | Path) -> bool:
    """An ``owner/name`` that is not a local path (a relative path that exists is a path)."""
    return (not is_embedded(base) and bool(HUB_ID_RE.match(str(base))) and not Path(base).expanduser().exists()
            and not is_single_file(base))


def hub_snapshot(repo_id: str) -> Path:
    """The local folder of a hub pipeline: from the Hugging Face cache, else downloaded (online only).
    Only a diffusers pipeline's configs, tokenizer files and safetensors weights are fetched."""
    patterns = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
    ignore = ["*.fp16.safetensors", "*ema*", "*.non_ema.*", "safety_checker/*", "feature_extractor/*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=ignore, local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises several error types)
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=ignore))
    except Exception as err:
        raise BaseModelError(
            f"base model {repo_id!r} is neither a local folder or file nor in the local Hugging Face cache, and "
            f"downloading it failed ({type(err).__name__}); offline, " + WHAT_BASE.replace("a Hugging Face hub id "
                                                                                         "while online, ", "")) from None


def load_single_file(path: str | Path, *, config: str | Path | None = None, allow_pickle: bool = False,
                     dtype: torch.dtype = torch.float32):
    """A pipeline from one checkpoint file with diffusers' ``from_single_file``, without touching the network.

    ``config``: a diffusers pipeline folder of the same architecture (its configs and tokenizer are
    used); without it, the configs of the hub repository diffusers associates with the checkpoint's
    family must already be in the local Hugging Face cache. The pipeline class follows ``config``
    (``StableDiffusionXLPipeline`` for an SDXL folder), as do the scheduler (so its prediction type:
    an SD-2.x 768-v file needs a v-prediction folder) and tokenizers; a .safetensors file whose key layout
    is of the other kind (SDXL's ``conditioner.embedders.*`` vs SD-1/2's ``cond_stage_model.*``) is refused
    by name before any weight is read."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BaseModelError(f"base model {path} does not exist (Museum never downloads a model by itself); " + WHAT_BASE)
    if path.suffix.lower() in PICKLE_SINGLE_FILE and not allow_pickle:
        raise BaseModelError(f"base model {path} is a pickle checkpoint, which can run code when loaded; convert it "
                             "to .safetensors, or pass --allow-pickle (allow_pickle=True) if you trust where it came from")
    if config is not None:
        config = Path(config).expanduser()
        resolve_base(config)  # a pipeline folder, or a clear error
        cls_name = json.loads((config / "model_index.json").read_text()).get("_class_name", "")
        cls = StableDiffusionXLPipeline if "XL" in cls_name else StableDiffusionPipeline
        _check_layout_matches(path, config, cls_name, xl=cls is StableDiffusionXLPipeline)
    else:
        try:
            checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
        except Exception as err:
            raise BaseModelError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
        family = infer_diffusers_model_type(checkpoint)
        repo = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
        del checkpoint
        cls = StableDiffusionXLPipeline if family.startswith("xl") else StableDiffusionPipeline

        try:
            config = Path(snapshot_download(repo, allow_patterns=["*.json", "*.txt"], local_files_only=True))
        except Exception:
            raise BaseModelError(
                f"{path} looks like a {family} checkpoint; diffusers needs that family's configs and tokenizer "
                f"(hub repository {repo}), which are not in the local Hugging Face cache, and Museum does not download "
                f"them: pass --config FOLDER, a diffusers pipeline folder of the same architecture (e.g. a "
                f"`save_pretrained` copy of {repo})") from None
    extra = dict(safety_checker=None, requires_safety_checker=False) if cls is StableDiffusionPipeline else {}
    try:
        pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, torch_dtype=dtype, **extra)
    except BaseModelError:
        raise
    except Exception as err:
        raise BaseModelError(f"diffusers could not read {path} as a {cls.__name__} with the configs of {config} "
                             f"({type(err).__name__}: {err}); is --config the same architecture?") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


# the text-encoder prefixes of the original layouts: SGM (SDXL) keeps its encoders under conditioner.embedders
SINGLE_FILE_LAYOUTS = (("conditioner.embedders.", "SDXL", True), ("cond_stage_model.model.", "SD-2.x", False),
                       ("cond_stage_model.transformer.", "SD-1.x", False))


def single_file_layout(path: Path) -> tuple[str, bool] | None:
    """(family, is SDXL) of a .safetensors checkpoint from its key names alone (no tensor is read);
    None for a pickle or an unknown layout (diffusers then decides)."""
    if path.suffix.lower() != ".safetensors":
        return None

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:
        raise BaseModelError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    for prefix, family, xl in SINGLE_FILE_LAYOUTS:
        if any(k.startswith(prefix) for k in keys):
            return family, xl
    return None


def _check_layout_matches(path: Path, config: Path, cls_name: str, *, xl: bool) -> None:
    """An SDXL file with an SD-1/2 --config (or the reverse) is refused by name before diffusers reads it."""
    layout = single_file_layout(path)
    if layout is not None and layout[1] != xl:
        family = layout[0]
        raise BaseModelError(
            f"{path} is an {family} checkpoint (its text encoders are stored as "
            f"{'conditioner.embedders.*' if layout[1] else 'cond_stage_model.*'}), but --config {config} is a "
            f"{cls_name or 'pipeline'} folder; pass --config FOLDER, a diffusers pipeline folder of the same "
            f"architecture ({'a StableDiffusionXLPipeline' if layout[1] else 'a StableDiffusionPipeline'})")


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
    if not (Path(path) / "config.json").is_file():
        raise BaseModelError(f"no evaluator at {path}; reinstall museum or run `museum pretrain`")
    return Evaluator.from_pretrained(path)


def resolution(pipe) -> int:
    """The pixel resolution the pipeline's UNet was trained for."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)

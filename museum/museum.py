"""``Museum``: the Python API over a museum directory (see ``museum.store.manifest`` for the layout).

    m = Museum.init("my-museum")                       # on the embedded model
    m.learn("sunburst", "photos/sunburst", class_word="circle", method="c-lora")
    m.generate("a <sunburst> circle on a sand background", n=4)
    m.concepts                                          # learned concepts, in order

Every change is committed by one atomic rename of ``museum.json`` under a writer lock; a
crash at any point leaves the previous museum intact (docs/RELIABILITY.md). Readers take no
lock: a reader that meets a concept a concurrent writer just removed re-reads the manifest.
Every tensor is checked on load: its checksum, that it is finite, and that its shape fits
the base model.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image
from safetensors.torch import load_file

from museum.errors import MuseumError, MuseumUserError
from museum.export import export_concepts
from museum.generation.sampling import generate_images
from museum.learning import LearningSession
from museum.methods.base import ConceptInfo, family_of, generation_settings, get_method, method_names
from museum.models.loading import (
    EMBEDDED, base_hash, hub_snapshot, is_embedded, is_hub_id, is_single_file, load_pipeline, load_single_file,
    resolve_base,
)
from museum.plumbing import kv, tokens
from museum.store.atomic import atomic_dir, remove_leftovers
from museum.store.faults import fault_point
from museum.store.lock import writer_lock
from museum.store.manifest import (
    MANIFEST, TENSORS, ConceptEntry, Manifest, check_name, check_pipeline_files, verify_files,
)
from museum.training.data import read_image_folder
from museum.training.trainer import TrainOptions

TOKEN_RE = re.compile(r"<[^<>\s]+>")
BASE_FOLDER = "base"  # a single-file base model, saved as a pipeline folder inside the museum


@dataclass
class Concept(ConceptEntry):
    """A learned concept as the API shows it: its manifest entry, where it lives and its concept.json."""

    path: Path = Path()
    info: dict = field(default_factory=dict)

    @property
    def phrase(self) -> str:
        """How to name it in a prompt, e.g. "<sunburst> circle"."""
        return self.info.get("phrase", self.token)

    @property
    def size(self) -> int:
        """Bytes of its tensors on disk (0 when a concurrent writer removed it this moment)."""
        try:
            return sum(p.stat().st_size for p in self.path.glob("*.safetensors"))
        except OSError:
            return 0


class Museum:
    """A museum of learned concepts on one base model."""

    def __init__(self, folder: str | Path, manifest: Manifest, *, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.manifest = manifest
        self.allow_pickle = allow_pickle  # let a base model with pickle-only weights load (they can run code)
        self._pipe = None
        self._loaded_state: dict[str, dict[str, torch.Tensor]] = {}
        self._concept_tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._concept_records: dict[str, dict] = {}  # concept.json of each loaded concept

    # ------------------------------------------------------------------ opening
    @classmethod
    def init(cls, folder: str | Path, base: str | Path = EMBEDDED, *, allow_pickle: bool = False,
             config: str | Path | None = None) -> "Museum":
        """A new museum on ``base``: ``"embedded"``, a diffusers pipeline folder, a single-file checkpoint
        (saved once as the museum's own pipeline folder ``DIR/base``; ``config``: a pipeline folder of the same
        architecture whose configs and tokenizer diffusers needs, see ``museum.models.loading.load_single_file``)
        or a Hugging Face hub id (from the local cache, or downloaded when online)."""
        folder = Path(folder)
        if (folder / MANIFEST).exists():
            raise MuseumError(f"{folder} is already a museum; open it with Museum.open or choose another folder")
        if folder.exists() and any(p for p in folder.iterdir() if not p.name.startswith(".")):
            raise MuseumError(f"{folder} exists and is not empty; choose a new folder for the museum")
        single = None
        if is_single_file(base):
            single = load_single_file(base, config=config, allow_pickle=allow_pickle)  # before anything is written
        elif config is not None:
            raise MuseumError("--config is for a single-file checkpoint base (.safetensors/.ckpt); a pipeline folder "
                              "has its own configs")
        elif is_hub_id(base):
            base = hub_snapshot(str(base))
        if single is None:
            check_pipeline_files(resolve_base(base), allow_pickle=allow_pickle)
        folder.mkdir(parents=True, exist_ok=True)
        with writer_lock(folder):
            if single is not None:
                with atomic_dir(folder / BASE_FOLDER) as tmp:
                    single.save_pretrained(tmp)
                base = folder / BASE_FOLDER
            base_str = str(base) if is_embedded(base) else str(Path(base).resolve())
            manifest = Manifest(base_path=base_str, base_hash=base_hash(base))
            manifest.write(folder)
        return cls(folder, manifest, allow_pickle=allow_pickle)

    @classmethod
    def open(cls, folder: str | Path, *, allow_pickle: bool = False) -> "Museum":
        folder = Path(folder)
        return cls(folder, Manifest.read(folder), allow_pickle=allow_pickle)

    # ------------------------------------------------------------------ listing
    @property
    def concepts(self) -> list[Concept]:
        out = []
        for c in self.manifest.concepts:
            try:  # listing never fails on a damaged concept; loading it does (checksums)
                info = json.loads((self.folder / c.folder / "concept.json").read_text())
            except (OSError, ValueError):
                info = {}
            out.append(Concept(**vars(c), path=self.folder / c.folder, info=info))
        return out

    def concept(self, name: str) -> Concept:
        self.manifest.concept(name)
        return next(c for c in self.concepts if c.name == name)

    # ------------------------------------------------------------------ loading
    @property
    def pipe(self):
        """The base pipeline with every concept's token installed (loaded lazily, checked against the manifest)."""
        if self._pipe is None:
            self._pipe = self._load_pipeline()
        return self._pipe

    def _load_pipeline(self):
        try:
            actual = base_hash(self.manifest.base_path)
        except ValueError as err:
            raise MuseumError(f"this museum's base model is unavailable: {err}. Put the model back, or if it moved, "
                              f"set base.path in {self.folder / MANIFEST} to its new folder (its hash is checked)") from None
        if actual != self.manifest.base_hash:
            raise MuseumError(
                f"this museum was made for base model {self.manifest.base_path} (hash {self.manifest.base_hash}) "
                f"but the model found there has hash {actual}; its concepts cannot load on another base model")
        check_pipeline_files(resolve_base(self.manifest.base_path), allow_pickle=self.allow_pickle)
        unknown = sorted({c.method for c in self.manifest.concepts} - set(method_names()))
        if unknown:
            raise MuseumError(f"this museum has concepts learned with method(s) {', '.join(unknown)}, which this "
                              f"version of museum does not have; upgrade museum to use them")
        pipe = load_pipeline(self.manifest.base_path)
        shapes = _model_shapes(pipe)
        for attempt in range(5):
            try:
                tensors, records, state = {}, {}, {}
                for entry in self.manifest.concepts:
                    tensors[entry.name] = self._read_concept_tensors(entry, shapes)
                    records[entry.name] = json.loads((self.folder / entry.folder / "concept.json").read_text())
                for method in self.manifest.state:
                    state[method] = self._read_state(method, shapes)
                break
            except (MuseumError, OSError):
                # a writer may have committed (and removed files) since this manifest was read: read it again
                fresh = Manifest.read(self.folder)
                if fresh.to_json() == self.manifest.to_json() or attempt == 4:
                    raise
                self.manifest = fresh
        for entry in self.manifest.concepts:
            tokens.install_token(pipe, entry.token, tensors[entry.name])
        self._concept_tensors, self._concept_records, self._loaded_state = tensors, records, state
        return pipe

    def _read_concept_tensors(self, entry: ConceptEntry, shapes: dict | None = None) -> dict[str, torch.Tensor]:
        what = f"concept {entry.name!r}"
        verify_files(self.folder / entry.folder, entry.files, what)
        if TENSORS not in entry.files:
            raise MuseumError(f"{what}: {MANIFEST} lists no {TENSORS}; the manifest was edited or damaged")
        tensors = _load_safetensors(self.folder / entry.folder / TENSORS, what)
        if entry.token not in tensors:
            raise MuseumError(f"{what}: {TENSORS} has no embedding for {entry.token}")
        _check_tensors(tensors, shapes or _model_shapes(self.pipe), what, token=entry.token)
        return tensors

    def _read_state(self, method: str, shapes: dict) -> dict[str, torch.Tensor]:
        record = self.manifest.state[method]
        what = f"state of method {method!r}"
        verify_files(self.folder, {record["file"]: record["sha256"]}, what)
        tensors = _load_safetensors(self.folder / record["file"], what)
        _check_tensors(tensors, shapes, what)
        return tensors

    @property
    def family(self) -> str:
        """The base model's family ("sd1", "sd2", "sdxl" or "small"), from its UNet config."""
        path = resolve_base(self.manifest.base_path) / "unet" / "config.json"
        return family_of(json.loads(path.read_text()))

    def to(self, device: str) -> "Museum":
        """Train and draw on ``device`` ("cpu", "cuda", "cuda:1", "mps"); refused with a clear error when absent."""
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise MuseumError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise MuseumError(f"--device {device}: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                              "train on --device cpu (fp32, or --mixed-precision bf16)")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise MuseumError(f"--device {device}: MPS is not available on this machine; use --device cpu")
        self.pipe.to(dev)
        return self

    def method_state(self, method: str) -> dict[str, torch.Tensor]:
        record = self.manifest.state.get(method)
        if record is None:
            return {}
        if method not in self._loaded_state:
            self._loaded_state[method] = self._read_state(method, _model_shapes(self.pipe))
        return self._loaded_state[method]

    def concept_info(self, entry: ConceptEntry) -> ConceptInfo:
        """What a method sees of a stored concept (its tensors are read with the pipeline)."""
        self.pipe
        return ConceptInfo(entry.name, entry.token, entry.class_word, entry.is_style, entry.task_index, entry.method,
                           self._concept_tensors[entry.name], self._concept_records[entry.name]["config"])

    # ------------------------------------------------------------------ learning
    def learn(self, name: str, images: str | Path | Sequence[Image.Image], *, method: str = "c-lora",
              class_word: str | None = None, style: bool = False, steps: int | None = None, resume: bool = False,
              wait: bool = False, progress: bool = True, seed: int | None = None,
              checkpoint_every: int | None = None, options: TrainOptions | None = None,
              device: str | None = None, echo=None, on_step=None, **config) -> Concept | None:
        """Learn a new concept from a folder of images (or PIL images) and commit it to the museum.

        ``config`` overrides the method's settings (see ``museum methods``; on SD-1.x/2.x/XL bases
        the defaults are the papers' SD settings, ``MethodConfig.SD15``). Checkpoints are
        written every ``checkpoint_every`` steps (default: a quarter of the run, at least 25);
        ``resume=True`` continues from the latest one. ``options``: mixed precision, gradient
        checkpointing, 8-bit Adam (``TrainOptions``); ``device``: where to train and draw (e.g.
        "cuda"); ``echo``: receives the memory estimate and notes printed before training; ``on_step(step, loss)``: called
        after every training step (an exception it raises stops the run, and nothing is committed)."""
        check_name(name)
        if device is not None:
            self.to(device)
        if method not in method_names():
            raise MuseumError(f"unknown method {method!r}; available methods: {', '.join(method_names())}")
        if style and class_word not in (None, "style"):
            raise MuseumError("a style has no class word: pass either --style or --class-word, not both")
        if not style and not class_word:
            raise MuseumError(f"say what {name!r} is: pass --class-word WORD (e.g. circle, dog) or --style")
        class_word = "style" if style else class_word.strip().lower()
        overrides = dict(config, steps=steps, seed=seed)
        m = get_method(method, family=self.family, **{k: v for k, v in overrides.items() if v is not None})
        if not type(m).two_text_encoders and tokens.is_sdxl(self.pipe):
            raise MuseumError(f"{method} does not support bases with two text encoders (SDXL) yet; use another "
                              f"method (see `museum methods`)")
        if isinstance(images, (str, Path)):
            pil_images, image_hashes = read_image_folder(images)
        else:
            pil_images = [im.convert("RGB") for im in images]
            image_hashes = [_image_hash(im) for im in pil_images]
            if not pil_images:
                raise MuseumError("no images given")
        session = LearningSession(self, m, name, class_word, style, pil_images, image_hashes, resume=resume, wait=wait,
                                  progress=progress, checkpoint_every=checkpoint_every, options=options, echo=echo,
                                  on_step=on_step)
        return self.concept(name) if session.run() else None

    def _remove_unreferenced(self) -> None:
        keep_dirs = {self.folder / c.folder for c in self.manifest.concepts}
        for p in (self.folder / "concepts").glob("*"):
            if p.is_dir() and p not in keep_dirs:
                shutil.rmtree(p, ignore_errors=True)
        keep_state = {self.folder / r["file"] for r in self.manifest.state.values()}
        for p in (self.folder / "state").glob("*.safetensors") if (self.folder / "state").is_dir() else []:
            if p not in keep_state:
                p.unlink(missing_ok=True)

    def remove(self, name: str, *, wait: bool = False) -> None:
        """Forget a concept. Refused for methods whose shared state cannot drop one concept."""
        with writer_lock(self.folder, wait=wait):
            self.manifest = Manifest.read(self.folder)
            for leftover in (self.folder, self.folder / "concepts", self.folder / "state"):
                remove_leftovers(leftover)  # what a killed writer left
            entry = self.manifest.concept(name)
            cls = type(get_method(entry.method))
            if not cls.removable:
                raise MuseumError(f"cannot remove {name!r}: {cls.removable_why}")
            new = Manifest(self.manifest.base_path, self.manifest.base_hash,
                           [c for c in self.manifest.concepts if c.name != name], dict(self.manifest.state))
            if not any(c.method == entry.method for c in new.concepts):
                new.state.pop(entry.method, None)
            new.write(self.folder)
            fault_point("commit.remove")
            self.manifest = new
            self._remove_unreferenced()
        self._pipe = None
        self._loaded_state = {}

    # ------------------------------------------------------------------ generation
    def parse_prompt(self, prompt: str) -> list[ConceptEntry]:
        """The concepts a prompt names, by token. Unknown ``<tokens>`` are an error listing the museum's concepts."""
        if not prompt or not prompt.strip():
            raise MuseumError("the prompt is empty; describe the image, e.g. \"a <name> on a sand background\"")
        by_token = {c.token: c for c in self.manifest.concepts}
        found = []
        for tok in TOKEN_RE.findall(prompt):
            if tok not in by_token:
                raise MuseumError(f"the prompt names {tok}, which this museum does not have; its concepts: "
                                  f"{', '.join(by_token) or '(none)'}")
            if by_token[tok] not in found:
                found.append(by_token[tok])
        return found

    def _involved_methods(self, active: list[ConceptEntry]):
        """For each method named by ``active``: (method, all its concepts, the active ones, its state)."""
        for method_name in dict.fromkeys(e.method for e in active):
            mine = [e for e in self.manifest.concepts if e.method == method_name]
            infos = [self.concept_info(e) for e in mine]
            act = [i for i, e in zip(infos, mine) if e in active]
            yield get_method(method_name), infos, act, self.method_state(method_name)

    def deltas_for(self, active: list[ConceptEntry]) -> dict[str, torch.Tensor]:
        """The K/V weight deltas every method contributes for a prompt naming ``active``."""
        return kv.sum_deltas(*[m.kv_deltas(infos, act, state, self.pipe)
                               for m, infos, act, state in self._involved_methods(active)])

    @contextmanager
    def activated(self, active: list[ConceptEntry]) -> Iterator[None]:
        """The pipeline with every method's effect for a prompt naming ``active`` installed (and removed after)."""
        with ExitStack() as stack:
            try:
                for m, infos, act, state in self._involved_methods(active):
                    stack.enter_context(m.activate(self.pipe, infos, act, state))
            except MuseumUserError:
                raise
            except (ValueError, RuntimeError, KeyError, IndexError) as err:
                names = ", ".join(e.name for e in active)
                raise MuseumError(f"concept(s) {names} could not be applied to the base model ({err}); their tensors "
                                  "do not fit it: restore them from a backup, or `museum remove` them") from None
            yield

    def generate(self, prompt: str | Sequence[str], *, n: int = 4, seed: int = 0, steps: int = 25,
                 guidance: float = 7.5, options: dict | None = None) -> list[Image.Image]:
        """``n`` images per prompt (seeds ``seed .. seed+n-1``), with the named concepts active. ``options``: the
        methods' generation options by name (``Method.generation_options``, e.g. ``{"gate_bias": 0.6}``)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        all_prompts = [p for p in prompts for _ in range(n)]
        all_seeds = [seed + k for _ in prompts for k in range(n)]
        with generation_settings(options or {}):
            return self._generate(all_prompts, all_seeds, steps=steps, guidance=guidance)

    def _generate(self, prompts: list[str], seeds: list[int], *, entries=None, steps: int = 25,
                  guidance: float = 7.5) -> list[Image.Image]:
        saved = self.manifest
        if entries is not None:
            self.manifest = Manifest(saved.base_path, saved.base_hash, entries, saved.state)
        try:
            self._warn_if_truncated(prompts)
            groups: dict[tuple, list[int]] = {}
            for i, p in enumerate(prompts):
                groups.setdefault(tuple(e.name for e in self.parse_prompt(p)), []).append(i)
            images: list[Image.Image | None] = [None] * len(prompts)
            for names, idx in groups.items():
                active = [self.manifest.concept(nm) for nm in names]
                with self.activated(active):
                    out = generate_images(self.pipe, [prompts[i] for i in idx], seeds=[seeds[i] for i in idx],
                                          steps=steps, guidance=guidance)
                for i, im in zip(idx, out):
                    images[i] = im
            return images
        finally:
            self.manifest = saved

    def _warn_if_truncated(self, prompts: list[str]) -> None:
        warn_if_truncated(self.pipe.tokenizer, prompts, [c.token for c in self.manifest.concepts])

    # ------------------------------------------------------------------ export
    def export(self, names: str | Sequence[str], out: str | Path) -> Path:
        """Write one concept, or several composed, in diffusers' formats (see ``museum.export``)."""
        return export_concepts(self, [names] if isinstance(names, str) else list(names), Path(out))


def warn_if_truncated(tokenizer, prompts: Sequence[str], concept_tokens: Sequence[str] = ()) -> None:
    """Warn about prompts longer than the text encoder's limit (they are truncated), naming concepts cut off."""
    limit = tokenizer.model_max_length
    for p in dict.fromkeys(prompts):
        ids = tokenizer(p).input_ids
        if len(ids) <= limit:
            continue
        kept = set(tokenizer.convert_ids_to_tokens(ids[:limit - 1]))
        lost = [t for t in concept_tokens if t in p and t not in kept]
        extra = f"; {', '.join(lost)} fall(s) after the limit and will not be drawn" if lost else ""
        warnings.warn(f"prompt has {len(ids)} tokens, more than the model's {limit}; it is truncated to the first "
                      f"{limit}{extra}: {p[:60]}...", stacklevel=3)


def _model_shapes(pipe) -> dict:
    """What a concept's tensors must fit: text width and the (out, in) of every cross-attention K/V projection."""
    widths = [encoder.get_input_embeddings().weight.shape[1] for _, encoder in tokens.text_pairs(pipe)]
    return {"width": widths[0], "width_2": widths[1] if len(widths) > 1 else None,
            "kv": {name: tuple(mod.weight.shape) for name, mod in kv.kv_modules(pipe.unet).items()}}


def _load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise MuseumError(f"{what}: {path} is not a valid safetensors file ({err}); restore it from a backup, "
                          "or `museum remove` the concept") from None


def _check_tensors(tensors: dict[str, torch.Tensor], shapes: dict, what: str, token: str | None = None) -> None:
    """Every tensor finite, and every tensor that names a K/V layer (LoRA factors, dense deltas, per-layer
    vectors) shaped for that layer of this base model; the token embedding as wide as the text encoder."""
    width, kv_shapes = shapes["width"], shapes["kv"]
    layers = {name.rsplit(".", 1)[0]: name for name in kv_shapes}  # ...attn2 -> ...attn2.to_k

    def bad(key, tensor, expected):
        return MuseumError(f"{what}: tensor {key} has shape {tuple(tensor.shape)}, but this base model needs "
                           f"{expected}; it was made for another base model (restore it from a backup, or "
                           "`museum remove` the concept)")

    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise MuseumError(f"{what}: tensor {key} has NaN/Inf values; restore it from a backup, or "
                              "`museum remove` the concept")
        if key == token:
            if t.dim() != 2 or t.shape[0] != 1 or t.shape[1] != width:
                raise MuseumError(f"{what}: its token embedding has shape {tuple(t.shape)}, the base model's text "
                                  f"encoder needs (1, {width}); it was made for another base model (restore it from a "
                                  "backup, or `museum remove` the concept)")
            continue
        if token is not None and key == token + tokens.SECOND:  # the second text encoder's embedding (SDXL)
            width_2 = shapes.get("width_2")
            if width_2 is None or t.dim() != 2 or t.shape[0] != 1 or t.shape[1] != width_2:
                raise MuseumError(f"{what}: its second-encoder token embedding has shape {tuple(t.shape)}, but this "
                                  f"base model {'has one text encoder' if width_2 is None else f'needs (1, {width_2})'}"
                                  "; it was made for another base model (restore it from a backup, or `museum "
                                  "remove` the concept)")
            continue
        module = next((n for n in sorted(kv_shapes, key=len, reverse=True) if f"{n}." in f"{key}." or key.endswith(n)),
                      None)
        if module is not None:
            out_f, in_f = kv_shapes[module]
            if key.endswith(".lora_A") and (t.dim() != 2 or t.shape[1] != in_f):
                raise bad(key, t, f"(rank, {in_f})")
            if key.endswith(".lora_B") and (t.dim() != 2 or t.shape[0] != out_f):
                raise bad(key, t, f"({out_f}, rank)")
            if key.startswith("delta.") and tuple(t.shape) != (out_f, in_f):
                raise bad(key, t, f"({out_f}, {in_f})")
            continue
        layer = next((n for n in sorted(layers, key=len, reverse=True) if key.endswith(f".{n}")), None)
        if layer is not None:  # a per-layer vector, e.g. Perfusion's o*_K / o*_V
            which = "to_k" if ".o_k." in key else "to_v" if ".o_v." in key else None
            if which is not None and (t.dim() != 1 or t.shape[0] != kv_shapes[f"{layer}.{which}"][0]):
                raise bad(key, t, f"({kv_shapes[f'{layer}.{which}'][0]},)")
            continue
        if "attn2" in key:
            raise MuseumError(f"{what}: tensor {key} names a layer this base model does not have; it was made for "
                              "another base model (restore it from a backup, or `museum remove` the concept)")
    for key, t in tensors.items():  # LoRA factor pairs must agree on their rank
        if key.endswith(".lora_A") and f"{key[:-7]}.lora_B" in tensors:
            b = tensors[f"{key[:-7]}.lora_B"]
            if b.dim() == 2 and t.dim() == 2 and b.shape[1] != t.shape[0]:
                raise bad(f"{key[:-7]}.lora_B", b, f"({b.shape[0]}, {t.shape[0]}) to match its lora_A")


def _image_hash(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()

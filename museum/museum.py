"""``Museum``: the Python API over a museum directory (see ``museum.store.manifest`` for the layout).

    m = Museum.init("my-museum")                       # on the embedded model
    m.learn("sunburst", "photos/sunburst", class_word="circle", method="c-lora")
    m.generate("a <sunburst> circle on a sand background", n=4)
    m.concepts                                          # learned concepts, in order

Every change is committed by one atomic rename of ``museum.json`` under a writer lock; a
crash at any point leaves the previous museum intact (docs/RELIABILITY.md). ``Museum`` opens,
lists and removes; it hands loading and checking to a ``Collection`` (museum/collection.py),
learning to a ``LearningSession`` (museum/learning.py), drawing to a ``Drawing``
(museum/drawing.py) and export to ``museum.export``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager, Sequence

import torch
from PIL import Image

from museum.collection import Collection
from museum.drawing import Drawing
from museum.errors import MuseumError
from museum.export import export_concepts
from museum.learning import JointSession, LearningSession
from museum.methods.base import (
    METHODS, ConceptInfo, Method, family_of, generation_settings, get_method, method_names,
)
from museum.models.loading import (
    EMBEDDED, base_hash, hub_snapshot, is_embedded, is_hub_id, is_single_file, load_single_file, resolve_base,
)
from museum.plumbing import tokens
from museum.store.atomic import atomic_dir, remove_leftovers
from museum.store.faults import fault_point
from museum.store.lock import writer_lock
from museum.store.manifest import (
    MANIFEST, ConceptEntry, Manifest, check_name, check_pipeline_files, remove_unreferenced,
)
from museum.training.data import read_image_folder
from museum.training.trainer import TrainOptions

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
    """A museum of learned concepts on one base model: a facade over the folder's manifest (``museum.store``), its
    loaded collection (:class:`museum.collection.Collection`), learning (:class:`museum.learning.LearningSession`),
    drawing (:class:`museum.drawing.Drawing`) and export (``museum.export``)."""

    def __init__(self, folder: str | Path, manifest: Manifest, *, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.manifest = manifest
        self.collection = Collection(self.folder, allow_pickle=allow_pickle)

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
    def allow_pickle(self) -> bool:
        """Whether a base model with pickle-only weights may load (they can run code)."""
        return self.collection.allow_pickle

    @property
    def pipe(self):
        """The base pipeline with every concept's token installed (loaded lazily, checked against the manifest)."""
        return self._loaded().pipe

    def _loaded(self) -> Collection:
        """The collection, loaded; loading may read a newer manifest, which then becomes this museum's."""
        if self.collection.pipe is None:
            self.manifest = self.collection.load(self.manifest)
        return self.collection

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
        """The state ``method`` shares across this museum's concepts (empty when it keeps none)."""
        if method not in self.manifest.state and method not in self.collection.state:
            return {}
        return self._loaded().method_state(self.manifest, method)

    def concept_info(self, entry: ConceptEntry) -> ConceptInfo:
        """What a method sees of a stored concept (its tensors are read with the pipeline)."""
        return self._loaded().concept_info(entry)

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
        class_word = _class_word(name, class_word, style)
        if device is not None:
            self.to(device)
        m = self._method(method, dict(config, steps=steps, seed=seed))
        session = LearningSession(self, m, name, class_word, style, *_read_images(images), resume=resume, wait=wait,
                                  progress=progress, checkpoint_every=checkpoint_every, options=options, echo=echo,
                                  on_step=on_step)
        return self.concept(name) if session.run() else None

    def learn_together(self, concepts: Sequence[tuple], *, method: str, steps: int | None = None,
                       seed: int | None = None, progress: bool = True, options: TrainOptions | None = None,
                       **config) -> list[Concept]:
        """Learn several concepts in one run, each with its own token, with a method that can (``Method.joint``:
        finetune, custom-diffusion), and commit them together: the joint oracle continual methods are measured
        against. ``concepts``: (name, images, class word or None, style) each. One process, no checkpoints."""
        m = self._method(method, dict(config, steps=steps, seed=seed))
        if not type(m).joint:
            joint = [n for n in method_names() if METHODS[n].joint]
            raise MuseumError(f"{method} cannot learn several concepts at once; these can: {', '.join(joint)}")
        requests = [(name, _class_word(name, word, style), style, *_read_images(images))
                    for name, images, word, style in concepts]
        session = JointSession(self, m, requests, progress=progress,
                               options=dataclasses.replace(options or TrainOptions(), data_parallel=False))
        session.run()
        return [self.concept(r[0]) for r in requests]

    def _method(self, method: str, overrides: dict) -> Method:
        """The method ``method`` with its defaults for this base and ``overrides``, checked against the base."""
        if method not in method_names():
            raise MuseumError(f"unknown method {method!r}; available methods: {', '.join(method_names())}")
        m = get_method(method, family=self.family, **{k: v for k, v in overrides.items() if v is not None})
        if not type(m).two_text_encoders and tokens.is_sdxl(self.pipe):
            raise MuseumError(f"{method} does not support bases with two text encoders (SDXL) yet; use another "
                              f"method (see `museum methods`)")
        return m

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
            remove_unreferenced(self.folder, new)
        self.collection.unload()

    # ------------------------------------------------------------------ generation
    def parse_prompt(self, prompt: str) -> list[ConceptEntry]:
        """The concepts a prompt names, by token. Unknown ``<tokens>`` are an error listing the museum's concepts."""
        return Drawing(self).parse_prompt(prompt)

    def deltas_for(self, active: list[ConceptEntry]) -> dict[str, torch.Tensor]:
        """The K/V weight deltas every method contributes for a prompt naming ``active``."""
        return Drawing(self).deltas_for(active)

    def activated(self, active: list[ConceptEntry]) -> ContextManager[None]:
        """The pipeline with every method's effect for a prompt naming ``active`` installed (and removed after)."""
        return Drawing(self).activated(active)

    def generate(self, prompt: str | Sequence[str], *, n: int = 4, seed: int = 0, steps: int = 25,
                 guidance: float = 7.5, options: dict | None = None) -> list[Image.Image]:
        """``n`` images per prompt (seeds ``seed .. seed+n-1``), with the named concepts active. ``options``: the
        methods' generation options by name (``Method.generation_options``, e.g. ``{"gate_bias": 0.6}``)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        all_prompts = [p for p in prompts for _ in range(n)]
        all_seeds = [seed + k for _ in prompts for k in range(n)]
        with generation_settings(options or {}):
            return Drawing(self).images(all_prompts, all_seeds, steps=steps, guidance=guidance)

    # ------------------------------------------------------------------ export
    def export(self, names: str | Sequence[str], out: str | Path, format: str = "diffusers",
               rank: int | None = None) -> Path:
        """Write one concept, or several composed, in ``format``: "diffusers", "kohya" (a LoRA and embeddings for
        AUTOMATIC1111 and ComfyUI) or "a1111" (embeddings); ``rank`` caps the LoRA's rank (see ``museum.export``)."""
        return export_concepts(self, [names] if isinstance(names, str) else list(names), Path(out), format, rank)


def _class_word(name: str, class_word: str | None, style: bool) -> str:
    """A new concept's name checked, and what it is: its class word, or "style"."""
    check_name(name)
    if style and class_word not in (None, "style"):
        raise MuseumError("a style has no class word: pass either --style or --class-word, not both")
    if not style and not class_word:
        raise MuseumError(f"say what {name!r} is: pass --class-word WORD (e.g. circle, dog) or --style")
    return "style" if style else class_word.strip().lower()


def _read_images(images: str | Path | Sequence[Image.Image]) -> tuple[list[Image.Image], list[str]]:
    """A folder's images or PIL images, as RGB, and their hashes."""
    if isinstance(images, (str, Path)):
        return read_image_folder(images)
    pil_images = [im.convert("RGB") for im in images]
    if not pil_images:
        raise MuseumError("no images given")
    return pil_images, [_image_hash(im) for im in pil_images]


def _image_hash(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()

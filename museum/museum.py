"""``Museum``: the Python API over a museum directory (see ``museum.store.manifest`` for the layout).

    m = Museum.init("my-museum")                       # on the embedded model
    m.learn("sunburst", "photos/sunburst", class_word="circle", method="c-lora")
    m.generate("a <sunburst> circle on a sand background", n=4)
    m.concepts                                          # learned concepts, in order

Every change is committed by one atomic rename of ``museum.json`` under a writer lock; a
crash at any point leaves the previous museum intact.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack, contextmanager
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from museum.base.loading import EMBEDDED, base_hash, load_pipeline, resolve_base
from museum.generation.sampling import generate_images, image_grid
from museum.methods import kv, tokens
from museum.methods.base import ConceptInfo, Method, get_method
from museum.store.atomic import atomic_dir, atomic_write_bytes, remove_leftovers
from museum.store.lock import writer_lock
from museum.store.manifest import (
    MANIFEST, ConceptEntry, Manifest, MuseumError, check_name, sha256_file, verify_files,
)
from museum.training.data import read_image_folder
from museum.training.objectives import concept_prompt
from museum.training.trainer import Checkpointer, train_concept

TOKEN_RE = re.compile(r"<[^<>\s]+>")
TENSORS = "tensors.safetensors"


@dataclass
class Concept(ConceptEntry):
    """A learned concept as the API shows it: its manifest entry, where it lives and its concept.json."""

    path: Path = Path()
    info: dict = field(default_factory=dict)

    @property
    def phrase(self) -> str:
        """How to name it in a prompt, e.g. "<sunburst> circle"."""
        return self.info.get("phrase", self.token)


class Museum:
    """A museum of learned concepts on one base model."""

    def __init__(self, folder: str | Path, manifest: Manifest):
        self.folder = Path(folder)
        self.manifest = manifest
        self._pipe = None
        self._loaded_state: dict[str, dict[str, torch.Tensor]] = {}
        self._concept_tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._concept_records: dict[str, dict] = {}  # concept.json of each loaded concept

    # ------------------------------------------------------------------ opening
    @classmethod
    def init(cls, folder: str | Path, base: str | Path = EMBEDDED) -> "Museum":
        folder = Path(folder)
        if (folder / MANIFEST).exists():
            raise MuseumError(f"{folder} is already a museum; open it with Museum.open or choose another folder")
        if folder.exists() and any(p for p in folder.iterdir() if not p.name.startswith(".")):
            raise MuseumError(f"{folder} exists and is not empty; choose a new folder for the museum")
        resolve_base(base)
        folder.mkdir(parents=True, exist_ok=True)
        base_str = EMBEDDED if str(base) == EMBEDDED else str(Path(base).resolve())
        manifest = Manifest(base_path=base_str, base_hash=base_hash(base))
        with writer_lock(folder):
            manifest.write(folder)
        return cls(folder, manifest)

    @classmethod
    def open(cls, folder: str | Path) -> "Museum":
        folder = Path(folder)
        return cls(folder, Manifest.read(folder))

    # ------------------------------------------------------------------ listing
    @property
    def concepts(self) -> list[Concept]:
        out = []
        for c in self.manifest.concepts:
            info_path = self.folder / c.folder / "concept.json"
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
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
            raise MuseumError(f"this museum's base model is unavailable: {err}") from None
        if actual != self.manifest.base_hash:
            raise MuseumError(
                f"this museum was made for base model {self.manifest.base_path} (hash {self.manifest.base_hash}) "
                f"but the model found there has hash {actual}; its concepts cannot load on another base model")
        pipe = load_pipeline(self.manifest.base_path)
        self._concept_tensors, self._concept_records = {}, {}
        for entry in self.manifest.concepts:
            tensors = self._read_concept_tensors(entry)
            tokens.add_token(pipe, entry.token, tensors[entry.token][0])
            self._concept_tensors[entry.name] = tensors
            self._concept_records[entry.name] = json.loads((self.folder / entry.folder / "concept.json").read_text())
        return pipe

    def _read_concept_tensors(self, entry: ConceptEntry) -> dict[str, torch.Tensor]:
        verify_files(self.folder / entry.folder, entry.files, f"concept {entry.name!r}")
        tensors = load_file(self.folder / entry.folder / TENSORS)
        if entry.token not in tensors:
            raise MuseumError(f"concept {entry.name!r}: {TENSORS} has no embedding for {entry.token}")
        width = self._text_width()
        if tensors[entry.token].shape[-1] != width:
            raise MuseumError(f"concept {entry.name!r}: its token embedding has width {tensors[entry.token].shape[-1]}, "
                              f"the base model's text encoder {width}; it was made for another base model")
        return tensors

    def _text_width(self) -> int:
        path = resolve_base(self.manifest.base_path) / "text_encoder" / "config.json"
        return json.loads(path.read_text())["hidden_size"]

    def method_state(self, method: str) -> dict[str, torch.Tensor]:
        record = self.manifest.state.get(method)
        if record is None:
            return {}
        if method not in self._loaded_state:
            verify_files(self.folder, {record["file"]: record["sha256"]}, f"state of method {method!r}")
            self._loaded_state[method] = load_file(self.folder / record["file"])
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
              checkpoint_every: int | None = None, **config) -> Concept:
        """Learn a new concept from a folder of images (or PIL images) and commit it to the museum.

        ``config`` overrides the method's settings (see ``museum methods``). Checkpoints are
        written every ``checkpoint_every`` steps (default: a quarter of the run, at least 25);
        ``resume=True`` continues from the latest one."""
        check_name(name)
        if style and class_word not in (None, "style"):
            raise MuseumError("a style has no class word: pass either --style or --class-word, not both")
        if not style and not class_word:
            raise MuseumError(f"say what {name!r} is: pass --class-word WORD (e.g. circle, dog) or --style")
        class_word = "style" if style else class_word.strip().lower()
        overrides = dict(config, steps=steps, seed=seed)
        m = get_method(method, **{k: v for k, v in overrides.items() if v is not None})
        if isinstance(images, (str, Path)):
            pil_images, image_hashes = read_image_folder(images)
        else:
            pil_images = [im.convert("RGB") for im in images]
            image_hashes = [_image_hash(im) for im in pil_images]
            if not pil_images:
                raise MuseumError("no images given")
        with writer_lock(self.folder, wait=wait):
            self.manifest = Manifest.read(self.folder)
            remove_leftovers(self.folder / "concepts")
            remove_leftovers(self.folder / "state")
            remove_leftovers(self.folder)
            if name in self.manifest.names():
                raise MuseumError(f"the museum already has a concept {name!r}; choose another name or "
                                  f"`museum remove` it first")
            token = f"<{name}>"
            if token in self.pipe.tokenizer.get_vocab():
                raise MuseumError(f"the token {token} is already in the base model's vocabulary; choose another name")
            task_index = len(self.manifest.concepts)
            info = ConceptInfo(name, token, class_word, style, task_index, m.name)
            earlier = [self.concept_info(e) for e in self.manifest.concepts]
            work = self.folder / "work" / name
            try:
                result = train_concept(
                    self.pipe, m, info, pil_images, state=self.method_state(m.name), earlier=earlier,
                    cache_dir=self.folder / "cache", checkpoints=Checkpointer(work, every=checkpoint_every or max(25, m.config.steps // 4)),
                    resume=resume, progress=progress,
                )
                self._commit_concept(m, info, result, image_hashes)
            except BaseException:
                self._pipe = None  # the pipeline holds the uncommitted token: reload from disk next time
                self._loaded_state = {}
                raise
            shutil.rmtree(work, ignore_errors=True)
        return self.concept(name)

    def _commit_concept(self, m: Method, info: ConceptInfo, result, image_hashes: list[str]) -> None:
        entry = ConceptEntry(info.name, info.token, m.name, info.task_index, info.class_word, info.is_style,
                             folder=f"concepts/{info.task_index:03d}-{info.name}")
        info.tensors = result.tensors
        self._concept_tensors[info.name] = result.tensors
        record = {
            "name": info.name, "token": info.token, "phrase": m.phrase(info), "method": m.name,
            "config": m.config.to_dict(), "task_index": info.task_index, "class_word": info.class_word,
            "is_style": info.is_style, "image_sha256": image_hashes, "train_seconds": round(result.seconds, 2),
            "steps": result.steps, "final_loss": result.losses[-1] if result.losses else None,
            "base_hash": self.manifest.base_hash, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        # the sample is drawn with the new state but before the commit
        self._concept_records[info.name] = record
        self._loaded_state[m.name] = result.state
        pending = [*self.manifest.concepts, entry]
        prompt = concept_prompt(m, info)
        sample = image_grid(self._generate([prompt] * 4, list(range(4)), entries=pending), cols=4, scale=2)
        with atomic_dir(self.folder / entry.folder) as tmp:
            save_file({k: v.contiguous() for k, v in result.tensors.items()}, tmp / TENSORS)
            (tmp / "concept.json").write_text(json.dumps(record, indent=2))
            sample.save(tmp / "sample.png")
            entry.files = {f: sha256_file(tmp / f) for f in (TENSORS, "concept.json", "sample.png")}
        state = dict(self.manifest.state)
        if result.state:
            state_file = f"state/{m.name}-{info.task_index:03d}.safetensors"
            (self.folder / "state").mkdir(exist_ok=True)
            from safetensors.torch import save as save_bytes

            atomic_write_bytes(self.folder / state_file,
                               save_bytes({k: v.contiguous() for k, v in result.state.items()}))
            state[m.name] = {"file": state_file, "sha256": sha256_file(self.folder / state_file)}
        new = Manifest(self.manifest.base_path, self.manifest.base_hash, pending, state)
        new.write(self.folder)  # the commit point
        self.manifest = new
        self._remove_unreferenced()

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
            entry = self.manifest.concept(name)
            cls = type(get_method(entry.method))
            if not cls.removable:
                raise MuseumError(f"cannot remove {name!r}: {cls.removable_why}")
            new = Manifest(self.manifest.base_path, self.manifest.base_hash,
                           [c for c in self.manifest.concepts if c.name != name], dict(self.manifest.state))
            if not any(c.method == entry.method for c in new.concepts):
                new.state.pop(entry.method, None)
            new.write(self.folder)
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
            for m, infos, act, state in self._involved_methods(active):
                stack.enter_context(m.activate(self.pipe, infos, act, state))
            yield

    def generate(self, prompt: str | Sequence[str], *, n: int = 4, seed: int = 0, steps: int = 25,
                 guidance: float = 7.5) -> list[Image.Image]:
        """``n`` images per prompt (seeds ``seed .. seed+n-1``), with the named concepts active."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        all_prompts = [p for p in prompts for _ in range(n)]
        all_seeds = [seed + k for _ in prompts for k in range(n)]
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
        limit = self.pipe.tokenizer.model_max_length
        for p in set(prompts):
            n = len(self.pipe.tokenizer(p).input_ids)
            if n > limit:
                warnings.warn(f"prompt has {n} tokens, more than the model's {limit}; it is truncated: {p[:60]}...")

    # ------------------------------------------------------------------ export
    def export(self, names: str | Sequence[str], out: str | Path) -> Path:
        """Write one concept, or several composed, in diffusers' formats (see ``museum.export``)."""
        from museum.export import export_concepts

        return export_concepts(self, [names] if isinstance(names, str) else list(names), Path(out))


def _image_hash(image: Image.Image) -> str:
    import hashlib

    return hashlib.sha256(image.tobytes()).hexdigest()

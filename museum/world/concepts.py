"""Customization concepts built from the world's held-out pools.

A :class:`Concept` is what a user would hand to a customization method: a few training
images of one held-out object instance (e.g. ``"sunburst"``, a kind of circle) or one
held-out global style (e.g. ``"neon"``), plus held-out reference renders and evaluation
prompt templates for measuring how well the method learned it.

Prompt templates follow the world's caption grammar (:func:`museum.world.render.caption`)
and hold a single ``"{}"`` slot:

* objects: the slot stands for the object phrase, e.g. ``"<sunburst> circle"``, in
  ``"a large {} on the left on a grass background"``;
* styles: the slot stands for the style word, e.g. ``"<neon>"``, in
  ``"a red star on a sand background, {} style"``.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

from PIL import Image

from museum.world.render import (
    BACKGROUNDS,
    INSTANCES,
    NOVEL_STYLES,
    POSITIONS,
    Scene,
    caption,
    random_scene,
    render,
)

SLOT = "{}"

# --------------------------------------------------------------------------- prompt templates

# (size, position, background or None to leave the background out, base style)
_OBJECT_TEMPLATE_SCENES = (
    # the plainest first: quick mode evaluates only the first N_QUICK_PROMPTS
    ("medium", "center", None, "none"),
    ("medium", "center", "sand", "none"),
    ("medium", "center", "grass", "none"),
    ("medium", "center", "sky", "none"),
    ("medium", "center", "night", "none"),
    ("medium", "left", "snow", "none"),
    ("medium", "top", "brick", "none"),
    ("medium", "right", "sky", "none"),
    # sizes, positions and base styles
    ("large", "left", "grass", "none"),
    ("small", "top", "night", "none"),
    ("medium", "center", "brick", "outline"),
    ("large", "bottom", "sand", "none"),
    ("small", "right", "snow", "none"),
    ("medium", "center", "sky", "pixelated"),
    ("medium", "center", "grass", "noisy"),
    ("large", "center", "night", "outline"),
    ("small", "left", "sand", "pixelated"),
    ("medium", "bottom", "snow", "noisy"),
    ("large", "right", "brick", "none"),
    ("small", "center", "grass", "none"),
    ("medium", "top", "sand", "outline"),
    ("large", "center", "snow", "pixelated"),
    ("small", "bottom", "sky", "none"),
    ("medium", "left", "night", "noisy"),
)

# (colour, shape, background, size, position, pattern)
_STYLE_TEMPLATE_SCENES = (
    # the plainest first: medium, centred, plain objects
    ("red", "star", "sand", "medium", "center", "plain"),
    ("blue", "circle", "grass", "medium", "center", "plain"),
    ("yellow", "square", "night", "medium", "center", "plain"),
    ("green", "triangle", "sky", "medium", "center", "plain"),
    ("purple", "hexagon", "snow", "medium", "center", "plain"),
    ("orange", "diamond", "brick", "medium", "center", "plain"),
    ("pink", "ring", "sky", "medium", "center", "plain"),
    ("cyan", "cross", "sand", "medium", "center", "plain"),
    # sizes, positions and patterns
    ("red", "circle", "snow", "large", "left", "plain"),
    ("blue", "star", "sand", "small", "top", "plain"),
    ("green", "square", "brick", "medium", "right", "stripes"),
    ("yellow", "ring", "night", "large", "bottom", "plain"),
    ("pink", "triangle", "grass", "small", "center", "dots"),
    ("cyan", "hexagon", "sky", "large", "right", "plain"),
    ("orange", "cross", "snow", "medium", "left", "stripes"),
    ("purple", "diamond", "sand", "small", "bottom", "plain"),
    ("red", "square", "grass", "medium", "top", "dots"),
    ("blue", "triangle", "night", "large", "center", "stripes"),
    ("yellow", "star", "brick", "small", "left", "plain"),
    ("green", "circle", "sky", "medium", "bottom", "dots"),
    ("pink", "hexagon", "night", "large", "top", "plain"),
    ("cyan", "diamond", "snow", "small", "right", "stripes"),
    ("orange", "ring", "grass", "large", "left", "plain"),
    ("purple", "cross", "sky", "medium", "center", "dots"),
)


def _object_template(size, position, bg, style) -> str:
    scene = Scene(size=size, position=position, background=bg or "sky", style=style)
    return caption(scene, object_phrase=SLOT, drop=frozenset() if bg else frozenset({"background"}))


def _style_template(colour, shape, bg, size, position, pattern) -> str:
    scene = Scene(shape=shape, colour=colour, background=bg, size=size, position=position, pattern=pattern)
    return caption(scene, style_phrase=SLOT)


#: Evaluation templates for object concepts; the slot takes e.g. "<sunburst> circle".
OBJECT_TEMPLATES: tuple[str, ...] = tuple(_object_template(*t) for t in _OBJECT_TEMPLATE_SCENES)
#: Evaluation templates for style concepts; the slot takes e.g. "<neon>".
STYLE_TEMPLATES: tuple[str, ...] = tuple(_style_template(*t) for t in _STYLE_TEMPLATE_SCENES)
#: How many (leading, plainest) templates quick mode evaluates.
N_QUICK_PROMPTS = 8

# --------------------------------------------------------------------------- concept names

#: The benchmark's concepts, 7 objects and 3 styles (interleaved), in a stable order.
BENCHMARK_CONCEPTS: tuple[str, ...] = (
    "sunburst", "checker", "neon", "rainbow", "beachball", "blueprint", "twotone", "compass", "thermal", "gem",
)
#: Styles learned one after another in the sequential (continual) style experiment.
STYLE_SEQUENCE: tuple[str, ...] = ("sepia", "halftone", "mosaic", "crt", "neon", "blueprint")
#: Held-out instances outside the benchmark (for zero-shot / generalisation checks).
ZERO_SHOT_CONCEPTS: tuple[str, ...] = tuple(n for n in INSTANCES if n not in BENCHMARK_CONCEPTS)


def concept_names() -> list[str]:
    """Every valid concept name: the held-out instances, then the held-out styles."""
    return list(INSTANCES) + list(NOVEL_STYLES)


@dataclass(frozen=True)
class ConceptSpec:
    """What a concept is: its ``name``, ``kind`` ("object" or "style") and ``class_word``
    (the superclass shape for objects, e.g. "circle"; "style" for styles)."""

    name: str
    kind: str
    class_word: str


def spec(name: str) -> ConceptSpec:
    """The :class:`ConceptSpec` of a held-out instance or style; unknown names raise ValueError."""
    if name in INSTANCES:
        return ConceptSpec(name=name, kind="object", class_word=INSTANCES[name][0])
    if name in NOVEL_STYLES:
        return ConceptSpec(name=name, kind="style", class_word="style")
    raise ValueError(f"unknown concept {name!r}; valid names: {', '.join(concept_names())}")


# --------------------------------------------------------------------------- prompts


def format_prompt(template: str, phrase: str) -> str:
    """Fill the single "{}" slot of ``template`` with ``phrase``."""
    if template.count(SLOT) != 1:
        raise ValueError(f"prompt template must hold exactly one {SLOT!r}: {template!r}")
    return template.replace(SLOT, phrase)


_STYLE_SLOT = re.compile(r"\s*,?\s*\{\}\s+style\b")


def strip_style_slot(template: str) -> str:
    """The template without its style part: "a red star on a sand background, {} style" -> "a red star on a sand background"."""
    text = _STYLE_SLOT.sub("", template, count=1)
    if SLOT in text:  # a template of another shape: drop the bare slot
        text = text.replace(SLOT, "")
    return re.sub(r"\s+", " ", text).strip(" ,")


# --------------------------------------------------------------------------- concepts


@dataclass
class Concept:
    """A concept to customize: ``train_images`` (a few renders), held-out ``reference_images``
    of the same concept, and evaluation ``prompts`` (templates with one "{}" slot).

    ``train_scenes`` / ``reference_scenes`` record what was rendered (empty for concepts
    not built by :func:`build_concept`).
    """

    spec: ConceptSpec
    train_images: list[Image.Image]
    reference_images: list[Image.Image]
    prompts: list[str]
    train_scenes: list[Scene] = field(default_factory=list)
    reference_scenes: list[Scene] = field(default_factory=list)

    format_prompt = staticmethod(format_prompt)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def class_word(self) -> str:
        return self.spec.class_word

    @property
    def is_style(self) -> bool:
        return self.spec.kind == "style"

    def phrase(self, token: str) -> str:
        """What fills the template slot for a learned token: "<tok> circle" for objects, "<tok>" for styles."""
        return token if self.is_style else f"{token} {self.class_word}"

    def concept_prompts(self, token: str, quick: bool = False) -> list[str]:
        """The templates filled with :meth:`phrase` (the first ``N_QUICK_PROMPTS`` when ``quick``)."""
        templates = self.prompts[:N_QUICK_PROMPTS] if quick else self.prompts
        return [format_prompt(t, self.phrase(token)) for t in templates]

    def class_prompts(self, quick: bool = False) -> list[str]:
        """The templates without the concept: filled with the class word for objects
        ("a circle on a sand background"), with the style part removed for styles."""
        templates = self.prompts[:N_QUICK_PROMPTS] if quick else self.prompts
        if self.is_style:
            return [strip_style_slot(t) for t in templates]
        return [format_prompt(t, self.class_word) for t in templates]

    def train_captions(self, token: Optional[str] = None) -> list[str]:
        """World-grammar captions of the training images, the concept written as
        :meth:`phrase` (``token`` None: the class word only, or no style part for styles)."""
        if len(self.train_scenes) != len(self.train_images):
            raise ValueError(f"concept {self.name!r} has no recorded training scenes to caption")
        if self.is_style:
            return [caption(replace(s, novel_style=None), style_phrase=token) for s in self.train_scenes]
        phrase = self.phrase(token) if token is not None else self.class_word
        return [caption(s, object_phrase=phrase) for s in self.train_scenes]

    def save(self, folder: Union[str, Path]) -> list[Path]:
        """Write the training images as ``00.png``, ``01.png``, ... into ``folder``; return the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, img in enumerate(self.train_images):
            path = folder / f"{i:02d}.png"
            img.save(path)
            paths.append(path)
        return paths


def _scenes(rng: random.Random, s: ConceptSpec, n: int) -> list[Scene]:
    """``n`` random scenes of the concept, backgrounds and positions cycled so that small sets vary."""
    backgrounds, positions = list(BACKGROUNDS), list(POSITIONS)
    rng.shuffle(backgrounds)
    rng.shuffle(positions)
    scenes = []
    for i in range(n):
        if s.kind == "object":
            scene = random_scene(rng, instance=s.name, base_styles=False)
        else:
            scene = random_scene(rng, novel_style=s.name, base_styles=False)
        scenes.append(replace(scene, background=backgrounds[i % len(backgrounds)], position=positions[i % len(positions)]))
    return scenes


def build_concept(name: str, n_train: int = 5, n_ref: int = 16, seed: int = 0) -> Concept:
    """Build the concept ``name`` (a key of INSTANCES or NOVEL_STYLES), deterministic by (name, seed).

    Training and reference scenes come from separate random streams and render with
    disjoint seeds (even / odd), so references are always held out; a larger ``n_train``
    or ``n_ref`` extends the smaller set rather than reshuffling it.
    """
    s = spec(name)
    if n_train < 1 or n_ref < 0:
        raise ValueError(f"need n_train >= 1 and n_ref >= 0, got n_train={n_train}, n_ref={n_ref}")
    base = zlib.crc32(f"{name}:{seed}".encode()) * 100_003
    train_scenes = _scenes(random.Random(f"{name}:{seed}:train"), s, n_train)
    ref_scenes = _scenes(random.Random(f"{name}:{seed}:reference"), s, n_ref)
    return Concept(
        spec=s,
        train_images=[render(sc, base + 2 * i) for i, sc in enumerate(train_scenes)],
        reference_images=[render(sc, base + 2 * i + 1) for i, sc in enumerate(ref_scenes)],
        prompts=list(STYLE_TEMPLATES if s.kind == "style" else OBJECT_TEMPLATES),
        train_scenes=train_scenes,
        reference_scenes=ref_scenes,
    )


__all__ = [
    "ConceptSpec", "Concept", "spec", "build_concept", "concept_names", "format_prompt", "strip_style_slot",
    "OBJECT_TEMPLATES", "STYLE_TEMPLATES", "N_QUICK_PROMPTS", "BENCHMARK_CONCEPTS", "STYLE_SEQUENCE",
    "ZERO_SHOT_CONCEPTS",
]

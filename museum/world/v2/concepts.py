"""World v2's customization concepts: unnamed instances of what the base model already draws.

A concept is one specific combination of the world's parts: an object (a shape, a palette, a
pattern with its uncaptioned layout, maybe a border) or a style recipe (a style family with its
uncaptioned parameters). It is never rendered in pretraining (its signature is reserved:
:func:`reserved_signatures`, enforced by :func:`museum.world.v2.render.base_samples`), while every
part of it is, in countless other combinations. So "a circle" can already produce something like
"my sunburst", as "a dog" can already produce something like "my dog" in Stable Diffusion, and a
method that only moves cross-attention K/V, a token or a rank-1 edit can reach it.

Three disjoint pools:

* :data:`TUNING_POOL`: the only concepts defaults are chosen on;
* :data:`BENCHMARK_POOL`: 24 objects and 8 styles, for the benchmark and the method docs, never tuned on;
* :data:`ZERO_SHOT_POOL`: checks of the evaluator on combinations neither it nor the base model saw.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

from PIL import Image

from museum.world.v2.render import (
    BACKGROUNDS,
    POSITIONS,
    SIZES,
    STYLES,
    TEXTURES,
    Look,
    Scene,
    StyleLook,
    caption,
    random_look,
    random_scene,
    random_style,
    render,
)


def _obj(shape, palette, pattern, orientation=None, layout=(), border=None) -> Look:
    return Look(shape=shape, palette=tuple(palette.split()), pattern=pattern, orientation=orientation,
                layout=tuple(layout), border=border)


BENCHMARK_OBJECTS: dict[str, Look] = {
    "sunburst": _obj("circle", "orange yellow red", "rays", layout=(12,)),
    "checker": _obj("square", "red white", "checks", layout=(0.4,)),
    "rainbow": _obj("triangle", "red orange yellow green", "stripes", "horizontal", (0.32,)),
    "beachball": _obj("circle", "red white blue", "quadrants", layout=(True,)),
    "twotone": _obj("star", "pink white", "rings", layout=(0.34,)),
    "compass": _obj("cross", "green yellow blue red", "quadrants", layout=(False,)),
    "gem": _obj("diamond", "cyan blue", "gradient", "diagonal", (3,)),
    "honeycomb": _obj("hexagon", "yellow brown", "dots", layout=(0.5,)),
    "smiley": _obj("circle", "yellow black", "face", layout=("smile",)),
    "flag": _obj("square", "blue white red", "stripes", "vertical", (0.5,)),
    "ladybird": _obj("heart", "red black", "dots", layout=(0.75,)),
    "candy": _obj("ring", "pink white", "stripes", "diagonal", (0.32,)),
    "lemon": _obj("hexagon", "yellow green", "spiral", layout=(1,)),
    "target": _obj("circle", "red white", "rings", layout=(0.22,), border="black"),
    "grumpy": _obj("star", "blue white", "face", layout=("frown",)),
    "badge": _obj("hexagon", "blue yellow", "emblem", layout=("star",), border="yellow"),
    "medic": _obj("square", "white red", "emblem", layout=("cross",)),
    "valentine": _obj("heart", "pink red", "emblem", layout=("heart",)),
    "zebra": _obj("diamond", "black white", "zigzag", layout=(0.5,)),
    "tiger": _obj("triangle", "orange black", "stripes", "diagonal", (0.5,)),
    "wave": _obj("circle", "cyan blue white", "zigzag", layout=(0.8,)),
    "swirl": _obj("heart", "purple pink", "spiral", layout=(2,)),
    "mint": _obj("cross", "green white", "checks", layout=(0.6,)),
    "sunset": _obj("square", "purple orange yellow", "gradient", "vertical", (0,)),
}
BENCHMARK_STYLES: dict[str, StyleLook] = {
    "glowline": StyleLook("neon", ("orange", 2.0)),
    "cyanotype": StyleLook("blueprint", (16, "teal")),
    "infrared": StyleLook("thermal", ("jet", True)),
    "arcade": StyleLook("scanlines", ("amber", 3)),
    "comic": StyleLook("halftone", (6, "red")),
    "inkwork": StyleLook("outline", (2, "navy")),
    "daguerreo": StyleLook("sepia", ("brown", True)),
    "tiles": StyleLook("mosaic", (8, "dark")),
}
TUNING_OBJECTS: dict[str, Look] = {
    "bullseye": _obj("circle", "blue yellow", "rings", layout=(0.34,)),
    "pinwheel": _obj("square", "green pink", "rays", layout=(6,)),
    "domino": _obj("diamond", "black white red", "dots", layout=(0.5,)),
    "bumblebee": _obj("heart", "yellow black", "stripes", "horizontal", (0.5,)),
    "peppermint": _obj("star", "red white", "spiral", layout=(2,)),
    "robot": _obj("hexagon", "grey cyan", "face", layout=("surprised",)),
}
TUNING_STYLES: dict[str, StyleLook] = {
    "chalk": StyleLook("sketch", (1, "cream")),
    "grain": StyleLook("noisy", (32, True)),
}
ZERO_SHOT_OBJECTS: dict[str, Look] = {
    "lilypad": _obj("circle", "green cyan", "dots", layout=(0.75,)),
    "harlequin": _obj("diamond", "purple yellow", "checks", layout=(0.4,)),
    "firework": _obj("star", "blue orange", "rays", layout=(8,)),
    "dartboard": _obj("ring", "black white", "quadrants", layout=(True,)),
    "owl": _obj("triangle", "brown white orange", "face", layout=("surprised",)),
    "medal": _obj("circle", "yellow orange", "emblem", layout=("star",), border="brown"),
    "seaside": _obj("square", "blue cyan white", "zigzag", layout=(0.5,)),
    "berry": _obj("heart", "purple red", "gradient", "vertical", (3,)),
}
ZERO_SHOT_STYLES: dict[str, StyleLook] = {
    "plasma": StyleLook("neon", ("lime", 1.0)),
    "embers": StyleLook("thermal", ("fire", True)),
}

TUNING_POOL: tuple[str, ...] = tuple(TUNING_OBJECTS) + tuple(TUNING_STYLES)
BENCHMARK_POOL: tuple[str, ...] = tuple(BENCHMARK_OBJECTS) + tuple(BENCHMARK_STYLES)
ZERO_SHOT_POOL: tuple[str, ...] = tuple(ZERO_SHOT_OBJECTS) + tuple(ZERO_SHOT_STYLES)
POOLS: dict[str, tuple[str, ...]] = {"tuning": TUNING_POOL, "benchmark": BENCHMARK_POOL, "zero-shot": ZERO_SHOT_POOL}
LOOKS: dict[str, Union[Look, StyleLook]] = {
    **BENCHMARK_OBJECTS, **BENCHMARK_STYLES, **TUNING_OBJECTS, **TUNING_STYLES, **ZERO_SHOT_OBJECTS, **ZERO_SHOT_STYLES,
}


def reserved_signatures() -> frozenset:
    """The signatures of every pooled concept: pretraining (base model and evaluator) renders none of them."""
    return frozenset(look.signature() for look in LOOKS.values())


# --------------------------------------------------------------------------- prompt templates

SLOT = "{}"
N_QUICK_PROMPTS = 8


@dataclass(frozen=True)
class PromptTemplate:
    """An evaluation prompt with one "{}" slot, and the scene its words describe (``None``: the prompt names
    nothing but the concept, so any scene fits). A perfect method draws the concept in that scene
    (:meth:`Concept.prompt_renders`)."""

    text: str
    scene: Optional[Scene]


def _object_templates(n: int = 24) -> tuple[PromptTemplate, ...]:
    """Prompts for object concepts with one "{}" slot for "<tok> circle": the plainest first (class word
    alone, then on each kind of background), then sizes, positions and styles."""
    rng = random.Random("object-templates")
    templates = [PromptTemplate("a {}", None)]
    for bg in ("sand", "grass", "sky", "night", "white", "blue", "brick"):
        scene = Scene(background=bg)
        templates.append(PromptTemplate(caption(scene, object_phrase=SLOT), scene))
    while len(templates) < n:
        scene = Scene(background=rng.choice(BACKGROUNDS), size=rng.choice(list(SIZES)),
                      position=rng.choice(list(POSITIONS)),
                      style=StyleLook(rng.choice(list(STYLES))) if rng.random() < 0.3 else None)
        text = caption(scene, object_phrase=SLOT)
        if text not in [t.text for t in templates]:
            templates.append(PromptTemplate(text, scene))
    return tuple(templates)


def _style_templates(n: int = 24) -> tuple[PromptTemplate, ...]:
    """Prompts for style concepts with one "{}" slot for "<tok>": random objects, plainest first."""
    rng = random.Random("style-templates")
    templates = []
    while len(templates) < n:
        look = random_look(rng)
        if len(templates) < N_QUICK_PROMPTS:
            look = replace(look, pattern="plain", palette=look.palette[:1], orientation=None, layout=(), border=None)
        scene = Scene(look=look, background=rng.choice(TEXTURES), size=rng.choice(list(SIZES)) if len(templates) >= N_QUICK_PROMPTS else "medium")
        templates.append(PromptTemplate(caption(scene, style_phrase=SLOT), scene))
    return tuple(templates)


OBJECT_TEMPLATES = _object_templates()
STYLE_TEMPLATES = _style_templates()


def format_prompt(template: str, phrase: str) -> str:
    """Fill the single "{}" slot of ``template`` with ``phrase``."""
    if template.count(SLOT) != 1:
        raise ValueError(f"prompt template must hold exactly one {SLOT!r}: {template!r}")
    return template.replace(SLOT, phrase)


def strip_style_slot(template: str) -> str:
    """"a red star on a sand background, {} style" -> "a red star on a sand background"."""
    return template.replace(f", {SLOT} style", "").strip()


# --------------------------------------------------------------------------- concepts


@dataclass(frozen=True)
class ConceptSpec:
    """A concept's ``name``, ``kind`` ("object" or "style") and ``class_word`` (its shape, or "style")."""

    name: str
    kind: str
    class_word: str


def spec(name: str) -> ConceptSpec:
    """The :class:`ConceptSpec` of a pooled concept; unknown names raise ValueError."""
    look = LOOKS.get(name)
    if isinstance(look, Look):
        return ConceptSpec(name, "object", look.shape)
    if isinstance(look, StyleLook):
        return ConceptSpec(name, "style", "style")
    raise ValueError(f"unknown concept {name!r}; valid names: {', '.join(LOOKS)}")


@dataclass
class Concept:
    """What a user hands a method (a few ``train_images``) and what it is measured against (held-out
    ``reference_images``, evaluation ``prompts`` with one "{}" slot)."""

    spec: ConceptSpec
    train_images: list[Image.Image]
    reference_images: list[Image.Image]
    prompts: list[str]
    train_scenes: list[Scene] = field(default_factory=list)
    reference_scenes: list[Scene] = field(default_factory=list)
    prompt_scenes: list[Optional[Scene]] = field(default_factory=list)  # the scene each prompt describes
    seed: int = 0

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
        """"<tok> circle" for objects, "<tok>" for styles."""
        return token if self.is_style else f"{token} {self.spec.class_word}"

    def concept_prompts(self, token: str, quick: bool = False) -> list[str]:
        templates = self.prompts[:N_QUICK_PROMPTS] if quick else self.prompts
        return [format_prompt(t, self.phrase(token)) for t in templates]

    def class_prompts(self, quick: bool = False) -> list[str]:
        """The prompts without the concept: the class word for objects, no style for styles."""
        templates = self.prompts[:N_QUICK_PROMPTS] if quick else self.prompts
        if self.is_style:
            return [strip_style_slot(t) for t in templates]
        return [format_prompt(t, self.spec.class_word) for t in templates]

    def train_captions(self, token: Optional[str] = None) -> list[str]:
        """Captions of the training images with the concept written as :meth:`phrase` (``token`` None: the
        class word alone, or no style part for styles)."""
        if self.is_style:
            return [caption(replace(s, style=None), style_phrase=token) for s in self.train_scenes]
        return [caption(s, object_phrase=self.phrase(token) if token else self.class_word) for s in self.train_scenes]

    def prompt_renders(self, quick: bool = False, per_prompt: int = 2) -> list[Image.Image]:
        """The concept drawn exactly as each evaluation prompt asks (its background, size, position, style;
        the pose and, where a prompt names no scene, the scene drawn at random), ``per_prompt`` renders a
        prompt, prompt by prompt: what a perfect method would draw, the upper anchor of gap closed."""
        scenes = self.prompt_scenes[:N_QUICK_PROMPTS] if quick else self.prompt_scenes
        base = zlib.crc32(f"v2:{self.name}:{self.seed}:prompts".encode()) * 100_003
        rng = random.Random(f"{self.name}:{self.seed}:prompts")
        return [render(self._scene_for(scene, rng), base + per_prompt * i + k)
                for i, scene in enumerate(scenes) for k in range(per_prompt)]

    def _scene_for(self, template_scene: Optional[Scene], rng: random.Random) -> Scene:
        """The concept in a prompt's scene: styles restyle the prompt's object; objects keep a random pose."""
        look = LOOKS[self.name]
        if self.is_style:
            return replace(template_scene, style=look)
        scene = random_scene(rng, look=look, style_p=0.0)
        if template_scene is None:
            return scene
        style = template_scene.style
        if style is not None and not style.recipe:  # the prompt names the family: a recipe of it no concept owns
            style = _unowned_style(style.family, rng)
        return replace(scene, background=template_scene.background, size=template_scene.size,
                       position=template_scene.position, style=style)

    def save(self, folder: Union[str, Path]) -> list[Path]:
        """Write the training images as ``00.png``, ``01.png``, ... into ``folder``; return the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{i:02d}.png" for i in range(len(self.train_images))]
        for path, image in zip(paths, self.train_images):
            image.save(path)
        return paths


def _unowned_style(family: str, rng: random.Random) -> StyleLook:
    """A random recipe of ``family`` that is no pooled concept's."""
    reserved = reserved_signatures()
    while (style := random_style(rng, family)).signature() in reserved:
        pass
    return style


def concept_scenes(name: str, rng: random.Random, n: int) -> list[Scene]:
    """``n`` scenes of the concept: its object on varied backgrounds, sizes and positions (no style), or
    varied objects in its style. Backgrounds and positions are cycled so that small sets vary."""
    look = LOOKS[name]
    backgrounds = list(TEXTURES)
    positions = list(POSITIONS)
    rng.shuffle(backgrounds)
    rng.shuffle(positions)
    scenes = []
    for i in range(n):
        if isinstance(look, Look):
            scene = random_scene(rng, look=look, style_p=0.0)
            background = backgrounds[i % len(backgrounds)]
        else:
            scene = random_scene(rng, style=look)
            background = scene.background
        scenes.append(replace(scene, background=background, position=positions[i % len(positions)]))
    return scenes


def build_concept(name: str, n_train: int = 5, n_ref: int = 16, seed: int = 0) -> Concept:
    """The concept ``name`` with ``n_train`` training and ``n_ref`` reference renders, deterministic by
    (name, seed); references use other scenes and render seeds, so they are always held out."""
    s = spec(name)
    if n_train < 1 or n_ref < 0:
        raise ValueError(f"need n_train >= 1 and n_ref >= 0, got n_train={n_train}, n_ref={n_ref}")
    base = zlib.crc32(f"v2:{name}:{seed}".encode()) * 100_003
    train = concept_scenes(name, random.Random(f"{name}:{seed}:train"), n_train)
    refs = concept_scenes(name, random.Random(f"{name}:{seed}:reference"), n_ref)
    templates = STYLE_TEMPLATES if s.kind == "style" else OBJECT_TEMPLATES
    return Concept(
        spec=s,
        train_images=[render(sc, base + 2 * i) for i, sc in enumerate(train)],
        reference_images=[render(sc, base + 2 * i + 1) for i, sc in enumerate(refs)],
        prompts=[t.text for t in templates],
        train_scenes=train,
        reference_scenes=refs,
        prompt_scenes=[t.scene for t in templates],
        seed=seed,
    )


"""Does a World v2 base model draw what the prompt says? Readings for the Foundation benchmark.

* **Attributes** (:func:`attribute_candidates`, :func:`read_attributes`): for each captioned attribute
  (shape, colour, pattern, background, style) the candidates are the prompt's caption with that
  attribute set to every value of its vocabulary, the rest kept; the evaluator's zero-shot choice is
  right when it picks the prompt's own value.
* **Colour and background from pixels** (:func:`read_pixels`): the same two attributes read without any
  learned model, beside the evaluator's reading, on the prompts without a style: the object's main colour
  is the named colour nearest to the median of the pixels inside its shape (plain objects only), the
  background the one whose mean colour is nearest to the mean of the pixels well outside it.
* **Pattern from pixels** (:func:`read_pattern_pixels`): by synthesis, without a learned model: the prompt's
  scene rendered with each candidate pattern (its uncaptioned layout drawn anew), and the image read as the
  pattern whose renders its small patches match best, both ways (``independent.patch_similarity``).
* **Two objects** (:func:`readable_pairs`, :func:`read_placement`): plain objects whose colours are far
  apart from each other and from the background; placed right when each colour is mostly in its own
  half. Read from pixels: the evaluator is not needed.
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from museum.evaluation.independent import patch_similarity
from museum.world.v2 import concepts, render

ATTRIBUTES = ("shape", "colour", "pattern", "background", "style")
NEAR = 60.0  # RGB distance within which a pixel has an object's colour
COLOUR_GAP = 110.0  # readable pairs: the two colours and the background's are at least this far apart
MIN_PIXELS = 16  # an object is drawn when at least this many pixels (of 64x64) have its colour
PATTERN_VARIANTS = 3  # renders per candidate pattern, each with its uncaptioned layout drawn anew


def held_out_scenes(n: int, seed: int, *, style_p: float = 0.3) -> list[render.Scene]:
    """``n`` one-object scenes from a seed pretraining does not use (no pooled concept)."""
    rng, reserved, out = random.Random(f"held-out:{seed}"), concepts.reserved_signatures(), []
    while len(out) < n:
        scene = render.random_scene(rng, style_p=style_p)
        if not render.scene_signatures(scene) & reserved:
            out.append(scene)
    return out


def _with(scene: render.Scene, attribute: str, value) -> render.Scene:
    look = scene.look
    if attribute == "shape":
        return replace(scene, look=replace(look, shape=value))
    if attribute == "colour":
        return replace(scene, look=replace(look, palette=(value,) + tuple(c for c in look.palette[1:] if c != value)))
    if attribute == "pattern":
        oriented = render.PATTERNS[value].oriented
        return replace(scene, look=replace(look, pattern=value, orientation=(look.orientation or "diagonal") if oriented else None))
    if attribute == "background":
        return replace(scene, background=value)
    return replace(scene, style=render.StyleLook(value) if value else None)


def attribute_values(attribute: str) -> tuple:
    return {"shape": render.SHAPES, "colour": tuple(render.COLOURS), "pattern": tuple(render.PATTERNS),
            "background": render.BACKGROUNDS, "style": (None,) + tuple(render.STYLES)}[attribute]


def attribute_candidates(scene: render.Scene, attribute: str) -> tuple[list[str], int]:
    """The captions of ``scene`` with ``attribute`` set to each value, and the index of its own value."""
    own = {"shape": scene.look.shape, "colour": scene.look.palette[0], "pattern": scene.look.pattern,
           "background": scene.background, "style": scene.style.family if scene.style else None}[attribute]
    values = attribute_values(attribute)
    return [render.caption(_with(scene, attribute, v)) for v in values], values.index(own)


def read_attribute(evaluator, images, scenes: list[render.Scene], attribute: str) -> list[bool]:
    """For each image, whether the evaluator picked the prompt's own value of ``attribute``."""
    if not scenes:
        return []
    pairs = [attribute_candidates(s, attribute) for s in scenes]
    picks = evaluator.classify(images, [c for c, _ in pairs])
    return [p == own for p, (_, own) in zip(picks, pairs)]


def read_attributes(evaluator, images, scenes: list[render.Scene]) -> dict[str, list[bool]]:
    """attribute -> :func:`read_attribute` for each of :data:`ATTRIBUTES`."""
    return {attribute: read_attribute(evaluator, images, scenes, attribute) for attribute in ATTRIBUTES}


def read_styled(evaluator, images, scenes: list[render.Scene]) -> list[bool]:
    """``style`` on the prompts that name one alone (most prompts name none, and an image without a style
    reads as the prompt's "no style" whatever was learned)."""
    styled = [i for i, s in enumerate(scenes) if s.style is not None]
    return read_attribute(evaluator, [images[i] for i in styled], [scenes[i] for i in styled], "style")


@lru_cache(maxsize=None)
def background_colour(name: str) -> tuple[float, float, float]:
    """The mean RGB of a background (rendered once per name)."""
    return tuple(render.background(name, np.random.default_rng(0)).reshape(-1, 3).mean(0))


def object_mask(scene: render.Scene) -> np.ndarray:
    """(64, 64) bool: where the prompt puts the object (its captioned size and position, unrotated)."""
    fx, fy = render.POSITIONS[scene.position]
    mask = render.shape_mask(scene.look.shape, fx * render.CANVAS, fy * render.CANVAS,
                             render.SIZES[scene.size] * render.CANVAS, 0.0)
    return np.asarray(mask.resize((render.IMAGE_SIZE, render.IMAGE_SIZE), Image.BOX)) > 127


def _nearest(rgb: np.ndarray, named: dict) -> str:
    return min(named, key=lambda name: float(np.linalg.norm(rgb - np.asarray(named[name], float))))


def read_pixels(images, scenes: list[render.Scene]) -> dict[str, list[bool]]:
    """``colour`` (plain objects without a style) and ``background`` (no style): for each image that can be read
    so, whether its pixels show the prompt's value; the pose's jitter is absorbed by reading the shape's core
    (two pixels in) and the ground from four pixels out."""
    grounds = {name: background_colour(name) for name in render.BACKGROUNDS}
    out = {"colour": [], "background": []}
    for image, scene in zip(images, scenes):
        if scene.style is not None:
            continue
        px, mask = np.asarray(image.convert("RGB"), float), object_mask(scene)
        core = ndimage.binary_erosion(mask, iterations=2)
        outside = ~ndimage.binary_dilation(mask, iterations=4)
        if scene.look.pattern == "plain":
            inside = px[core if core.sum() >= 8 else mask]
            out["colour"].append(_nearest(np.median(inside, axis=0), render.COLOURS) == scene.look.palette[0])
        out["background"].append(_nearest(px[outside].mean(0), grounds) == scene.background)
    return out


def pattern_renders(scene: render.Scene, pattern: str, rng: random.Random, variants: int) -> list[Image.Image]:
    """``scene`` rendered with ``pattern`` (plain: the main colour alone), ``variants`` times, the pattern's
    uncaptioned layout (and an orientation the prompt does not name) drawn anew each time."""
    spec, look = render.PATTERNS[pattern], scene.look
    palette = look.palette[:1] if pattern == "plain" else look.palette
    orientation = (look.orientation or rng.choice(render.ORIENTATIONS)) if spec.oriented else None
    looks = [replace(look, pattern=pattern, palette=palette, orientation=orientation,
                     layout=tuple(rng.choice(choices) for choices in spec.layouts)) for _ in range(variants)]
    return [render.render(replace(scene, look=v), rng.randrange(2 ** 31)) for v in looks]


def two_way_patch_similarity(image, references) -> float:
    """``patch_similarity`` both ways, averaged: the image's patches among the references' and theirs among the
    image's (one way alone, a plain object's patches are all found inside a striped one)."""
    return float(patch_similarity([image], references)[0] + patch_similarity(references, [image]).mean()) / 2


def read_pattern_pixels(images, scenes: list[render.Scene], *, variants: int = PATTERN_VARIANTS,
                        seed: int = 0) -> list[bool]:
    """``pattern`` without a learned model, for each patterned object without a style: the candidates are plain
    and every pattern that takes as many colours as the prompt names, each rendered in the prompt's scene
    (:func:`pattern_renders`, so a render of the prompt itself is not matched by its own layout); right when the
    best match (:func:`two_way_patch_similarity`) is the prompt's pattern."""
    rng, out = random.Random(f"patterns:{seed}"), []
    for image, scene in zip(images, scenes):
        if scene.style is not None or scene.look.pattern == "plain":
            continue
        candidates = ["plain"] + render.patterns_taking(len(scene.look.palette))
        scores = {p: two_way_patch_similarity(image, pattern_renders(scene, p, rng, variants)) for p in candidates}
        out.append(max(scores, key=scores.get) == scene.look.pattern)
    return out


def readable_pairs(n: int, seed: int) -> list[render.Scene]:
    """``n`` two-object scenes of plain objects whose placement can be read from colour alone."""
    rng, out = random.Random(f"pairs:{seed}"), []
    while len(out) < n:
        scene = render.random_pair_scene(rng)
        plain = [render.Look(s.look.shape, s.look.palette[:1]) for s in (scene, scene.companion)]
        scene = replace(scene, look=plain[0], companion=replace(scene.companion, look=plain[1]))
        colours = [np.array(render.COLOURS[look.palette[0]]) for look in plain]
        ground = np.array(background_colour(scene.background))
        if np.linalg.norm(colours[0] - colours[1]) >= COLOUR_GAP and all(
                np.linalg.norm(c - ground) >= COLOUR_GAP for c in colours):
            out.append(scene)
    return out


def read_placement(image, scene: render.Scene) -> dict:
    """``placed``: each object's colour is mostly in its own half (at least ``MIN_PIXELS`` and twice as many
    as in the other half); ``objects_drawn``: how many of the two colours appear at all."""
    px = np.asarray(image, dtype=float)
    half = px.shape[1] // 2
    counts = []
    for s in (scene, scene.companion):
        near = np.linalg.norm(px - np.array(render.COLOURS[s.look.palette[0]]), axis=-1) < NEAR
        left, right = int(near[:, :half].sum()), int(near[:, half:].sum())
        counts.append((left, right) if s.position == "left" else (right, left))
    return {"placed": all(own >= MIN_PIXELS and own >= 2 * other for own, other in counts),
            "objects_drawn": sum(own + other >= MIN_PIXELS for own, other in counts)}

"""A procedural world of small captioned images, deterministic by seed.

Every image is drawn at ``RENDER_SCALE`` times its output size with PIL and downsampled
(box filter) so edges are clean at 32x32. A :class:`Scene` describes one image; its
:func:`caption` is what the base model is trained on.

Two vocabularies live here:

* the **base vocabulary** (shapes, colours, backgrounds, sizes, positions, patterns,
  base styles) that pretrains the embedded model, and
* the **held-out pools** (:data:`INSTANCES`, :data:`NOVEL_STYLES`) that the base model
  never sees: they are reserved for customization, as "my dog" is reserved for
  DreamBooth. Only the evaluator (a stand-in for a real CLIP, which knows far more than
  any customization) is trained on them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 32
RENDER_SCALE = 4
CANVAS = IMAGE_SIZE * RENDER_SCALE

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
COLOURS = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 20),
    "green": (40, 200, 60),
    "cyan": (0, 210, 210),
    "blue": (30, 60, 230),
    "purple": (140, 40, 200),
    "pink": (255, 110, 180),
}
BACKGROUNDS = ("sky", "sand", "night", "grass", "brick", "snow")
SIZES = {"small": 0.22, "medium": 0.32, "large": 0.42}  # radius as a fraction of the canvas
POSITIONS = {
    "center": (0.5, 0.5),
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
}
POSITION_PHRASES = {
    "center": "",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
PATTERNS = ("plain", "stripes", "dots")
BASE_STYLES = ("none", "outline", "pixelated", "noisy")


@dataclass(frozen=True)
class Scene:
    """One image of the world. ``instance`` and ``novel_style`` come from the held-out pools."""

    shape: str = "circle"
    colour: str = "red"
    background: str = "sky"
    size: str = "medium"
    position: str = "center"
    pattern: str = "plain"
    style: str = "none"
    instance: Optional[str] = None
    novel_style: Optional[str] = None
    rotation: float = 0.0  # degrees; not captioned (pose jitter)
    jitter: tuple = (0.0, 0.0)  # fraction of the canvas; not captioned
    companion: Optional["Scene"] = None  # a second object on the same background (its own background,
    #                                      style and companion are ignored); see random_pair_scene


# --------------------------------------------------------------------------- captions


CAPTION_PARTS = ("size", "colour", "pattern", "position", "background", "style")


def caption(scene: Scene, *, object_phrase: Optional[str] = None, style_phrase: Optional[str] = None,
            drop: frozenset = frozenset()) -> str:
    """The scene's caption, e.g. "a large red star with stripes on the left on a sand background, outline style".

    ``object_phrase`` replaces the "colour shape with pattern" words (used for concepts,
    e.g. "<sunburst> circle"); ``style_phrase`` replaces the style word. Parts named in
    ``drop`` (see :data:`CAPTION_PARTS`) are left out: "a star on a sand background".
    """
    words = _object_words(scene, object_phrase, drop)
    if scene.companion is not None:  # "a small red circle on the left and a small blue star on the right ..."
        words += ["and"] + _object_words(scene.companion, None, drop)
    if "background" not in drop:
        words += ["on", "a", scene.background, "background"]
    text = " ".join(words)
    style = style_phrase if style_phrase is not None else (
        scene.novel_style if scene.novel_style is not None else (None if scene.style == "none" else scene.style)
    )
    if style and "style" not in drop:
        text += f", {style} style"
    return text


def _object_words(scene: Scene, object_phrase: Optional[str], drop: frozenset) -> list[str]:
    """"a [size] colour shape [with pattern] [position]" of one object (see :func:`caption`)."""
    words = ["a"]
    if scene.size != "medium" and "size" not in drop:
        words.append(scene.size)
    if object_phrase is not None:
        words.append(object_phrase)
    elif scene.instance is not None:
        words += [scene.instance, scene.shape]
    else:
        words += ([] if "colour" in drop else [scene.colour]) + [scene.shape]
        if scene.pattern != "plain" and "pattern" not in drop:
            words += ["with", scene.pattern]
    if POSITION_PHRASES[scene.position] and "position" not in drop:
        words.append(POSITION_PHRASES[scene.position])
    return words


def base_vocabulary() -> list[str]:
    """Every word a single-object pretraining caption can contain. Two-object captions add "and", which
    the shipped tokenizer (made from this list) reads as characters, as it reads any unknown word."""
    words = {"a", "with", "on", "the", "at", "background", "style", ","}
    words.update(SHAPES, COLOURS, BACKGROUNDS, PATTERNS, SIZES)
    words.update(w for phrase in POSITION_PHRASES.values() for w in phrase.split())
    words.update(s for s in BASE_STYLES if s != "none")
    return sorted(words)


def held_out_vocabulary() -> list[str]:
    """Names of the held-out pools; they never occur in pretraining captions."""
    return sorted(set(INSTANCES) | set(NOVEL_STYLES))


# --------------------------------------------------------------------------- geometry


def _polygon(cx, cy, radii, n, rotation, start=-90.0):
    pts = []
    for k in range(n):
        ang = math.radians(start + rotation + 360.0 * k / n)
        r = radii[k % len(radii)]
        pts.append((cx + r * math.cos(ang), cy + r * math.sin(ang)))
    return pts


def shape_mask(shape: str, cx: float, cy: float, r: float, rotation: float) -> Image.Image:
    """A binary (L) mask of the shape on the canvas."""
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    d = ImageDraw.Draw(mask)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = 0.55 * r
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif shape == "square":
        d.polygon(_polygon(cx, cy, [r * 1.05], 4, rotation, start=-45.0), fill=255)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy + 0.12 * r, [r * 1.15], 3, rotation), fill=255)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, [r * 1.1, r * 0.45], 10, rotation), fill=255)
    elif shape == "hexagon":
        d.polygon(_polygon(cx, cy, [r], 6, rotation, start=0.0), fill=255)
    elif shape == "diamond":
        pts = _polygon(0, 0, [r * 1.1], 4, 0.0)
        pts = [(x * 0.65, y) for x, y in pts]
        d.polygon(_rotate(pts, cx, cy, rotation), fill=255)
    elif shape == "cross":
        w = 0.36 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        d.polygon(_rotate(pts, cx, cy, rotation), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    return mask


def _rotate(pts, cx, cy, rotation):
    a = math.radians(rotation)
    c, s = math.cos(a), math.sin(a)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _local_coords(cx, cy, r, rotation):
    """Canvas coordinates in the shape's own frame, in units of its radius."""
    ys, xs = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
    a = math.radians(-rotation)
    dx, dy = xs - cx, ys - cy
    u = (dx * math.cos(a) - dy * math.sin(a)) / r
    v = (dx * math.sin(a) + dy * math.cos(a)) / r
    return u, v


# --------------------------------------------------------------------------- backgrounds


def background(name: str, rng: np.random.Generator) -> np.ndarray:
    """A CANVAS x CANVAS x 3 float array in [0, 255]."""
    ys, xs = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) / CANVAS
    noise = rng.normal(0, 1, (CANVAS, CANVAS)).astype(np.float32)
    if name == "sky":
        top, bottom = np.array([90, 160, 240]), np.array([190, 225, 255])
        img = top * (1 - ys[..., None]) + bottom * ys[..., None]
    elif name == "sand":
        img = np.array([222, 196, 140]) + 14 * noise[..., None]
    elif name == "night":
        img = np.broadcast_to(np.array([15, 20, 60], np.float32), (CANVAS, CANVAS, 3)).copy()
        stars = rng.random((CANVAS, CANVAS)) > 0.996
        img[stars] = 230
    elif name == "grass":
        blades = np.sin(xs * 90 + 3 * noise.mean()) * 0.5 + 0.5
        img = np.array([60, 120, 40]) + (30 * blades + 10 * noise)[..., None] * np.array([0.5, 1.0, 0.4])
    elif name == "brick":
        row = (ys * 8).astype(int)
        offset = (row % 2) * 0.5 / 4
        mortar = ((ys * 8) % 1 < 0.15) | (((xs + offset) * 4) % 1 < 0.06)
        img = np.where(mortar[..., None], np.array([170, 170, 160]), np.array([160, 60, 40]) + 8 * noise[..., None])
    elif name == "snow":
        img = np.array([235, 240, 248]) + 6 * noise[..., None]
        flakes = rng.random((CANVAS, CANVAS)) > 0.99
        img[flakes] = np.array([170, 190, 230])
    else:
        raise ValueError(f"unknown background {name!r}; known: {', '.join(BACKGROUNDS)}")
    return np.clip(img, 0, 255).astype(np.float32)


# --------------------------------------------------------------------------- fills


def pattern_fill(colour: str, pattern: str, cx, cy, r, rotation) -> np.ndarray:
    base = np.array(COLOURS[colour], np.float32)
    img = np.broadcast_to(base, (CANVAS, CANVAS, 3)).copy()
    if pattern == "plain":
        return img
    u, v = _local_coords(cx, cy, r, rotation)
    if pattern == "stripes":
        on = ((u + v) * 2.2) % 1.0 < 0.45
    elif pattern == "dots":
        on = ((u * 2.4) % 1.0 - 0.5) ** 2 + ((v * 2.4) % 1.0 - 0.5) ** 2 < 0.07
    else:
        raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")
    light = np.array([250, 250, 250], np.float32) if base.mean() < 200 else np.array([40, 40, 40], np.float32)
    img[on] = light
    return img


def _palette(u, v, bands, colours):
    idx = np.clip(np.digitize(bands, np.linspace(-1, 1, len(colours) + 1)[1:-1]), 0, len(colours) - 1)
    return np.asarray(colours, np.float32)[idx]


def _sunburst(u, v):
    ang = np.arctan2(v, u)
    wedge = ((ang / (2 * np.pi) * 10) % 1.0) < 0.5
    img = np.where(wedge[..., None], np.array([255, 200, 0]), np.array([240, 90, 20])).astype(np.float32)
    img[u ** 2 + v ** 2 < 0.12] = np.array([200, 0, 40])
    return img


def _checker(u, v):
    on = (np.floor(u * 2.2) + np.floor(v * 2.2)) % 2 == 0
    return np.where(on[..., None], np.array([210, 20, 40]), np.array([250, 250, 250])).astype(np.float32)


def _rainbow(u, v):
    return _palette(u, v, v, [(230, 30, 30), (255, 150, 0), (250, 230, 30), (40, 190, 60), (40, 80, 230), (140, 40, 200)])


def _beachball(u, v):
    ang = (np.arctan2(v, u) + np.pi) / (2 * np.pi)
    return _palette(u, v, ang * 2 - 1, [(230, 30, 30), (250, 250, 250), (30, 80, 230), (250, 220, 20)])


def _twotone(u, v):
    inner = u ** 2 + v ** 2 < 0.3
    return np.where(inner[..., None], np.array([255, 255, 255]), np.array([220, 0, 150])).astype(np.float32)


def _compass(u, v):
    horiz = np.abs(u) > np.abs(v)
    img = np.where(horiz[..., None], np.where((u > 0)[..., None], np.array([0, 170, 80]), np.array([250, 200, 0])),
                   np.where((v > 0)[..., None], np.array([20, 60, 220]), np.array([220, 30, 30])))
    img = img.astype(np.float32)
    img[u ** 2 + v ** 2 < 0.06] = 250
    return img


def _gem(u, v):
    quad = (u > 0).astype(int) * 2 + (v > 0).astype(int)
    tones = np.array([[170, 250, 255], [0, 150, 190], [60, 210, 230], [0, 90, 140]], np.float32)
    return tones[quad]


def _honeycomb(u, v):
    cell = (np.sin(u * 9) * np.sin(v * 9 + u * 4.5)) > 0.55
    return np.where(cell[..., None], np.array([120, 60, 10]), np.array([255, 190, 30])).astype(np.float32)


def _smiley(u, v):
    img = np.broadcast_to(np.array([255, 225, 0], np.float32), u.shape + (3,)).copy()
    eyes = ((u - 0.35) ** 2 + (v + 0.3) ** 2 < 0.03) | ((u + 0.35) ** 2 + (v + 0.3) ** 2 < 0.03)
    mouth = (np.abs(np.sqrt(u ** 2 + (v + 0.05) ** 2) - 0.55) < 0.09) & (v > 0.15)
    img[eyes | mouth] = 20
    return img


def _flag(u, v):
    return _palette(u, v, u, [(20, 40, 160), (250, 250, 250), (200, 20, 30)])


# Held-out object instances: name -> (superclass shape, painter in the shape's frame)
INSTANCES: dict[str, tuple[str, Callable]] = {
    "sunburst": ("circle", _sunburst),
    "checker": ("square", _checker),
    "rainbow": ("triangle", _rainbow),
    "beachball": ("ring", _beachball),
    "twotone": ("star", _twotone),
    "compass": ("cross", _compass),
    "gem": ("diamond", _gem),
    "honeycomb": ("hexagon", _honeycomb),
    "smiley": ("circle", _smiley),
    "flag": ("square", _flag),
}


# --------------------------------------------------------------------------- styles (on the final 32x32 image)


def _luma(img):
    return img @ np.array([0.299, 0.587, 0.114], np.float32)


def _sepia(img, rng):
    y = _luma(img)[..., None] / 255.0
    out = y * np.array([240, 200, 145], np.float32) + np.array([30, 15, 0], np.float32)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / (IMAGE_SIZE - 1) - 0.5
    return out * (1 - 0.9 * (xs ** 2 + ys ** 2))[..., None]


def _edges(img):
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8)).filter(ImageFilter.FIND_EDGES).convert("L")
    return np.asarray(pil, np.float32) / 255.0


def _neon(img, rng):
    e = np.clip(_edges(img) * 3, 0, 1)[..., None]
    glow = np.asarray(Image.fromarray((e[..., 0] * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2)), np.float32)[..., None] / 255
    hue = np.clip(img * 1.3, 0, 255)
    return np.array([10, 0, 25], np.float32) + np.clip(e + glow, 0, 1) * np.maximum(hue, np.array([255, 40, 220], np.float32) * 0.6)


def _blueprint(img, rng):
    e = np.clip(_edges(img) * 3, 0, 1)[..., None]
    out = np.broadcast_to(np.array([20, 60, 150], np.float32), img.shape).copy()
    grid = (np.arange(IMAGE_SIZE) % 8 == 0)
    out[grid, :] += 35
    out[:, grid] += 35
    return out * (1 - e) + 245 * e


def _halftone(img, rng):
    y = _luma(img) / 255.0
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    cell = ((xs % 4) - 1.5) ** 2 + ((ys % 4) - 1.5) ** 2
    ink = cell < (1 - y) * 5.0
    return np.where(ink[..., None], np.array([30, 30, 90], np.float32), np.array([250, 245, 225], np.float32))


def _mosaic(img, rng):
    small = img.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3))
    out = np.repeat(np.repeat(small, 4, 0), 4, 1)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    grout = (xs % 4 == 0) | (ys % 4 == 0)
    out[grout] = np.array([240, 235, 220])
    return out


def _thermal(img, rng):
    y = _luma(img) / 255.0
    stops = np.array([[0, 0, 80], [120, 0, 160], [230, 30, 30], [255, 170, 0], [255, 255, 200]], np.float32)
    x = y * (len(stops) - 1)
    i = np.clip(x.astype(int), 0, len(stops) - 2)
    f = (x - i)[..., None]
    return stops[i] * (1 - f) + stops[i + 1] * f


def _crt(img, rng):
    y = _luma(img)[..., None] / 255.0
    out = y * np.array([60, 255, 90], np.float32)
    out[1::2] *= 0.35
    return out


# Held-out global styles: name -> filter on a 32x32x3 float image
NOVEL_STYLES: dict[str, Callable] = {
    "neon": _neon,
    "blueprint": _blueprint,
    "thermal": _thermal,
    "sepia": _sepia,
    "halftone": _halftone,
    "mosaic": _mosaic,
    "crt": _crt,
}


# --------------------------------------------------------------------------- rendering


def _draw_object(canvas: np.ndarray, scene: Scene, *, outline: bool) -> np.ndarray:
    """``canvas`` with the scene's object (shape, fill, position, size, pose) painted over it."""
    fx, fy = POSITIONS[scene.position]
    cx = (fx + scene.jitter[0]) * CANVAS
    cy = (fy + scene.jitter[1]) * CANVAS
    r = SIZES[scene.size] * CANVAS
    mask = shape_mask(scene.shape, cx, cy, r, scene.rotation)
    if scene.instance is not None:
        shape, painter = INSTANCES[scene.instance]
        fill = painter(*_local_coords(cx, cy, r, scene.rotation))
    else:
        fill = pattern_fill(scene.colour, scene.pattern, cx, cy, r, scene.rotation)
    if outline:
        mask = Image.fromarray(
            (np.asarray(mask, np.int16) - np.asarray(mask.filter(ImageFilter.MinFilter(9)), np.int16)).clip(0, 255).astype(np.uint8)
        )
    alpha = np.asarray(mask, np.float32)[..., None] / 255.0
    return canvas * (1 - alpha) + fill * alpha


def render(scene: Scene, seed: int = 0) -> Image.Image:
    """Render ``scene`` to a 32x32 RGB image; the same (scene, seed) gives the same pixels."""
    rng = np.random.default_rng(seed)
    canvas = background(scene.background, rng)
    for obj in (scene, scene.companion) if scene.companion is not None else (scene,):
        canvas = _draw_object(canvas, obj, outline=scene.style == "outline")
    img = np.asarray(Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), np.float32)
    if scene.style == "pixelated":
        small = img.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3))
        img = np.repeat(np.repeat(small, 4, 0), 4, 1)
    elif scene.style == "noisy":
        img = img + rng.normal(0, 28, img.shape)
    if scene.novel_style is not None:
        img = NOVEL_STYLES[scene.novel_style](img, rng)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def random_scene(rng: random.Random, *, instance: Optional[str] = None, novel_style: Optional[str] = None,
                 base_styles: bool = True) -> Scene:
    """A random scene of the base vocabulary (optionally with a held-out instance or style)."""
    shape = INSTANCES[instance][0] if instance else rng.choice(SHAPES)
    return Scene(
        shape=shape,
        colour=rng.choice(list(COLOURS)),
        background=rng.choice(BACKGROUNDS),
        size=rng.choice(list(SIZES)),
        position=rng.choice(list(POSITIONS)),
        pattern=rng.choice(PATTERNS) if instance is None else "plain",
        style=rng.choice(BASE_STYLES) if (base_styles and novel_style is None) else "none",
        instance=instance,
        novel_style=novel_style,
        rotation=rng.uniform(-20, 20) if shape not in ("circle",) else 0.0,
        jitter=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)),
    )


def random_pair_scene(rng: random.Random, *, instances: tuple[Optional[str], Optional[str]] = (None, None),
                      base_styles: bool = False) -> Scene:
    """A random scene with two small objects side by side, e.g. "a small red circle on the left and a small
    blue star on the right on a sand background" (either object may be named first). ``instances`` puts
    held-out instances in the first- and second-named places. No base style by default: "pixelated" and
    "noisy" leave little of objects this small."""
    first, second = (replace(random_scene(rng, instance=inst, base_styles=base_styles), size="small", jitter=(0.0, 0.0))
                     for inst in instances)
    left_first = rng.random() < 0.5
    return replace(first, position="left" if left_first else "right",
                   companion=replace(second, position="right" if left_first else "left"))


def base_samples(n: int, seed: int, *, pair_fraction: float = 0.0) -> list[tuple[Scene, int]]:
    """``n`` (scene, render-seed) pairs of the base vocabulary only: the pretraining distribution.

    A ``pair_fraction`` of them (drawn at random) are two-object scenes (:func:`random_pair_scene`);
    the shipped model was pretrained with none."""
    rng = random.Random(seed)
    pair_rng = random.Random(seed + 1)  # a separate stream: pair_fraction 0 gives the shipped model's scenes
    return [(random_pair_scene(rng) if pair_fraction and pair_rng.random() < pair_fraction else random_scene(rng),
             seed * 1_000_003 + i) for i in range(n)]


def render_batch(samples: list[tuple[Scene, int]]) -> np.ndarray:
    """Render (scene, seed) pairs into an (N, 32, 32, 3) uint8 array."""
    return np.stack([np.asarray(render(s, k)) for s, k in samples])


__all__ = [
    "Scene", "render", "caption", "random_scene", "random_pair_scene", "base_samples", "render_batch", "base_vocabulary",
    "held_out_vocabulary", "SHAPES", "COLOURS", "BACKGROUNDS", "SIZES", "POSITIONS", "PATTERNS", "BASE_STYLES",
    "INSTANCES", "NOVEL_STYLES", "IMAGE_SIZE", "replace",
]

"""Reading a two-object image by colour: is each object in its own half?

The evaluator scores whole single-object scenes, so a two-object prompt ("a small red circle on the
left and a small blue square on the right on a snow background") is read from pixels instead: the
pixels within ``NEAR`` (RGB distance) of each object's colour, in its own half and in the other. Used
by the Foundation benchmark (scripts/bench_base_model.py) and the two-object model's test.
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import lru_cache

import numpy as np

from museum.world.render import COLOURS, Scene, background, random_pair_scene

NEAR = 60.0  # RGB distance within which a pixel has an object's colour
COLOUR_GAP = 110.0  # readable scenes: the two colours and the background's are at least this far apart
MIN_PIXELS = 8  # an object is drawn when at least this many pixels have its colour


@lru_cache(maxsize=None)
def background_colour(name: str) -> tuple[float, float, float]:
    """The mean RGB of a background (rendered once per name)."""
    return tuple(background(name, np.random.default_rng(0)).reshape(-1, 3).mean(0))


def readable_pairs(n: int, seed: int) -> list[Scene]:
    """``n`` two-object scenes (:func:`render.random_pair_scene`, plain objects) whose placement can be read
    from colour alone: the two colours are at least ``COLOUR_GAP`` apart and from the background's."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        scene = random_pair_scene(rng)
        scene = replace(scene, pattern="plain", companion=replace(scene.companion, pattern="plain"))
        colours = [np.array(COLOURS[s.colour]) for s in (scene, scene.companion)]
        ground = np.array(background_colour(scene.background))
        if np.linalg.norm(colours[0] - colours[1]) >= COLOUR_GAP and all(
                np.linalg.norm(c - ground) >= COLOUR_GAP for c in colours):
            out.append(scene)
    return out


def read_placement(image, scene: Scene) -> dict:
    """``placed``: each object's colour is mostly in its own half (at least ``MIN_PIXELS``, and twice as many
    pixels as in the other half); ``objects_drawn``: how many of the two colours appear at all;
    ``pixels``: colour -> (own half, other half)."""
    px = np.asarray(image, dtype=float)
    half = px.shape[1] // 2
    pixels = {}
    for s in (scene, scene.companion):
        near = np.linalg.norm(px - np.array(COLOURS[s.colour]), axis=-1) < NEAR
        left, right = int(near[:, :half].sum()), int(near[:, half:].sum())
        pixels[s.colour] = (left, right) if s.position == "left" else (right, left)
    placed = all(own >= MIN_PIXELS and own >= 2 * other for own, other in pixels.values())
    drawn = sum(own + other >= MIN_PIXELS for own, other in pixels.values())
    return {"placed": placed, "objects_drawn": drawn, "pixels": pixels}

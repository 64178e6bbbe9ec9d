"""The two-object placement reading (museum.evaluation.placement) on renders, where the truth is known."""

from dataclasses import replace

import numpy as np

from museum.evaluation.placement import read_placement, readable_pairs
from museum.world.render import render


def test_renders_read_as_placed_and_swapped_renders_do_not():
    scenes = readable_pairs(30, seed=3)
    assert all(read_placement(render(s, i), s)["placed"] for i, s in enumerate(scenes))
    for i, s in enumerate(scenes[:10]):  # the same objects on the other sides
        swapped = replace(s, position=s.companion.position, companion=replace(s.companion, position=s.position))
        reading = read_placement(render(swapped, i), s)
        assert not reading["placed"] and reading["objects_drawn"] == 2


def test_one_object_is_not_a_placement():
    scene = readable_pairs(1, seed=4)[0]
    alone = replace(scene, companion=None)  # only the first object, on its side
    reading = read_placement(np.asarray(render(alone, 0)), scene)
    assert not reading["placed"] and reading["objects_drawn"] == 1


def test_readable_pairs_keep_colours_apart():
    for s in readable_pairs(50, seed=5):
        assert s.colour != s.companion.colour and s.pattern == s.companion.pattern == "plain"

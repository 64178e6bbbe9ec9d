"""World v2's prompt-following readings, on renders (no model needed)."""

import random
from dataclasses import replace

from museum.evaluation import prompt_following as PF
from museum.world.v2 import concepts, render


def test_candidates_hold_the_prompt_at_its_own_index_and_differ_in_one_attribute():
    for scene in PF.held_out_scenes(40, seed=0):
        prompt = render.caption(scene)
        for attribute in PF.ATTRIBUTES:
            candidates, own = PF.attribute_candidates(scene, attribute)
            assert candidates[own] == prompt
            assert len(set(candidates)) == len(candidates) == len(PF.attribute_values(attribute))


def test_held_out_scenes_show_no_pooled_concept_and_every_attribute_varies():
    scenes = PF.held_out_scenes(300, seed=1)
    assert not set().union(*(render.scene_signatures(s) for s in scenes)) & concepts.reserved_signatures()
    assert len({s.look.pattern for s in scenes}) == len(render.PATTERNS)
    assert len({s.style.family for s in scenes if s.style}) == len(render.STYLES)


def test_placement_reads_renders_right_and_rejects_swapped_and_single_objects():
    scenes = PF.readable_pairs(30, seed=0)
    assert all(PF.read_placement(render.render(s, i), s)["placed"] for i, s in enumerate(scenes))
    swapped = [replace(s, position=s.companion.position, companion=replace(s.companion, position=s.position)) for s in scenes]
    assert not any(PF.read_placement(render.render(s, i), t)["placed"] for i, (s, t) in enumerate(zip(swapped, scenes)))
    alone = [replace(s, companion=None) for s in scenes]
    assert all(PF.read_placement(render.render(a, i), s)["objects_drawn"] <= 1 for i, (a, s) in enumerate(zip(alone, scenes)))


def test_pixel_reading_gets_renders_right_and_a_changed_colour_or_ground_wrong():
    scenes = [s for s in PF.held_out_scenes(1000, seed=2, style_p=0.0) if s.look.pattern == "plain"][:50]
    renders = [render.render(s, i) for i, s in enumerate(scenes)]
    right = PF.read_pixels(renders, scenes)
    assert len(right["colour"]) == len(right["background"]) == len(scenes) >= 40
    assert sum(right["colour"]) >= 0.95 * len(scenes) and sum(right["background"]) >= 0.9 * len(scenes), right

    def far(name, values, colour_of):  # the value whose colour is farthest from ``name``'s
        return max(values, key=lambda v: sum((a - b) ** 2 for a, b in zip(colour_of(v), colour_of(name))))
    recoloured = [replace(s, look=replace(s.look, palette=(far(s.look.palette[0], render.COLOURS,
                                                                 render.COLOURS.__getitem__),)))
                  for s in scenes]
    reground = [replace(s, background=far(s.background, render.BACKGROUNDS, PF.background_colour)) for s in scenes]
    assert not any(PF.read_pixels([render.render(r, i) for i, r in enumerate(recoloured)], scenes)["colour"])
    assert not any(PF.read_pixels([render.render(r, i) for i, r in enumerate(reground)], scenes)["background"])
    styled = [s for s in PF.held_out_scenes(40, seed=3, style_p=1.0)]
    assert PF.read_pixels([render.render(s) for s in styled], styled) == {"colour": [], "background": []}


def test_pattern_read_by_synthesis_gets_renders_right_and_another_pattern_wrong():
    scenes = [s for s in PF.held_out_scenes(60, seed=4, style_p=0.0) if s.look.pattern in ("stripes", "checks", "rings", "face")][:8]
    renders = [render.render(s, 100 + i) for i, s in enumerate(scenes)]  # layouts the candidates draw anew
    assert len(scenes) == 8 and sum(PF.read_pattern_pixels(renders, scenes)) >= 7
    plain = [render.render(replace(s, look=replace(s.look, pattern="plain", palette=s.look.palette[:1], layout=(),
                                                   orientation=None)), i) for i, s in enumerate(scenes)]
    assert not any(PF.read_pattern_pixels(plain, scenes))  # a pattern not drawn reads wrong
    unread = [replace(scenes[0], style=render.random_style(random.Random(0))), replace(scenes[0], look=replace(
        scenes[0].look, pattern="plain", palette=scenes[0].look.palette[:1], layout=(), orientation=None))]
    assert PF.read_pattern_pixels(renders[:2], unread) == []  # styled prompts and plain prompts are not read

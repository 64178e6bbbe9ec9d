"""World v2: 64x64 renders, a broad captioned vocabulary, and concept pools that pretraining never renders."""

import random
import re

import numpy as np
import pytest

from museum.models.v2 import pretrain
from museum.world.v2 import concepts as C
from museum.world.v2 import render as W


def _words(text):
    return [w for w in re.split(r"[ ,]+", text) if w]


@pytest.fixture(scope="module")
def pretraining_scenes():
    """The scenes of the pretraining set's first chunk, as the pretraining stage draws them (smaller)."""
    return [scene for scene, _ in W.base_samples(3000, seed=0, reserved=C.reserved_signatures())]


def test_render_is_64x64_and_deterministic_by_seed():
    scene = W.Scene(look=W.Look("star", ("blue", "white"), "stripes", "diagonal", (0.32,)), background="sand")
    a, b, c = (np.asarray(W.render(scene, s)) for s in (7, 7, 8))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_every_pattern_style_and_background_renders_something_distinct():
    look = W.Look("square", ("red", "white", "blue"), "plain")
    plain = np.asarray(W.render(W.Scene(look=W.Look("square", ("red",)), size="large"), 0), np.int16)
    for name, spec in W.PATTERNS.items():
        if name == "plain":
            continue
        patterned = W.Look("square", look.palette[:spec.colours[1]], name, "diagonal" if spec.oriented else None,
                           tuple(c[0] for c in spec.layouts))
        img = np.asarray(W.render(W.Scene(look=patterned, size="large"), 0), np.int16)
        assert np.abs(img - plain).mean() > 5, name
    for family in W.STYLES:
        img = np.asarray(W.render(W.Scene(look=look, style=W.random_style(random.Random(0), family)), 0), np.int16)
        assert np.abs(img - plain).mean() > 5, family
    means = {bg: np.asarray(W.render(W.Scene(look=look, background=bg, size="small"), 0), np.float32).mean(axis=(0, 1))
             for bg in W.BACKGROUNDS}
    assert len({tuple(np.round(m / 8)) for m in means.values()}) == len(W.BACKGROUNDS)


def test_vocabulary_covers_every_caption(pretraining_scenes):
    vocab = set(W.vocabulary())
    rng = random.Random(0)
    captions = [W.caption(s, drop=W.caption_drop(rng)) for s in pretraining_scenes]
    assert not {w for c in captions for w in _words(c)} - vocab
    assert "on the left a large red and white square with diagonal stripes on a sand background, neon style" == W.caption(
        W.Scene(look=W.Look("square", ("red", "white"), "stripes", "diagonal", (0.32,)), background="sand",
                size="large", position="left", style=W.StyleLook("neon", ("pink", 1.0))))


def test_captions_come_full_partial_and_class_only():
    scene = W.Scene(look=W.Look("square", ("red", "white"), "checks", layout=(0.4,)), background="sand")
    assert W.caption(scene, drop=W.CLASS_ONLY) == "a square on a sand background"
    assert W.caption(scene, drop=frozenset({"more-colours"})) == "a red square with checks on a sand background"
    drops = [W.caption_drop(random.Random(i)) for i in range(500)]
    class_only = sum(W.CLASS_ONLY <= d for d in drops) / len(drops)
    full = sum(not d for d in drops) / len(drops)
    assert 0.12 < class_only < 0.3 and full > 0.2


def test_pools_are_disjoint_and_large_enough():
    pools = (C.TUNING_POOL, C.BENCHMARK_POOL, C.ZERO_SHOT_POOL)
    assert sum(len(p) for p in pools) == len(set().union(*pools)) == len(C.LOOKS)
    assert len(C.BENCHMARK_OBJECTS) >= 20 and len(C.BENCHMARK_STYLES) >= 8
    signatures = [look.signature() for look in C.LOOKS.values()]
    assert len(set(signatures)) == len(signatures)
    assert not set(C.LOOKS) & set(W.vocabulary())  # concept names are no caption words


def test_no_pooled_concept_is_rendered_in_pretraining(pretraining_scenes):
    reserved = C.reserved_signatures()
    shown = set().union(*(W.scene_signatures(s) for s in pretraining_scenes))
    assert not shown & reserved
    # the filter is what keeps them out: unfiltered, the same stream does show reserved styles
    unfiltered = set().union(*(W.scene_signatures(s) for s, _ in W.base_samples(3000, seed=0)))
    assert unfiltered & reserved
    # and the pretraining stage draws its chunks through it
    assert not set().union(*(W.scene_signatures(s) for s in pretrain.chunk_scenes(0, 0, size=500))) & reserved


def test_each_benchmark_concept_is_made_of_parts_pretraining_draws(pretraining_scenes):
    """An unnamed instance, not unseen content: its shape with its pattern, and its pattern in each of its
    colours, are all in pretraining; a style's family is, with other recipes."""
    objects = [s.look for s in pretraining_scenes] + [s.companion.look for s in pretraining_scenes if s.companion]
    shape_pattern = {(o.shape, o.pattern) for o in objects}
    pattern_colour = {(o.pattern, c) for o in objects for c in o.palette}
    families = {s.style.family for s in pretraining_scenes if s.style}
    for name in C.BENCHMARK_POOL:
        look = C.LOOKS[name]
        if isinstance(look, W.StyleLook):
            assert look.family in families, name
        else:
            assert (look.shape, look.pattern) in shape_pattern, name
            assert all((look.pattern, c) in pattern_colour for c in look.palette), name


def test_concepts_are_deterministic_and_references_held_out():
    a, b = C.build_concept("sunburst", n_train=3, n_ref=4), C.build_concept("sunburst", n_train=3, n_ref=4)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.train_images, b.train_images))
    train = {np.asarray(im).tobytes() for im in a.train_images}
    assert not train & {np.asarray(im).tobytes() for im in a.reference_images}
    assert a.spec == C.ConceptSpec("sunburst", "object", "circle")
    assert a.concept_prompts("<s>")[1] == "a <s> circle on a sand background"
    assert a.class_prompts()[1] == "a circle on a sand background"
    style = C.build_concept("glowline", n_train=2, n_ref=2)
    assert style.is_style and style.class_prompts()[0] + ", <g> style" == style.concept_prompts("<g>")[0]
    with pytest.raises(ValueError, match="unknown concept"):
        C.spec("nonesuch")


@pytest.mark.parametrize("name", ["sunburst", "glowline"])
def test_prompt_renders_draw_the_concept_in_each_prompts_own_scene(name):
    """The upper anchor of gap closed: each render is the scene its prompt describes, with the concept in it."""
    concept = C.build_concept(name, n_train=1, n_ref=1)
    renders = concept.prompt_renders(quick=True, per_prompt=2)
    assert len(renders) == 2 * C.N_QUICK_PROMPTS and all(im.size == (64, 64) for im in renders)
    assert renders[0].tobytes() != renders[1].tobytes()  # two draws of one prompt
    assert [im.tobytes() for im in renders] == [im.tobytes() for im in concept.prompt_renders(quick=True, per_prompt=2)]
    assert len(concept.prompt_renders(per_prompt=1)) == len(concept.prompts)  # every prompt, styled ones too
    rng = random.Random(0)
    for template, scene in zip(concept.prompts, concept.prompt_scenes):
        if scene is None:
            continue
        drawn = concept._scene_for(scene, rng)
        if concept.is_style:
            assert drawn.style == C.LOOKS[name] and W.caption(drawn, style_phrase="{}") == template
        elif scene.style is not None:  # a styled prompt: the family it names, with a recipe no concept owns
            assert drawn.style.family == scene.style.family and drawn.style.signature() not in C.reserved_signatures()
            assert W.caption(drawn, object_phrase="{}") == template
        else:
            assert drawn.look == C.LOOKS[name] and W.caption(drawn, object_phrase="{}") == template

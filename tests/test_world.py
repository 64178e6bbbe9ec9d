"""The rendered world and its customization concepts (fast: a few dozen 32x32 renders)."""

import random
import re

import numpy as np
import pytest
from PIL import Image

from museum.world import concepts as C
from museum.world import render as W


def _words(text):
    return [w for w in re.split(r"[ ,]+", text) if w]


def _px(img):
    return np.asarray(img, dtype=np.int16)


@pytest.fixture(scope="module")
def pretraining_captions():
    return [W.caption(scene) for scene, _ in W.base_samples(2000, seed=0)]


# --------------------------------------------------------------------------- renderer


def test_render_deterministic_by_seed():
    scene = W.Scene(shape="star", colour="blue", background="sand", size="large", position="left")
    a, b, c = W.render(scene, 7), W.render(scene, 7), W.render(scene, 8)
    assert np.array_equal(_px(a), _px(b))
    assert not np.array_equal(_px(a), _px(c))  # sand is noisy, so the seed shows


def test_images_are_32x32_rgb():
    for scene, seed in W.base_samples(12, seed=3):
        img = W.render(scene, seed)
        assert img.mode == "RGB" and img.size == (W.IMAGE_SIZE, W.IMAGE_SIZE) == (32, 32)
    assert W.render_batch(W.base_samples(3, seed=1)).shape == (3, 32, 32, 3)


def test_held_out_names_never_in_pretraining_captions(pretraining_captions):
    held_out = set(W.INSTANCES) | set(W.NOVEL_STYLES)
    assert held_out == set(W.held_out_vocabulary())
    seen = {w for cap in pretraining_captions for w in _words(cap)}
    assert not (seen & held_out)
    assert not (held_out & set(W.base_vocabulary()))


def test_base_vocabulary_covers_pretraining_captions(pretraining_captions):
    vocab = set(W.base_vocabulary())
    missing = {w for cap in pretraining_captions for w in _words(cap)} - vocab
    assert not missing, sorted(missing)


def test_two_object_scenes_caption_and_draw_both_objects():
    """Two-object scenes (for a model that composes concepts side by side): the caption names both objects
    with their sides, the render puts each on its side, and the single-object stream is unchanged by them."""
    scene = W.Scene(shape="circle", colour="red", background="snow", size="small", position="left",
                    companion=W.Scene(shape="square", colour="blue", size="small", position="right", pattern="dots"))
    assert W.caption(scene) == ("a small red circle on the left and a small blue square with dots on the right "
                                "on a snow background")
    px = _px(W.render(scene, 0))
    red = (px[..., 0] > 180) & (px[..., 1] < 80) & (px[..., 2] < 80)
    blue = (px[..., 2] > 180) & (px[..., 0] < 80)
    assert red[:, :14].sum() > 40 and red[:, 18:].sum() == 0
    assert blue[:, 18:].sum() > 20 and blue[:, :14].sum() == 0
    mixed = W.base_samples(400, seed=5, pair_fraction=0.5)
    pairs = [s for s, _ in mixed if s.companion is not None]
    assert 150 < len(pairs) < 250
    assert all({s.position, s.companion.position} == {"left", "right"} and s.size == "small" for s in pairs)
    words = {w for s in pairs for w in _words(W.caption(s))}
    assert words - set(W.base_vocabulary()) == {"and"}  # the one word single-object captions never use
    rng = random.Random(5)  # pair_fraction 0 (the shipped model's recipe) draws the single-object stream as before
    assert [s for s, _ in W.base_samples(50, seed=5)] == [W.random_scene(rng) for _ in range(50)]
    assert W.caption(W.random_pair_scene(random.Random(0), instances=("sunburst", None))).count("sunburst") == 1


def test_caption_drop_and_phrases():
    scene = W.Scene(shape="star", colour="red", background="sand", size="large", position="left",
                    pattern="stripes", style="outline")
    assert W.caption(scene) == "a large red star with stripes on the left on a sand background, outline style"
    assert W.caption(scene, drop=frozenset({"size", "colour", "pattern", "position", "style"})) == \
        "a star on a sand background"
    assert W.caption(scene, object_phrase="<x> star", style_phrase="<y>") == \
        "a large <x> star on the left on a sand background, <y> style"


@pytest.mark.parametrize("name", sorted(W.INSTANCES))
def test_instance_renders_and_differs_from_plain_shape(name):
    shape = W.INSTANCES[name][0]
    plain = W.render(W.Scene(shape=shape, colour="red", background="sky"), 0)
    inst = W.render(W.Scene(shape=shape, colour="red", background="sky", instance=name), 0)
    assert inst.size == (32, 32)
    assert np.abs(_px(inst) - _px(plain)).mean() > 2.0


@pytest.mark.parametrize("name", sorted(W.NOVEL_STYLES))
def test_novel_style_renders_and_differs_from_unstyled(name):
    scene = W.Scene(shape="star", colour="yellow", background="grass")
    plain = W.render(scene, 0)
    styled = W.render(W.replace(scene, novel_style=name), 0)
    assert styled.size == (32, 32)
    assert np.abs(_px(styled) - _px(plain)).mean() > 5.0


# --------------------------------------------------------------------------- concepts


def test_build_concept_deterministic_and_held_out():
    a = C.build_concept("sunburst", n_train=4, n_ref=6, seed=1)
    b = C.build_concept("sunburst", n_train=4, n_ref=6, seed=1)
    other = C.build_concept("sunburst", n_train=4, n_ref=6, seed=2)
    assert (len(a.train_images), len(a.reference_images)) == (4, 6)
    for x, y in zip(a.train_images + a.reference_images, b.train_images + b.reference_images):
        assert np.array_equal(_px(x), _px(y))
    assert not all(np.array_equal(_px(x), _px(y)) for x, y in zip(a.train_images, other.train_images))
    train = [_px(im) for im in a.train_images]
    for ref in a.reference_images:
        assert not any(np.array_equal(_px(ref), t) for t in train)
    assert len({s.background for s in a.train_scenes}) == 4  # varied backgrounds
    assert all(s.instance == "sunburst" and s.style == "none" for s in a.train_scenes)


def test_style_concept_uses_base_scenes_with_the_style():
    c = C.build_concept("neon", n_train=3, n_ref=2)
    assert c.kind == "style" and c.class_word == "style"
    assert all(s.novel_style == "neon" and s.instance is None and s.style == "none"
               for s in c.train_scenes + c.reference_scenes)
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in c.train_images)


def test_benchmark_concepts():
    kinds = [C.spec(n).kind for n in C.BENCHMARK_CONCEPTS]
    assert len(C.BENCHMARK_CONCEPTS) == 10 == len(set(C.BENCHMARK_CONCEPTS))
    assert kinds.count("object") == 7 and kinds.count("style") == 3
    assert C.ZERO_SHOT_CONCEPTS == ("honeycomb", "smiley", "flag")
    assert set(C.STYLE_SEQUENCE) <= set(W.NOVEL_STYLES)
    assert C.spec("checker") == C.ConceptSpec("checker", "object", "square")


def test_prompt_templates():
    assert len(C.OBJECT_TEMPLATES) >= 20 and len(C.STYLE_TEMPLATES) >= 20
    for t in C.OBJECT_TEMPLATES + C.STYLE_TEMPLATES:
        assert t.count("{}") == 1
    for t in C.STYLE_TEMPLATES:
        assert t.endswith(", {} style")
    for t in C.OBJECT_TEMPLATES[: C.N_QUICK_PROMPTS]:  # quick mode: no base styles
        assert "style" not in t
    vocab = set(W.base_vocabulary())
    for t in C.OBJECT_TEMPLATES + C.STYLE_TEMPLATES:
        assert set(_words(t.replace("{}", ""))) <= vocab


def test_class_prompts():
    obj = C.build_concept("sunburst", n_train=3, n_ref=1)
    sty = C.build_concept("thermal", n_train=3, n_ref=1)
    assert obj.class_prompts()[1] == "a circle on a sand background"
    assert sty.class_prompts()[0] == "a red star on a sand background"
    for c in (obj, sty):
        prompts = c.class_prompts()
        assert len(prompts) == len(c.prompts)
        assert all("{}" not in p for p in prompts)
        assert len(c.class_prompts(quick=True)) == C.N_QUICK_PROMPTS
    assert all(not p.endswith(" style") and "thermal" not in p for p in sty.class_prompts())
    assert obj.format_prompt("a {} on a sky background", "<tok> circle") == "a <tok> circle on a sky background"
    assert obj.concept_prompts("<s>")[0] == "a <s> circle"
    assert sty.concept_prompts("<t>")[0] == "a red star on a sand background, <t> style"


def test_unknown_concept_raises_with_valid_names():
    with pytest.raises(ValueError) as err:
        C.build_concept("unicorn")
    msg = str(err.value)
    assert "unicorn" in msg
    for name in list(W.INSTANCES) + list(W.NOVEL_STYLES):
        assert name in msg


def test_save_writes_numbered_pngs(tmp_path):
    c = C.build_concept("gem", n_train=3, n_ref=0)
    paths = c.save(tmp_path / "user")
    assert [p.name for p in paths] == ["00.png", "01.png", "02.png"]
    for p, img in zip(sorted((tmp_path / "user").glob("*.png")), c.train_images):
        assert np.array_equal(_px(Image.open(p).convert("RGB")), _px(img))

"""The shared matrix every registered method passes through, on tiny random pipelines of each base
family (SD-1.x with epsilon prediction, SD-2.x with v-prediction; ``museum.base.tiny``): learn a few
steps, save, reload, generate, compose with a second concept, export and load the export with plain
diffusers, remove."""

import importlib
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from museum.base.tiny import FAMILIES
from museum.generation.sampling import generate_images
from museum.methods import METHODS, method_names
from museum.museum import Museum
from museum.store.manifest import MuseumError

# large learning rates so that four steps visibly change a random tiny model
FAST = dict(steps=4, lr=2e-2, token_lr=0.5)
EXTRA = {"custom-diffusion": dict(num_class_images=4)}


def pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module", params=[(f, m) for f in FAMILIES for m in method_names()],
                ids=lambda p: f"{p[0]}-{p[1]}")
def learned(request, tiny_family, concept_images, tmp_path_factory):
    family, method = request.param
    folder = tmp_path_factory.mktemp(f"{family}-{method}") / "museum"
    m = Museum.init(folder, base=tiny_family(family))
    kw = dict(FAST, **EXTRA.get(method, {}))
    m.learn("sunburst", concept_images["sunburst"][0], method=method, class_word="circle", progress=False, **kw)
    m.learn("neon", concept_images["neon"][0], method=method, style=True, progress=False, **kw)
    return method, folder, m


@pytest.mark.parametrize("family", FAMILIES)
def test_families_differ_as_their_checkpoints_do(tiny_family, family):
    """The SD-2.x pipeline is v-prediction with linear projections; SD-1.x epsilon with convolutions."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_family(family), safety_checker=None)
    sd2 = family == "sd2"
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if sd2 else "epsilon")
    assert pipe.unet.config.use_linear_projection == sd2
    assert isinstance(pipe.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear) == sd2


def test_learn_save_reload_generate(learned):
    method, folder, m = learned
    assert [c.name for c in m.concepts] == ["sunburst", "neon"]
    assert (m.concept("sunburst").path / "sample.png").is_file()
    prompt = f"a {m.concept('sunburst').phrase} on a sand background"
    before = m.generate(prompt, n=2, steps=3)
    fresh = Museum.open(folder)  # a new object reads everything from disk
    after = fresh.generate(prompt, n=2, steps=3)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(before, after))
    assert [c.method for c in fresh.concepts] == [method, method]


def test_concept_changes_the_image(learned):
    _, _, m = learned
    phrase = m.concept("sunburst").phrase
    with_concept = m.generate(f"a {phrase} on a sand background", n=1, steps=3)[0]
    base = generate_images(m.pipe, ["a circle on a sand background"], seeds=[0], steps=3)[0]
    assert not np.array_equal(pixels(with_concept), pixels(base))


def test_compose_two_concepts(learned):
    _, _, m = learned
    obj, style = m.concept("sunburst").phrase, m.concept("neon").phrase
    both = f"a {obj} on a night background, {style} style"
    assert [e.name for e in m.parse_prompt(both)] == ["sunburst", "neon"]
    composed = m.generate(both, n=1, steps=3)[0]
    only_object = m.generate(f"a {obj} on a night background", n=1, steps=3)[0]
    assert not np.array_equal(pixels(composed), pixels(only_object))


def test_unknown_token_lists_concepts(learned):
    _, _, m = learned
    with pytest.raises(MuseumError, match=r"<mug>.*<sunburst>, <neon>"):
        m.generate("a <mug> on a table", n=1, steps=2)


def test_export_loads_in_plain_diffusers(learned, tmp_path):
    method, _, m = learned
    out = m.export("sunburst", tmp_path / "export")
    prompt = f"a {m.concept('sunburst').phrase} on a grass background"
    ours = m.generate(prompt, n=1, steps=4)[0]
    pipe = StableDiffusionPipeline.from_pretrained(m.manifest.base_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    info = json.loads((out / "museum_export.json").read_text())
    needs_museum = METHODS[method].export_format == "museum"
    assert info["needs_museum"] == needs_museum
    if needs_museum:  # the method's own loader adds the token and installs its effect
        module, func = info["museum_concepts"][0]["loader"].split(":")
        getattr(importlib.import_module(module), func)(pipe, out)
    else:
        pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"), token="<sunburst>")
    has_lora = (out / "pytorch_lora_weights.safetensors").is_file()
    assert has_lora == (METHODS[method].export_format == "lora")
    if has_lora:
        pipe.load_lora_weights(str(out))
    theirs = generate_images(pipe, [prompt], seeds=[0], steps=4)[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 2


def test_remove(learned, tmp_path):
    import shutil

    method, folder, _ = learned
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    m = Museum.open(copy)
    if METHODS[method].removable:
        m.remove("sunburst")
        assert [c.name for c in Museum.open(copy).concepts] == ["neon"]
        assert not any(p.name.endswith("-sunburst") for p in (copy / "concepts").iterdir())
        with pytest.raises(MuseumError, match="does not have"):
            m.generate("a <sunburst> circle", n=1, steps=2)
        assert len(m.generate("a red star, <neon> style", n=1, steps=2)) == 1
    else:
        before = (copy / "museum.json").read_bytes()
        with pytest.raises(MuseumError, match="cannot remove"):
            m.remove("sunburst")
        assert (copy / "museum.json").read_bytes() == before

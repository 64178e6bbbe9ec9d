"""The embedded model, seeded generation, the evaluator and the CLI's handling of bad input."""

import json
import random

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel

from conftest import needs_embedded, needs_evaluator, needs_two_object_model, run_cli
from museum.evaluation.placement import read_placement, readable_pairs
from museum.generation.sampling import generate_images
from museum.models.evaluator import Evaluator
from museum.models.loading import (
    EMBEDDED_EVALUATOR, EMBEDDED_MODELS, EMBEDDED_PIPELINE, EMBEDDED_TWO_OBJECTS, load_evaluator, load_pipeline,
)
from museum.models.pretrain import SWAPS, hard_negative, pretrain
from museum.models.tokenizer import write_clip_tokenizer
from museum.museum import Museum
from museum.world.concepts import build_concept
from museum.world.render import SHAPES, base_vocabulary, caption, random_scene, render, replace


@needs_embedded
def test_shipped_model_loads_with_plain_diffusers():
    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_PIPELINE, safety_checker=None)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    # load_textual_inversion resizes the embedding table to len(tokenizer): a table of another size would be
    # shrunk and the load would fail
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.tokenizer.model_max_length <= pipe.text_encoder.config.max_position_embeddings
    # every world word is one token
    for word in base_vocabulary():
        assert len(pipe.tokenizer.tokenize(word)) == 1, word
    def megabytes(folder):
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6

    for name, folder in EMBEDDED_MODELS.items():
        assert megabytes(folder) < 24, f"the shipped model {name} is {megabytes(folder):.1f} MB"
    assert megabytes(EMBEDDED_PIPELINE.parent) < 48, f"shipped weights are {megabytes(EMBEDDED_PIPELINE.parent):.1f} MB"


@pytest.mark.slow
@needs_two_object_model
def test_two_object_model_draws_each_object_on_its_side():
    """``embedded-two-objects`` draws "a small A ... on the left and a small B ... on the right": each object's
    colour in its own half (docs/two-objects/BASE_MODEL.md: 96 of 100 held-out prompts; the default
    ``embedded`` model draws one object, 0 of 100)."""
    pipe = load_pipeline(EMBEDDED_TWO_OBJECTS)
    scenes = readable_pairs(8, seed=7)
    images = generate_images(pipe, [caption(s) for s in scenes], seeds=list(range(len(scenes))), steps=25)
    placed = [read_placement(image, scene)["placed"] for image, scene in zip(images, scenes)]
    assert sum(placed) >= 6, [caption(s) for s, ok in zip(scenes, placed) if not ok]


@needs_two_object_model
def test_a_museum_on_the_two_object_model_records_its_name(tmp_path):
    """A shipped model is recorded by name (the museum moves with the package, not with a path)."""
    done = run_cli("init", str(tmp_path / "m"), "--base", EMBEDDED_TWO_OBJECTS)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "m" / "museum.json").read_text())["base"]["path"] == EMBEDDED_TWO_OBJECTS
    unet, shipped = Museum.open(tmp_path / "m").pipe.unet, load_pipeline().unet
    drop = lambda config: {k: v for k, v in config.items() if k != "_name_or_path"}  # noqa: E731
    assert drop(unet.config) == drop(shipped.config)  # the same architecture, further trained
    assert not torch.equal(next(iter(unet.state_dict().values())), next(iter(shipped.state_dict().values())))


def test_seeded_generation_is_deterministic(tiny_base):
    pipe = load_pipeline(tiny_base)
    a = generate_images(pipe, ["a red star"] * 2, seeds=[1, 2], steps=3)
    b = generate_images(pipe, ["a red star"], seeds=[2], steps=3)  # same seed, other batch
    assert np.array_equal(np.asarray(a[1]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
    assert a[0].size == (32, 32)


@needs_evaluator
def test_evaluator_prefers_matching_captions():
    evaluator = load_evaluator(EMBEDDED_EVALUATOR)
    rng = random.Random(99)
    scenes = [random_scene(rng, base_styles=False) for _ in range(40)]
    images = [render(s, 1000 + i) for i, s in enumerate(scenes)]
    wins = 0
    for scene, image in zip(scenes, images):
        other_shape = next(s for s in SHAPES if s != scene.shape)
        texts = [caption(scene), caption(replace(scene, shape=other_shape))]
        sims = evaluator.embed_texts(texts) @ evaluator.embed_images([image])[0]
        wins += int(sims[0] > sims[1])
    assert wins >= 36, f"matching caption preferred in only {wins}/40 renders"


@needs_evaluator
def test_evaluator_knows_held_out_concepts():
    evaluator = load_evaluator(EMBEDDED_EVALUATOR)
    a, b = build_concept("sunburst", n_ref=8), build_concept("checker", n_ref=8)
    ea, eb = evaluator.embed_images(a.reference_images), evaluator.embed_images(b.reference_images)
    within = (ea @ ea.T).mean()
    across = (ea @ eb.T).mean()
    assert within > across + 0.2


@pytest.mark.parametrize("args, message", [
    (["generate", ""], "prompt is empty"),
    (["generate", "   "], "prompt is empty"),
    (["generate", "a red star", "--steps", "-3"], "--steps must be at least 1"),
    (["generate", "a red star", "--n", "0"], "--n must be at least 1"),
    (["generate", "a red star", "--out", "/nonexistent-dir/x.png"], "cannot write"),
    (["learn"], "Missing argument"),
    (["learn", "/nonexistent-museum", "sunburst", "--images", "/nonexistent-images", "--set", "lr"],
     "--set takes KEY=VALUE"),
])
def test_cli_bad_input_is_one_clear_line_and_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]


def test_cli_out_that_is_a_folder(tmp_path):
    result = run_cli("generate", "a red star", "--out", str(tmp_path))
    assert result.returncode == 2 and "it is a folder" in result.stderr


def test_cli_generate_writes_a_grid(tiny_base, tmp_path):
    out = tmp_path / "grid.png"
    result = run_cli("generate", "a red star on a sand background", "--base", str(tiny_base), "--n", "3",
                     "--steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    with Image.open(out) as im:
        assert im.size == (3 * 32 * 4, 32 * 4)  # 3 images in a row, upscaled x4
        assert len(set(im.convert("RGB").getdata())) > 1


@needs_embedded
@needs_evaluator
def test_continued_pretraining_keeps_the_latent_space(tmp_path):
    """pretrain(continue_from=...) trains the VAE decoder only (encoder and scaling factor, hence the
    latent space the UNet was trained on, stay) and continues the UNet, text encoder and evaluator."""
    pretrain(tmp_path / "out", tmp_path / "work", n_base=64, n_eval=64, vae_steps=2, evaluator_steps=2, unet_steps=2,
             continue_from=EMBEDDED_PIPELINE.parent)
    old = StableDiffusionPipeline.from_pretrained(EMBEDDED_PIPELINE, safety_checker=None)
    new = StableDiffusionPipeline.from_pretrained(tmp_path / "out" / "pipeline", safety_checker=None)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # noqa: E731
    assert same(old.vae.encoder, new.vae.encoder) and same(old.vae.quant_conv, new.vae.quant_conv)
    assert new.vae.config.scaling_factor == old.vae.config.scaling_factor
    assert not same(old.vae.decoder, new.vae.decoder)
    assert not same(old.unet, new.unet) and not same(old.text_encoder, new.text_encoder)
    assert not same(load_evaluator(EMBEDDED_EVALUATOR), load_evaluator(tmp_path / "out" / "evaluator"))


def test_hard_negative_swaps_one_attribute_word():
    rng = random.Random(0)
    caption = "a large red star with stripes on the left on a sand background, outline style"
    swapped = {}
    for _ in range(60):
        negative = hard_negative(caption, rng)
        changed = [(a, b) for a, b in zip(caption.split(), negative.split()) if a != b]
        assert len(changed) == 1 and len(negative.split()) == len(caption.split()), negative
        (old, new), = changed
        vocab = next(v for v, _ in SWAPS if old.rstrip(",") in v)
        assert new.rstrip(",") in vocab and new != old
        swapped[old] = swapped.get(old, 0) + 1
    assert set(swapped) == {"star", "red", "sand"} and swapped["star"] > swapped["red"]
    assert hard_negative("a big background", rng) == "a big background"


def test_contrastive_loss_lets_hard_negatives_compete(tmp_path):
    torch.manual_seed(0)
    evaluator = Evaluator.create(write_clip_tokenizer(base_vocabulary(), tmp_path / "tokenizer"))
    pixels = torch.rand(3, 3, 32, 32)
    texts = ["a red star on a sand background", "a blue circle on a sky background", "a green cross"]
    plain = evaluator.contrastive_loss(pixels, texts)
    assert torch.allclose(evaluator.contrastive_loss(pixels, texts, negatives=()), plain)
    # a distinct caption is one more competitor in each image's softmax: the loss can only rise
    assert evaluator.contrastive_loss(pixels, texts, negatives=["a red hexagon on a sand background"]) > plain

"""ICGen's image-context adapter (museum/models/icgen.py): decoupled cross-attention built from diffusers' IP-Adapter
pieces, saved in IP-Adapter's layout and loaded back by plain diffusers' ``load_ip_adapter``; the measured
zero-shot test on the embedded model with the shipped adapter is marked slow."""

import json

import numpy as np
import pytest
import torch

from conftest import needs_icgen, run_cli
from museum.evaluation.protocol import score_base, zero_shot_alignment
from museum.generation.sampling import generate_images
from museum.methods import get_method
from museum.methods.base import ConceptInfo
from museum.models import icgen
from museum.models.loading import load_evaluator, load_pipeline
from museum.museum import Museum
from museum.plumbing.objectives import encode_prompts
from museum.training.trainer import train_concept
from museum.world.concepts import ZERO_SHOT_CONCEPTS, build_concept

# Measured with scripts/measure_icgen.py (docs/icgen.json, docs/METHODS.md "ICGen"): base model vs ICGen at scale
# 1, image alignment of the class prompts to the held-out references: honeycomb 0.085 -> 0.390, smiley 0.006 ->
# 0.255, flag 0.146 -> 0.212; mean 0.079 -> 0.285. About half of the mean gap, half of honeycomb's.
MEAN_MARGIN = 0.10
HONEYCOMB_MARGIN = 0.15


def unet_out(pipe, context, x, t, text):
    return pipe.unet(x, t, text, added_cond_kwargs={"image_embeds": [context]}).sample


def test_adapter_round_trips_through_plain_diffusers(tiny_base, tmp_path):
    pipe = load_pipeline(tiny_base)
    x = torch.randn(2, pipe.unet.config.in_channels, 8, 8)
    t = torch.tensor([500, 100])
    text = encode_prompts(pipe, ["a red circle", "a blue star"])
    base = pipe.unet(x, t, text).sample
    params = icgen.install(pipe.unet, image_embed_dim=16)
    with torch.no_grad():  # make the context matter (a fresh adapter's K/V copy the text ones)
        for p in params:
            p.add_(0.5 * torch.randn_like(p))
    context = torch.nn.functional.normalize(torch.randn(2, 1, 16), dim=-1)
    with torch.no_grad():
        ours = unet_out(pipe, context, x, t, text)
        assert (ours - unet_out(pipe, torch.zeros_like(context), x, t, text)).abs().max() > 1e-3  # context acts
    path = icgen.save_adapter(pipe.unet, tmp_path / "adapter")
    assert path.name == icgen.WEIGHT_NAME
    plain = load_pipeline(tiny_base)
    icgen.load_adapter(plain, tmp_path / "adapter")  # diffusers' own load_ip_adapter
    with torch.no_grad():
        torch.testing.assert_close(unet_out(plain, context, x, t, text), ours)
        plain.set_ip_adapter_scale(0.0)  # scale 0: the base model's prediction exactly
        torch.testing.assert_close(unet_out(plain, context, x, t, text), base)


def test_missing_adapter_is_explained(tiny_base, tmp_path):
    with pytest.raises(FileNotFoundError, match="no image-context adapter.*local IP-Adapter folder"):
        icgen.load_adapter(load_pipeline(tiny_base), tmp_path)


def test_context_kwargs_average_the_references_and_blank_the_unconditional_branch():
    emb = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    (embeds,) = icgen.context_kwargs(emb, batch=3)["ip_adapter_image_embeds"]
    assert embeds.shape == (6, 1, 16)
    assert torch.all(embeds[:3] == 0)
    torch.testing.assert_close(embeds[3:, 0], torch.nn.functional.normalize(emb.mean(0), dim=0).expand(3, -1))
    assert icgen.context_kwargs(emb, batch=3, guidance=False)["ip_adapter_image_embeds"][0].shape == (3, 1, 16)


@pytest.mark.slow
@needs_icgen
def test_zero_shot_context_beats_the_base_model():
    """Held-out concepts never seen by the adapter, no training: only the embeddings of each concept's five
    training images as context. Image alignment to the held-out references rises clearly above the base model's
    (about a minute)."""
    evaluator, pipe = load_evaluator(), load_pipeline()
    concepts = {n: build_concept(n) for n in ZERO_SHOT_CONCEPTS}
    base = {n: score_base(pipe, c, evaluator).image_alignment for n, c in concepts.items()}
    icgen.load_adapter(pipe)
    ours = {n: zero_shot_alignment(pipe, evaluator, c, scale=1.0) for n, c in concepts.items()}
    print({"base": base, "icgen": ours})
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    assert mean(ours) > mean(base) + MEAN_MARGIN
    assert ours["honeycomb"] > base["honeycomb"] + HONEYCOMB_MARGIN


def test_adapter_fits_only_the_model_it_was_trained_for(tiny_base, tmp_path):
    tiny = load_pipeline(tiny_base)
    assert not icgen.compatible(tiny.unet)  # the shipped adapter is the embedded model's
    assert not icgen.compatible(tiny.unet, tmp_path)  # no adapter there
    icgen.install(tiny.unet, image_embed_dim=16)
    icgen.save_adapter(tiny.unet, tmp_path)
    assert icgen.compatible(load_pipeline(tiny_base).unet, tmp_path)


@pytest.mark.slow
@needs_icgen
def test_lfs_concept_keeps_context_embeddings_and_draws_with_them(tmp_path):
    """An lfs concept on the embedded model stores its images' embeddings (not the images) and is drawn with them;
    scale 0 draws exactly as without context, the UNet is restored after drawing, and the export's lines draw the
    same image in plain diffusers (about 25 s)."""
    concept = build_concept("sunburst")
    m = Museum.init(tmp_path / "museum")
    m.learn("sunburst", concept.train_images, method="lfs", class_word="circle", steps=2, progress=False)
    stored = m.collection.tensors["sunburst"]
    torch.testing.assert_close(stored["context"], icgen.context_embeddings(load_evaluator(), concept.train_images))
    prompt = "a <sunburst> circle on a sand background"
    pixels = lambda images: np.stack([np.asarray(im, dtype=np.int16) for im in images])  # noqa: E731
    with_context = pixels(m.generate(prompt, n=2, steps=5))
    with icgen.context_scale(0.0):
        scale_zero = pixels(m.generate(prompt, n=2, steps=5))
    assert m.pipe.unet.encoder_hid_proj is None
    assert not any("IPAdapter" in type(p).__name__ for p in m.pipe.unet.attn_processors.values())
    # the export's written lines (plain diffusers, the shipped adapter) draw Museum's image

    info = json.loads((m.export("sunburst", tmp_path / "export") / "museum_export.json").read_text())
    scope = {}
    exec(info["load_with_diffusers"], scope)
    theirs = generate_images(scope["pipe"], [prompt], seeds=[0], steps=5,
                             ip_adapter_image_embeds=scope["ip_adapter_image_embeds"])
    assert np.abs(pixels(theirs) - with_context[:1]).max() <= 2
    del stored["context"]
    without = pixels(m.generate(prompt, n=2, steps=5))
    assert np.array_equal(scale_zero, without)
    assert np.abs(with_context - without).max() > 10
    out = tmp_path / "grid.png"
    done = run_cli("generate", str(tmp_path / "museum"), prompt, "--n", "1", "--steps", "3", "--context-scale", "0.5",
                   "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.is_file()
    refused = run_cli("generate", prompt, "--context-scale", "0.5", "--out", str(out))
    assert refused.returncode != 0 and "give the museum DIR" in refused.stdout + refused.stderr


@pytest.mark.slow
@needs_icgen
def test_lfs_learn_with_context_trains_with_it_and_restores_the_unet():
    """learn_with_context: every UNet call of the task gets the concept's context (a different result from the same seed),
    the distillation runs at context scale 0 (teacher and student agree at the first step), and the UNet is
    restored after the task (about 15 s)."""
    images = build_concept("sunburst").train_images
    results = {}
    for flag in (False, True):
        pipe = load_pipeline()
        info = ConceptInfo("sunburst", "<sunburst>", "circle", False, 0, "lfs")
        method = get_method("lfs", steps=3, learn_with_context=flag)
        calls = []  # per UNet call of the student: did it get image context?
        pipe.unet.register_forward_hook(
            lambda _m, _a, kwargs, _out: calls.append("image_embeds" in (kwargs.get("added_cond_kwargs") or {})),
            with_kwargs=True)
        results[flag] = train_concept(pipe, method, info, images, progress=False)
        assert any(calls) == flag and (all(calls) or not flag)  # with the flag: every call, training and distillation
        assert pipe.unet.encoder_hid_proj is None and pipe.unet.config.encoder_hid_dim_type is None
        assert not any("IPAdapter" in type(p).__name__ for p in pipe.unet.attn_processors.values())
        assert results[flag].terms["distillation"][0] == pytest.approx(0, abs=1e-10)
    torch.testing.assert_close(results[True].tensors["context"], results[False].tensors["context"])
    # same seed, same LoRA initialisation: the context is what changes the learned token
    assert not torch.allclose(results[True].tensors["<sunburst>"], results[False].tensors["<sunburst>"])

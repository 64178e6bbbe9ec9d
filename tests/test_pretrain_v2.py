"""World v2 pretraining in resumable chunks: a stage stopped and resumed ends bit for bit where an
uninterrupted run ends (tiny components, a few steps each)."""

import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from diffusers import AutoencoderKL, StableDiffusionPipeline

from museum.models import icgen
from museum.models.v2 import components
from museum.models.v2 import pretrain as P
from museum.world.v2 import render
from tiny_models import tiny_v2_text_encoder, tiny_v2_unet, tiny_v2_vae


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    work = tmp_path_factory.mktemp("render")
    paths = P.render_chunks(work, 40, seed=0, workers=1, chunk=20)
    scenes = [s for i in range(len(paths)) for s in P.chunk_scenes(i, 0, size=20)]
    return paths, P.load_images(paths), scenes


@pytest.fixture
def tiny_components(monkeypatch):
    monkeypatch.setattr(components, "make_vae", tiny_v2_vae)
    monkeypatch.setattr(components, "make_unet", tiny_v2_unet)
    monkeypatch.setattr(components, "make_text_encoder", tiny_v2_text_encoder)
    monkeypatch.setattr(P, "VAE_CROP_STEPS", 2)
    monkeypatch.setattr(P, "UNET_BATCH", 4)
    monkeypatch.setattr(P, "EVALUATOR_BATCH", 8)
    monkeypatch.setattr(P, "CHECKPOINT_EVERY", 2)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_rendered_chunks_are_kept_and_their_scenes_redrawn(tiny_set, tmp_path):
    paths, images, scenes = tiny_set
    assert images.shape == (40, 64, 64, 3) and len(scenes) == 40
    for index in (0, 1):  # chunk i holds base_samples(20, seed * 10_000 + i); image k renders with seed i * 1_000_003 + k
        assert (np.asarray(render.render(scenes[20 * index], index * 1_000_003)) == images[20 * index]).all()
    stamp = paths[0].stat().st_mtime_ns
    assert P.render_chunks(paths[0].parent.parent, 40, seed=0, workers=1, chunk=20) == paths
    assert paths[0].stat().st_mtime_ns == stamp  # not rendered again


def test_vae_resumed_equals_uninterrupted(tiny_set, tiny_components, tmp_path):
    _, images, _ = tiny_set
    assert P.train_vae(tmp_path / "a", images, steps=4, minutes=5, max_new_steps=3) is None
    assert (tmp_path / "a" / "vae-run" / "checkpoints").is_dir()
    resumed = P.train_vae(tmp_path / "a", images, steps=4, minutes=5)
    straight = P.train_vae(tmp_path / "b", images, steps=4, minutes=5)
    assert resumed is not None and _same_weights(resumed, straight)
    assert resumed.config.scaling_factor == straight.config.scaling_factor != 1.0
    again = P.train_vae(tmp_path / "a", images, steps=4, minutes=5)  # finished: loaded, not retrained
    assert _same_weights(again, resumed)


def test_unet_resumed_equals_uninterrupted(tiny_set, tiny_components, tmp_path):
    paths, images, scenes = tiny_set
    vae = P.train_vae(tmp_path / "vae", images, steps=2, minutes=5)
    for work in ("a", "b"):
        (tmp_path / work).mkdir()
        (tmp_path / work / "vae").symlink_to(tmp_path / "vae" / "vae")
    assert P.train_unet(tmp_path / "a", vae, paths, scenes, steps=4, minutes=5, max_new_steps=2) is None
    (tmp_path / "a" / "vae-refined").symlink_to(tmp_path / "vae" / "vae")
    snapshot, step = P.unet_snapshot(tmp_path / "a")  # the checkpoint's EMA weights (step 1 has lr 0: warm-up)
    torch.manual_seed(0)
    assert step == 2 and not _same_weights(snapshot.unet, components.make_unet())
    resumed = P.train_unet(tmp_path / "a", vae, paths, scenes, steps=4, minutes=5)
    straight = P.train_unet(tmp_path / "b", vae, paths, scenes, steps=4, minutes=5)
    assert _same_weights(resumed.unet, straight.unet) and _same_weights(resumed.text_encoder, straight.text_encoder)
    image = resumed(render.caption(scenes[0]), num_inference_steps=2, output_type="pil",
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_evaluator_trains_on_partial_captions_with_hard_negatives(tiny_set, tiny_components, tmp_path):
    _, images, scenes = tiny_set
    evaluator = P.train_evaluator(tmp_path, images, scenes, steps=2, minutes=5)
    assert evaluator.image_encoder.image_size == 64
    assert evaluator.embed_images(images[:3]).shape == (3, 128)
    assert (tmp_path / "evaluator" / "config.json").exists()


def test_icgen_resumed_equals_uninterrupted_and_loads_with_diffusers(tiny_set, tiny_components, monkeypatch, tmp_path):
    paths, images, scenes = tiny_set
    for name, value in (("ICGEN_OBJECTS", 3), ("ICGEN_VIEWS", 2), ("ICGEN_BATCH", 4)):
        monkeypatch.setattr(P, name, value)
    vae = P.train_vae(tmp_path / "vae", images, steps=2, minutes=5)
    (tmp_path / "u").mkdir()
    pipe = P.train_unet(tmp_path / "u", vae, paths, scenes, steps=2, minutes=5)
    evaluator = P.train_evaluator(tmp_path / "e", images, scenes, steps=1, minutes=5)
    for work in ("a", "b"):
        (tmp_path / work).mkdir()
    assert P.train_icgen(tmp_path / "a", pipe, evaluator, steps=4, minutes=5, max_new_steps=2) is None
    resumed = P.train_icgen(tmp_path / "a", pipe, evaluator, steps=4, minutes=5)
    straight = P.train_icgen(tmp_path / "b", pipe, evaluator, steps=4, minutes=5)
    a, b = (load_file(folder / icgen.WEIGHT_NAME) for folder in (resumed, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("ip_adapter") for k in pipe.unet.state_dict())  # the pipeline's UNet is untouched
    data = torch.load(tmp_path / "a" / "icgen-data.pt")
    assert data["latents"].shape[:2] == (3, 2) and all(len(c) == 2 for c in data["captions"])
    icgen.load_adapter(pipe, resumed)  # diffusers' load_ip_adapter reads it
    context = evaluator.embed_images(images[:1]).float()
    image = pipe(render.caption(scenes[0]), num_inference_steps=2, ip_adapter_image_embeds=[torch.stack([0 * context, context])],
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_icgen_captions_leave_the_object_to_the_context():
    rng = random.Random(0)
    scene = render.random_scene(random.Random(1), style_p=1.0)
    views = P.icgen_views(scene, rng, 3)
    assert all(v.look == scene.look and v.style is None for v in views)
    captions = [P.icgen_caption(views[0], rng) for _ in range(200)]
    assert {c.split(" on ")[0].split()[-1] for c in captions} >= {scene.look.shape}
    assert sum(render.caption(views[0]) == c for c in captions) in range(25, 75)  # fully named a quarter of the time


def test_perturb_changes_what_the_caption_says():
    rng = random.Random(0)
    for scene, _ in render.base_samples(300, seed=7, pair_fraction=0.0):
        drop = render.caption_drop(rng)
        assert render.caption(P.perturb(scene, rng, drop), drop=drop) != render.caption(scene, drop=drop)


def test_resume_skips_an_incomplete_checkpoint_and_refuses_other_settings(tiny_set, tiny_components, tmp_path):
    """A process killed while saving leaves a newest checkpoint without step.json: resume falls back to the
    one before it and still ends where an uninterrupted run ends; changed settings are refused."""
    _, images, _ = tiny_set
    assert P.train_vae(tmp_path / "a", images, steps=6, minutes=5, max_new_steps=4) is None  # checkpoints at 2 and 4
    checkpoints = sorted((tmp_path / "a" / "vae-run" / "checkpoints").glob("checkpoint_*"), key=P._number)
    (checkpoints[-1] / "step.json").unlink()  # the kill: step 4's state without its marker
    resumed = P.train_vae(tmp_path / "a", images, steps=6, minutes=5)
    assert not checkpoints[-1].exists()
    assert _same_weights(resumed, P.train_vae(tmp_path / "b", images, steps=6, minutes=5))
    P.train_vae(tmp_path / "c", images, steps=6, minutes=5, max_new_steps=2)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(P, "VAE_LR", P.VAE_LR / 2)
    with pytest.raises(P.StaleCacheError, match="saved with"):
        P.train_vae(tmp_path / "c", images, steps=6, minutes=5)
    monkeypatch.undo()


def test_a_cache_made_by_other_code_is_refused(tiny_set, tiny_components, tmp_path, monkeypatch):
    paths, images, _ = tiny_set
    P.verify_chunks(paths, 0, chunk=20)  # made by this code: accepted
    stale = tmp_path / "render" / paths[1].name
    stale.parent.mkdir()
    np.savez(stale, images=images[:20])  # chunk 0's pixels under chunk 1's name
    with pytest.raises(P.StaleCacheError, match="delete"):
        P.verify_chunks([stale], 0, chunk=20)
    vae = P.train_vae(tmp_path, images, steps=2, minutes=5)
    assert P.encode_latents(tmp_path, vae, paths[:1]) is not None
    other = tiny_v2_vae()
    with pytest.raises(P.StaleCacheError, match="another VAE"):
        P.encode_latents(tmp_path, other, paths[:1])


def test_pretrain_runs_the_stages_in_order_across_calls(tiny_components, monkeypatch, tmp_path):
    for name, value in (("N_VAE", 20), ("N_BASE", 40), ("CHUNK", 20), ("VAE_STEPS", 2), ("VAE_REFINE_STEPS", 2),
                        ("UNET_STEPS", 2), ("EVALUATOR_STEPS", 2), ("ICGEN_STEPS", 2), ("ICGEN_OBJECTS", 3),
                        ("ICGEN_VIEWS", 2), ("ICGEN_BATCH", 4)):
        monkeypatch.setattr(P, name, value)
    assert not P.pretrain(tmp_path, minutes=0)  # renders the VAE's set, then its time is up
    assert len(list((tmp_path / "render").glob("chunk-*.npz"))) == 1 and not (tmp_path / "vae").exists()
    monkeypatch.setattr(P, "N_EVALUATOR", 20)
    P.pretrain_evaluator(tmp_path, minutes=10)  # alone, before the UNet: it needs the renders only
    evaluator_file = tmp_path / "evaluator" / "image_encoder.safetensors"
    trained_at = evaluator_file.stat().st_mtime_ns
    assert not (tmp_path / "vae").exists() and not (tmp_path / "unet-run").exists()
    assert P.pretrain(tmp_path, minutes=10)
    assert evaluator_file.stat().st_mtime_ns == trained_at  # pretrain found it done
    assert (tmp_path / "pipeline" / "model_index.json").exists() and (tmp_path / "evaluator" / "config.json").exists()
    assert (tmp_path / "icgen" / icgen.WEIGHT_NAME).exists()
    refined = AutoencoderKL.from_pretrained(tmp_path / "vae-refined")
    assert not _same_weights(refined, AutoencoderKL.from_pretrained(tmp_path / "vae"))
    assert _same_weights(refined, StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline").vae)  # the UNet's VAE
    assert len(list((tmp_path / "render").glob("chunk-*.npz"))) == 2
    assert P.pretrain(tmp_path, minutes=0)  # all done: loads, trains nothing
    sizes = P.ship(tmp_path, tmp_path / "package")
    shipped = StableDiffusionPipeline.from_pretrained(tmp_path / "package" / "pipeline", dtype=torch.float32)
    trained = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert shipped.unet.dtype == torch.float32 and set(sizes) == {"pipeline", "evaluator", "icgen"}
    for (name, a), b in zip(shipped.unet.state_dict().items(), trained.unet.state_dict().values()):
        assert torch.equal(a, b.half().float()), name  # stored in fp16, loaded as fp32
    monkeypatch.setattr(P, "SHIPPED_LIMIT", sum(sizes.values()) - 1)
    with pytest.raises(ValueError, match="over the"):
        P.ship(tmp_path, tmp_path / "package-2")
    assert not (tmp_path / "package-2").exists()


def test_frequency_loss_prefers_the_texture_to_its_grey_average():
    """Scanlines drawn one pixel off lose to flat grey in the pixel losses, which is why a VAE unsure of their
    phase draws grey; the spectrum's amplitude prefers the lines."""
    lines = torch.zeros(1, 3, 64, 64)
    lines[:, :, ::3] = 1.0
    shifted, grey = lines.roll(1, dims=2), torch.full_like(lines, lines.mean().item())
    l1 = torch.nn.functional.l1_loss
    assert l1(shifted, lines) > l1(grey, lines)
    assert P.frequency_loss(shifted, lines) < 1e-5 < P.frequency_loss(grey, lines)


def test_offset_noise_moves_each_channels_mean_and_nothing_else():
    """Offset noise: a per-sample, per-channel constant on top of Gaussian noise, so a 16x16 latent's mean no
    longer keeps the image's colour at the last timestep (the reason for P.NOISE_OFFSET)."""
    latents = torch.zeros(512, 8, 16, 16)
    torch.manual_seed(0)
    plain = P.training_noise(latents, 0.0)
    offset = P.training_noise(latents, 0.25)
    assert plain.mean((2, 3)).std().item() == pytest.approx(1 / 16, rel=0.1)  # 256 positions average it down
    assert offset.mean((2, 3)).std().item() == pytest.approx((0.25 ** 2 + 1 / 256) ** 0.5, rel=0.1)
    within = offset - offset.mean((2, 3), keepdim=True)
    assert within.std().item() == pytest.approx(1.0, rel=0.02)  # the noise around each channel's mean is unchanged


def test_a_lengthened_schedule_is_diffusers_cosine_until_it_is_lengthened_then_the_longer_one():
    from diffusers.optimization import get_cosine_schedule_with_warmup

    def factors(make, n):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, out = make(opt), []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step(), sched.step()
        return np.array(out)

    lengthened = factors(lambda o: P.lengthened_cosine(o, 10, 60, 40, 80), 80)
    planned = factors(lambda o: get_cosine_schedule_with_warmup(o, 10, 60), 60)
    longer = factors(lambda o: get_cosine_schedule_with_warmup(o, 10, 80), 80)
    np.testing.assert_allclose(lengthened[:41], planned[:41])  # step 41 still ran at the rate its checkpoint held
    np.testing.assert_allclose(lengthened[41:], longer[41:])
    assert lengthened[41] > lengthened[40]  # the learning rate rises where the run was lengthened

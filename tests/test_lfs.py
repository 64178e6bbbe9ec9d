"""LFS-Diffusion's data-free distillation (``museum/methods/distill.py``, method ``lfs``) on the tiny random
pipeline: inputs from noise and teacher DDIM steps, the prompts it protects, the teacher from before the task,
no earlier image read, resume with a lazily drawn bank."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import museum_snapshot, needs_embedded, run_cli, stop_at
from museum.errors import MuseumError
from museum.evaluation.relevant import CIRCLE_CONCEPTS, base_images, relevant_forgetting
from museum.generation.sampling import generate_images
from museum.methods import get_method
from museum.methods.base import ConceptInfo, TrainContext
from museum.methods.distill import DataFreeDistillation, noise_bank
from museum.methods.lfs import LFS
from museum.models import icgen
from museum.models.loading import load_evaluator, load_pipeline
from museum.museum import Museum
from museum.plumbing.objectives import encode_prompts
from museum.training.data import read_image_folder
from museum.training.trainer import Checkpointer, train_concept
from museum.world.concepts import build_concept
from tiny_models import build_tiny_ip_adapter

FAST = dict(steps=4, lr=2e-2, token_lr=0.5, num_prompts=4)
# Measured with scripts/measure_lfs.py --steps 100 --set lr=6e-4 token_lr=3e-3 (docs/lfs-100steps.json), the class
# prompts drawn with the LoRA after two circle concepts: pixel RMSE to the base model's images 0.094 with the
# distillation vs 0.142 without (gap 0.048); paired evaluator alignment to them 0.971 vs 0.939 (gap 0.032).
# About half of each gap is required. 100 steps at 3x the default rates stand in for lfs's 300 default steps.
RELEVANT_SETTINGS = dict(steps=100, lr=6e-4, token_lr=3e-3)
RMSE_MARGIN = 0.024
PAIRED_MARGIN = 0.015


def concept(name, class_word="circle", index=0, method="lfs"):
    return ConceptInfo(name, f"<{name}>", class_word, class_word == "style", index, method)


def test_noise_bank_is_noise_then_the_teachers_own_ddim_steps(tiny_base):
    pipe = load_pipeline(tiny_base)
    text = encode_prompts(pipe, ["a red circle on a sand background", "a blue circle on a sky background"])
    noisy, t, index = noise_bank(pipe.unet, pipe.scheduler.config, text, teacher_steps=2, inference_steps=5, seed=3)
    cfg = pipe.unet.config
    assert noisy.shape == (6, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    assert index.tolist() == [0, 1, 0, 1, 0, 1]
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(5)
    assert t.tolist() == [int(sched.timesteps[i]) for i in (0, 0, 1, 1, 2, 2)]
    x = torch.randn(noisy[:2].shape, generator=torch.Generator().manual_seed(3)) * sched.init_noise_sigma
    torch.testing.assert_close(noisy[:2], x)  # pure noise at the first timestep
    with torch.no_grad():  # then the teacher's DDIM steps on each sample's own prompt
        for i in (1, 2):
            step = sched.timesteps[i - 1]
            x = sched.step(pipe.unet(x, step, text).sample, step, x).prev_sample
            torch.testing.assert_close(noisy[2 * i:2 * i + 2], x, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="teacher_steps"):
        noise_bank(pipe.unet, pipe.scheduler.config, text, teacher_steps=5, inference_steps=5, seed=3)


def test_prompts_name_the_class_word_and_earlier_tokens_only(tiny_base):
    method = get_method("lfs", num_prompts=3)
    ctx = TrainContext(pipe=None, concept=concept("smiley", index=2), state={}, accelerator=None, cache_dir=None,
                       earlier=[concept("sunburst"), concept("neon", "style", 1, method="c-lora")])
    prompts = method.distillation_prompts(ctx)
    # 3 class prompts, 3 empty prompts (guidance's unconditional branch), 3 for the earlier lfs concept;
    # the c-lora concept is not drawn with this LoRA
    assert len(prompts) == 9 and prompts[3:6] == ["", "", ""]
    assert all(" circle " in p and "<" not in p for p in prompts[:3])
    assert all("<sunburst> circle" in p for p in prompts[6:])
    assert not any("<smiley>" in p or "<neon>" in p for p in prompts)
    assert method.wants_teacher(ctx)  # already on the first task: the class word is protected against the base
    assert not get_method("lfs", distill_weight=0.0).wants_teacher(ctx)
    assert "" not in get_method("lfs", num_prompts=3, unconditional=False).distillation_prompts(ctx)


def test_distillation_needs_the_teacher():
    term = DataFreeDistillation(torch.zeros(1, 4, 8), batch=1, teacher_steps=0, inference_steps=2, seed=0)
    with pytest.raises(RuntimeError, match="wants_teacher"):
        term.loss(torch.nn.Linear(1, 1), None, {}, torch.Generator())


def test_lfs_never_reads_earlier_images(tiny_base, concept_images, tmp_path, record_task):
    """The second task distils against the model before it (the museum's LoRA) from noise alone: the first
    concept's image folder is deleted, and every image opened is recorded."""
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(concept_images["sunburst"][0], first)
    shutil.copytree(concept_images["checker"][0], second)
    m = Museum.init(tmp_path / "museum", base=tiny_base)
    m.learn("sunburst", first, method="lfs", class_word="circle", progress=False, **FAST)
    state_before = dict(m.method_state("lfs"))
    shutil.rmtree(first)

    opened, seen = record_task(LFS)
    m.learn("checker", second, method="lfs", class_word="square", progress=False, **FAST)
    assert opened and all(p.startswith(str(second)) for p in opened), opened
    for key, value in state_before.items():  # the teacher is the model before the task
        torch.testing.assert_close(seen["teacher"][key], value)
    values = [t["distillation"] for t in seen["terms"]]
    assert len(values) == FAST["steps"] and values[0] == pytest.approx(0, abs=1e-10) and max(values) > 0


def test_distillation_has_gradient_and_switches_off(tiny_base, concept_images):
    pipe = load_pipeline(tiny_base)
    images = concept_images["sunburst"][1].train_images
    on = train_concept(pipe, get_method("lfs", **FAST), concept("sunburst"), images, progress=False)
    assert set(on.terms) == {"distillation"} and on.terms["distillation"][0] == pytest.approx(0, abs=1e-10)
    assert max(on.terms["distillation"]) > 0
    off = train_concept(load_pipeline(tiny_base), get_method("lfs", **dict(FAST, distill_weight=0.0)),
                        concept("sunburst"), images, progress=False)
    assert off.terms == {}
    # the LoRA differs with the term on: its gradient reaches the shared LoRA
    assert any(not torch.allclose(on.state[k], off.state[k]) for k in on.state)


def test_resume_draws_the_same_bank_from_the_model_before_the_task(tiny_base, concept_images, tmp_path):
    pipe0 = load_pipeline(tiny_base)
    images = concept_images["sunburst"][1].train_images
    first = train_concept(pipe0, get_method("lfs", **FAST), concept("sunburst"), images, progress=False)
    earlier = concept("sunburst")
    earlier.tensors, earlier.config = first.tensors, get_method("lfs", **FAST).config.to_dict()
    later = concept("smiley", index=1)
    other = concept_images["checker"][1].train_images
    straight = train_concept(copy.deepcopy(pipe0), get_method("lfs", **FAST), later, other, state=first.state,
                             earlier=[earlier], progress=False)
    ckpt = Checkpointer(tmp_path / "work", every=2)

    with pytest.raises(KeyboardInterrupt):
        train_concept(copy.deepcopy(pipe0), get_method("lfs", **FAST), later, other, state=first.state,
                      earlier=[earlier], checkpoints=ckpt, progress=False, on_step=stop_at(3))
    resumed = train_concept(copy.deepcopy(pipe0), get_method("lfs", **FAST), later, other, state=first.state,
                            earlier=[earlier], checkpoints=ckpt, resume=True, progress=False)
    for key, value in straight.state.items():
        torch.testing.assert_close(resumed.state[key], value)
    assert resumed.terms["distillation"] == pytest.approx(straight.terms["distillation"][2:])


# ----------------------------------------------------------------------------- relevant-concept forgetting (embedded)


@pytest.mark.slow
@needs_embedded
def test_distillation_keeps_plain_class_prompts_closer_to_the_base(tmp_path):
    """After learning two "my circle" concepts (sunburst, smiley; 100 steps each at 3x the default rates,
    distillation on and off), "a red circle on a ... background" drawn with the learned LoRA stays closer to the
    base model's images with the data-free distillation on (about 1.5 minutes on 2 CPU cores)."""
    evaluator = load_evaluator()
    base = base_images(load_pipeline())
    concepts = [build_concept(n) for n in CIRCLE_CONCEPTS]
    runs = {w: relevant_forgetting(evaluator, tmp_path / f"w{w:g}", base, concepts=concepts, distill_weight=w,
                                   **RELEVANT_SETTINGS) for w in (3.0, 0.0)}
    on, off = runs[3.0], runs[0.0]
    print({w: {k: v for k, v in r.items() if k != "images"} for w, r in runs.items()})
    assert off["pixel_rmse_to_base"] - on["pixel_rmse_to_base"] > RMSE_MARGIN
    assert on["paired_alignment_to_base"] - off["paired_alignment_to_base"] > PAIRED_MARGIN


# ----------------------------------------------------------------------------- ICGen with a user's IP-Adapter (tiny)


@pytest.fixture(scope="module")
def ip_adapter_dir(tiny_base, tmp_path_factory):
    """A random IP-Adapter for the tiny SD-1.x pipeline in diffusers' layout (weights + image_encoder/)."""
    return build_tiny_ip_adapter(tiny_base, tmp_path_factory.mktemp("ip-adapter") / "adapter")


@pytest.fixture(scope="module")
def ip_museum(tiny_base, ip_adapter_dir, concept_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip-museum") / "museum"
    m = Museum.init(folder, base=tiny_base)
    m.learn("sunburst", concept_images["sunburst"][0], method="lfs", class_word="circle", progress=False,
            ip_adapter=ip_adapter_dir, **FAST)
    return folder, m


IP_PROMPT = "a <sunburst> circle on a grass background"


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_ip_adapter_context_is_the_encoders_image_embeds_and_recorded(ip_museum, ip_adapter_dir, tiny_base,
                                                                      concept_images):
    """The concept keeps diffusers' own ``encode_image`` embeddings of its images (not the images), and its config
    names the adapter folder and weight file it was learned with."""
    _, m = ip_museum
    stored = m.collection.tensors["sunburst"]
    images, _ = read_image_folder(concept_images["sunburst"][0])
    plain = load_pipeline(tiny_base)
    plain.load_ip_adapter(str(ip_adapter_dir), subfolder="", weight_name="ip-adapter_tiny.safetensors")
    expected, _ = plain.encode_image(images, "cpu", 1)
    assert stored["context"].shape == (3, 12)
    torch.testing.assert_close(stored["context"], expected, atol=1e-5, rtol=1e-4)
    config = m.concept("sunburst").info["config"]
    assert config["ip_adapter"] == str(ip_adapter_dir.resolve())
    assert config["ip_adapter_weight"] == "ip-adapter_tiny.safetensors"
    assert not any(isinstance(v, Image.Image) for v in stored.values()) and set(stored) == {"<sunburst>", "context"}


def test_ip_adapter_context_changes_the_image_and_survives_reopening(ip_museum):
    folder, m = ip_museum
    with_context = pixels(m.generate(IP_PROMPT, n=2, steps=4))
    with icgen.context_scale(0.0):
        scale_zero = pixels(m.generate(IP_PROMPT, n=2, steps=4))
    assert m.pipe.unet.encoder_hid_proj is None  # the UNet is restored after drawing
    assert np.abs(with_context - scale_zero).max() > 10
    reopened = Museum.open(folder)
    assert np.array_equal(pixels(reopened.generate(IP_PROMPT, n=2, steps=4)), with_context)
    context = reopened.collection.tensors["sunburst"].pop("context")  # the same concept without context
    try:
        assert np.array_equal(pixels(reopened.generate(IP_PROMPT, n=2, steps=4)), scale_zero)
    finally:
        reopened.collection.tensors["sunburst"]["context"] = context


def test_ip_adapter_export_reproduces_the_image_in_plain_diffusers(ip_museum, ip_adapter_dir, tmp_path):
    _, m = ip_museum
    out = m.export("sunburst", tmp_path / "export")
    info = json.loads((out / "museum_export.json").read_text())
    assert info["ip_adapter"]["folder"] == str(ip_adapter_dir.resolve()) and info["ip_adapter"]["concepts"] == ["sunburst"]
    snippet = info["load_with_diffusers"]
    assert "load_ip_adapter" in snippet and "load_lora_weights" in snippet and "museum" not in snippet.split("\n", 1)[1]
    scope = {}
    exec(snippet, scope)  # the written lines, as they are: plain diffusers
    pipe = scope["pipe"]
    pipe.set_progress_bar_config(disable=True)
    assert info["ip_adapter"]["call"] == "pipe(prompt, ip_adapter_image_embeds=ip_adapter_image_embeds)"
    theirs = generate_images(pipe, [IP_PROMPT], seeds=[0], steps=4,
                             ip_adapter_image_embeds=scope["ip_adapter_image_embeds"])
    ours = m.generate(IP_PROMPT, n=1, steps=4)
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 2
    without = generate_images(pipe, [IP_PROMPT], seeds=[0], steps=4,
                              ip_adapter_image_embeds=[torch.zeros_like(scope["ip_adapter_image_embeds"][0])])
    assert np.abs(pixels(without) - pixels(theirs)).max() > 10  # the context file is what makes the match


def _two_weights(good, tmp):
    shutil.copytree(good, tmp)
    shutil.copy(tmp / "ip-adapter_tiny.safetensors", tmp / "ip-adapter_other.safetensors")
    return tmp, {}, r"ip-adapter_other.safetensors, ip-adapter_tiny.safetensors.*--ip-adapter-weight"


def _no_encoder(good, tmp):
    shutil.copytree(good, tmp)
    shutil.rmtree(tmp / "image_encoder")
    return tmp, {}, r"has no image encoder \(image_encoder/config.json"


def _wrong_width(good, tmp):
    shutil.copytree(good, tmp)
    state = load_file(tmp / "ip-adapter_tiny.safetensors")
    state = {k: torch.randn(v.shape[0], 24) if "_ip." in k else v for k, v in state.items()}  # text width 24, not 16
    save_file(state, tmp / "ip-adapter_tiny.safetensors")
    return tmp, {}, r"does not fit this base model.*pass --ip-adapter DIR"


def _broken_encoder(good, tmp):
    shutil.copytree(good, tmp)
    (tmp / "image_encoder" / "model.safetensors").write_bytes(b"not weights")
    return tmp, {}, r"image encoder in .* does not load"


BAD = {"missing": lambda good, tmp: (tmp / "nowhere", {}, r"no IP-Adapter folder at .*nowhere; pass --ip-adapter DIR"),
       "two-weights": _two_weights, "no-encoder": _no_encoder, "wrong-width": _wrong_width,
       "broken-encoder": _broken_encoder,
       "unknown-weight": lambda good, tmp: (good, {"ip_adapter_weight": "x.safetensors"}, r"no IP-Adapter weight file "
                                            r"'x.safetensors'.*ip-adapter_tiny.safetensors")}


@pytest.mark.parametrize("case", BAD)
def test_bad_ip_adapters_are_explained_and_change_nothing(case, tiny_base, ip_adapter_dir, concept_images, tmp_path):
    folder = tmp_path / "museum"
    Museum.init(folder, base=tiny_base)
    before = museum_snapshot(folder)
    adapter, extra, message = BAD[case](ip_adapter_dir, tmp_path / "adapter")
    with pytest.raises(MuseumError, match=message):
        Museum.open(folder).learn("sunburst", concept_images["sunburst"][0], method="lfs", class_word="circle",
                                  progress=False, ip_adapter=adapter, **extra, **FAST)
    assert museum_snapshot(folder) == before and Museum.open(folder).concepts == []


def test_cli_ip_adapter_options(tiny_base, ip_adapter_dir, concept_images, tmp_path):
    """Without --ip-adapter on a non-embedded base the warning says so once; two weight files without
    --ip-adapter-weight are an error naming both; the options are refused for other methods."""
    folder = tmp_path / "museum"
    Museum.init(folder, base=tiny_base)
    images = str(concept_images["sunburst"][0])
    done = run_cli("learn", str(folder), "sunburst", "--images", images, "--method", "lfs", "--class-word", "circle",
                   "--steps", "2", "--set", "num_prompts=2")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("warning: no IP-Adapter given: this lfs concept keeps no image context (pass "
                             "--ip-adapter DIR") == 1
    stored = Museum.open(folder)
    assert "context" not in stored.concept_info(stored.manifest.concept("sunburst")).tensors
    two, _, _ = _two_weights(ip_adapter_dir, tmp_path / "two")
    refused = run_cli("learn", str(folder), "checker", "--images", images, "--method", "lfs", "--class-word",
                      "square", "--ip-adapter", str(two))
    assert refused.returncode == 2
    assert "error: " in refused.stderr and "ip-adapter_other.safetensors, ip-adapter_tiny.safetensors" in refused.stderr
    other = run_cli("learn", str(folder), "checker", "--images", images, "--class-word", "square", "--ip-adapter",
                    str(ip_adapter_dir))
    assert other.returncode == 2 and "are for --method lfs" in other.stderr
    twice = run_cli("learn", str(folder), "checker", "--images", images, "--method", "lfs", "--class-word", "square",
                    "--ip-adapter", str(ip_adapter_dir), "--set", f"ip_adapter={ip_adapter_dir}")
    assert twice.returncode == 2 and "ip_adapter is given twice" in twice.stderr
    assert [c.name for c in Museum.open(folder).concepts] == ["sunburst"]


def test_a_moved_ip_adapter_is_named_when_drawing(tiny_base, ip_adapter_dir, concept_images, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(ip_adapter_dir, adapter)
    m = Museum.init(tmp_path / "museum", base=tiny_base)
    m.learn("sunburst", concept_images["sunburst"][0], method="lfs", class_word="circle", progress=False,
            ip_adapter=adapter, **FAST)
    shutil.rmtree(adapter)
    with pytest.raises(MuseumError, match=r"learned with the IP-Adapter .*adapter/ip-adapter_tiny.safetensors, which "
                                          r"is not there any more; put it back"):
        Museum.open(tmp_path / "museum").generate(IP_PROMPT, n=1, steps=2)

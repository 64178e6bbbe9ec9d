"""LFS-Diffusion's data-free distillation (``museum/training/distill.py``, method ``lfs``) on the tiny random
pipeline: inputs from noise and teacher DDIM steps, the prompts it protects, the teacher from before the task,
no earlier image read, resume with a lazily drawn bank."""

import copy
import shutil

import pytest
import torch
from diffusers import DDIMScheduler

from museum.base.loading import EMBEDDED_PIPELINE, load_evaluator, load_pipeline
from museum.evaluation.relevant import CIRCLE_CONCEPTS, base_images, relevant_forgetting
from museum.methods import get_method
from museum.methods.base import ConceptInfo, TrainContext
from museum.methods.lfs import LFS
from museum.museum import Museum
from museum.training.distill import DataFreeDistillation, noise_bank
from museum.training.objectives import encode_prompts
from museum.training.trainer import Checkpointer, train_concept
from museum.world.concepts import build_concept

FAST = dict(steps=4, lr=2e-2, token_lr=0.5, num_prompts=4)
# Measured with scripts/measure_lfs.py --steps 100 (docs/lfs-100steps.json, docs/METHODS.md "LFS-Diffusion"), the
# class prompts drawn with the LoRA after two circle concepts: pixel RMSE to the base model's images 0.055 with the
# distillation vs 0.116 without (gap 0.061); paired evaluator alignment to them 0.977 vs 0.896 (gap 0.081).
# Half of each gap is required.
RELEVANT_STEPS = 100
RMSE_MARGIN = 0.03
PAIRED_MARGIN = 0.04


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

    def stop(step, _loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_concept(copy.deepcopy(pipe0), get_method("lfs", **FAST), later, other, state=first.state,
                      earlier=[earlier], checkpoints=ckpt, progress=False, on_step=stop)
    resumed = train_concept(copy.deepcopy(pipe0), get_method("lfs", **FAST), later, other, state=first.state,
                            earlier=[earlier], checkpoints=ckpt, resume=True, progress=False)
    for key, value in straight.state.items():
        torch.testing.assert_close(resumed.state[key], value)
    assert resumed.terms["distillation"] == pytest.approx(straight.terms["distillation"][2:])


# ----------------------------------------------------------------------------- relevant-concept forgetting (embedded)


@pytest.mark.slow
@pytest.mark.skipif(not (EMBEDDED_PIPELINE / "model_index.json").is_file(), reason="embedded model not built")
def test_distillation_keeps_plain_class_prompts_closer_to_the_base(tmp_path):
    """After learning two "my circle" concepts (sunburst, smiley; 100 steps each, distillation on and off), "a red
    circle on a ... background" drawn with the learned LoRA stays closer to the base model's images with the
    data-free distillation on (about 1.5 minutes on 2 CPU cores)."""
    evaluator = load_evaluator()
    base = base_images(load_pipeline())
    concepts = [build_concept(n) for n in CIRCLE_CONCEPTS]
    runs = {w: relevant_forgetting(evaluator, tmp_path / f"w{w:g}", base, concepts=concepts, distill_weight=w,
                                   steps=RELEVANT_STEPS) for w in (3.0, 0.0)}
    on, off = runs[3.0], runs[0.0]
    print({w: {k: v for k, v in r.items() if k != "images"} for w, r in runs.items()})
    assert off["pixel_rmse_to_base"] - on["pixel_rmse_to_base"] > RMSE_MARGIN
    assert on["paired_alignment_to_base"] - off["paired_alignment_to_base"] > PAIRED_MARGIN
    # and the concepts are still learned (base model: about 0.04 for sunburst)
    assert on["concepts"]["sunburst"] > 0.15

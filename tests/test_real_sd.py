"""Real Stable Diffusion families (issue 8): what differs from the embedded model's path.

The per-method matrix on SD-1.x, SD-2.x and SDXL pipelines lives in test_method_matrix.py; this file
checks the family-specific pieces: the v-prediction target, single-file checkpoints, offline errors,
the GPU-practice options, storage formulas, data-parallel processes and SDXL's two token rows."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.utils.checkpoint as cp
from safetensors.torch import load_file

from conftest import run_cli
from ldm_checkpoint import write_ldm_checkpoint
from museum.errors import BaseModelError, MuseumError
from museum.generation.sampling import generate_images
from museum.methods import perfusion
from museum.methods.base import ConceptInfo, family_of, get_method
from museum.methods.textual_inversion import TextualInversionConfig
from museum.models.loading import load_pipeline
from museum.museum import Museum
from museum.plumbing import objectives, tokens
from museum.training import memory, trainer
from museum.training.trainer import TrainOptions, train_concept


@pytest.mark.parametrize("family,kind", [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_trainer_regresses_the_family_target(tiny_family, concept_images, monkeypatch, family, kind):
    """SD-2.x (v-prediction) trains on v = sqrt(a) eps - sqrt(1-a) x0, SD-1.x on eps: every target the
    trainer computes is checked against diffusers' own scheduler."""
    pipe = load_pipeline(tiny_family(family))
    seen = []

    def checked(scheduler, latents, noise, t):
        target = objectives.diffusion_target(scheduler, latents, noise, t)
        expected = scheduler.get_velocity(latents, noise, t) if kind == "v_prediction" else noise
        assert scheduler.config.prediction_type == kind
        assert torch.equal(target, expected)
        seen.append(float((target - noise).abs().max()))
        return target

    monkeypatch.setattr(trainer, "diffusion_target", checked)
    images = concept_images["sunburst"][1].train_images
    method = get_method("textual-inversion", steps=2, batch_size=2)
    train_concept(pipe, method, ConceptInfo("sunburst", "<sunburst>", "circle", False), images, progress=False)
    assert len(seen) == trainer._DivergenceWatch.BASELINE_BATCHES + 2
    # the v target is not the noise; the eps target is
    assert (min(seen) > 0.01) if kind == "v_prediction" else (max(seen) == 0.0)


# --------------------------------------------------------------------------- single-file checkpoints


@pytest.fixture(scope="module")
def single_files(tiny_base, tmp_path_factory):
    """The SD-1.x tiny pipeline as original-layout single files (.safetensors and pickle .ckpt)."""
    root = tmp_path_factory.mktemp("single")
    pipe = load_pipeline(tiny_base)
    return {s: write_ldm_checkpoint(pipe, root / f"tiny-sd1.{s}") for s in ("safetensors", "ckpt")}


@pytest.fixture(scope="module")
def single_file(single_files, tiny_family, tmp_path_factory):
    """``single_file(family)``: the tiny pipeline of ``family`` (sd1, sd2 v-prediction, sdxl) as one original-layout
    .safetensors file: SD-2's text encoder as an OpenCLIP tower, SDXL's two under ``conditioner.embedders``."""
    root = tmp_path_factory.mktemp("single-families")
    written = {"sd1": single_files["safetensors"]}

    def get(family: str):
        if family not in written:
            written[family] = write_ldm_checkpoint(load_pipeline(tiny_family(family)), root / f"tiny-{family}.safetensors",
                                                   family=family)
        return written[family]

    return get


@pytest.mark.parametrize("family,kind,pipeline", [("sd1", "epsilon", "StableDiffusionPipeline"),
                                                  ("sd2", "v_prediction", "StableDiffusionPipeline"),
                                                  ("sdxl", "epsilon", "StableDiffusionXLPipeline")])
def test_init_from_a_single_file_checkpoint(single_file, tiny_family, concept_images, tmp_path, family, kind,
                                            pipeline):
    """SD-1.x, SD-2.x (v-prediction, OpenCLIP text tower) and SDXL (two text encoders, added text/time
    embedding) single files: init saves the same weights as the pipeline folder the file was written from, the
    base keeps the family's scheduler and pipeline class, and a concept learns on it. SD-1 goes through the CLI."""
    folder, config = tmp_path / "museum", tiny_family(family)
    if family == "sd1":
        result = run_cli("init", str(folder), "--base", str(single_file(family)), "--config", str(config))
        assert result.returncode == 0, result.stderr
    else:
        Museum.init(folder, base=single_file(family), config=config)
    m = Museum.open(folder)
    assert m.manifest.base_path == str((folder / "base").resolve())  # saved once as a pipeline folder
    assert json.loads((folder / "base" / "model_index.json").read_text())["_class_name"] == pipeline
    base = load_pipeline(folder / "base")
    assert base.scheduler.config.prediction_type == kind
    ref_pipe = load_pipeline(config)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(ref_pipe, name, None) is not None:
            ours, ref = getattr(base, name).state_dict(), getattr(ref_pipe, name).state_dict()
            assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), name
    # the same weights as the folder the file was written from: the same images
    ours = m.generate("a red circle on a sand background", n=1, steps=2)[0]
    ref = generate_images(ref_pipe, ["a red circle on a sand background"], seeds=[0], steps=2)[0]
    assert np.array_equal(np.asarray(ours), np.asarray(ref))
    m.learn("sunburst", concept_images["sunburst"][0], method="textual-inversion", class_word="circle", steps=2,
            progress=False)
    assert [c.name for c in Museum.open(folder).concepts] == ["sunburst"]


def test_single_file_errors_say_what_to_do(single_files, tiny_base, tmp_path):
    with pytest.raises(BaseModelError, match=r"pickle checkpoint.*--allow-pickle"):
        Museum.init(tmp_path / "a", base=single_files["ckpt"], config=tiny_base)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    m = Museum.init(tmp_path / "b", base=single_files["ckpt"], config=tiny_base, allow_pickle=True)
    assert (tmp_path / "b" / "base" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert m.manifest.base_hash
    # without --config, diffusers' configs for the family would have to come from the hub: refused offline
    with pytest.raises(BaseModelError, match=r"not in the local Hugging Face cache.*--config FOLDER"):
        Museum.init(tmp_path / "c", base=single_files["safetensors"])
    missing = tmp_path / "nowhere" / "sd15.safetensors"
    with pytest.raises(BaseModelError, match=rf"{missing}.*does not exist.*never downloads"):
        Museum.init(tmp_path / "d", base=missing, config=tiny_base)


def test_single_file_of_another_family_than_its_config_is_refused(single_file, tiny_family, tmp_path):
    """An SDXL file (conditioner.embedders.*) with an SD-1/2 --config, or an SD-2 file with an SDXL one, is refused
    by name from the file's key layout before diffusers reads a weight; SD-1 vs SD-2 mismatches get diffusers'
    shape error, wrapped to name --config."""
    cases = [("sdxl", "sd1", r"is an SDXL checkpoint.*conditioner\.embedders.*StableDiffusionPipeline folder.*"
                             r"--config FOLDER.*a StableDiffusionXLPipeline"),
             ("sd2", "sdxl", r"is an SD-2\.x checkpoint.*cond_stage_model.*StableDiffusionXLPipeline folder.*"
                             r"--config FOLDER.*a StableDiffusionPipeline"),
             ("sd2", "sd1", r"could not read .* as a StableDiffusionPipeline.*is --config the same architecture")]
    for i, (family, config, message) in enumerate(cases):
        with pytest.raises(BaseModelError, match=message):
            Museum.init(tmp_path / f"m{i}", base=single_file(family), config=tiny_family(config))
        assert not (tmp_path / f"m{i}").exists()


def test_missing_model_offline_names_the_path(tmp_path):
    missing = tmp_path / "models" / "sd-1-5"
    result = run_cli("init", str(tmp_path / "m"), "--base", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "m").exists()


def test_hub_id_offline_is_a_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([sys.executable, "-m", "museum", "init", str(tmp_path / "m"), "--base",
                             "someone/no-such-model"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert "'someone/no-such-model'" in result.stderr and "nor in the local Hugging Face cache" in result.stderr
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- GPU practice options


def _learn(pipe, images, method="finetune", **options):
    m = get_method(method, steps=3, batch_size=2, lr=2e-2)
    return train_concept(pipe, m, ConceptInfo("sunburst", "<sunburst>", "circle", False), images, progress=False,
                         options=TrainOptions(**options))


def test_gradient_checkpointing_recomputes_and_learns_the_same(tiny_base, concept_images, monkeypatch):
    images = concept_images["sunburst"][1].train_images
    plain = _learn(load_pipeline(tiny_base), images)
    calls = []
    original = cp.checkpoint
    monkeypatch.setattr(cp, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    pipe = load_pipeline(tiny_base)
    ckpt = _learn(pipe, images, gradient_checkpointing=True)
    assert calls  # the UNet's blocks were recomputed in backward
    assert not pipe.unet.is_gradient_checkpointing  # switched off again after training
    for key, value in plain.state.items():
        assert torch.allclose(value, ckpt.state[key], atol=1e-5), key


def test_bf16_autocast_on_cpu_keeps_trainable_parameters_fp32(tiny_base, concept_images, tmp_path):
    """bf16 runs in its own process (accelerate fixes mixed precision per process): the CLI prints the note and
    the memory estimate, trains, and stores fp32 tensors close to an fp32 run's (run here, in-process)."""
    runs = {}
    for precision in ("no", "bf16"):
        folder = tmp_path / precision
        if precision == "no":
            m = Museum.init(folder, base=tiny_base)
            lines = []
            m.learn("sunburst", concept_images["sunburst"][0], class_word="circle", method="finetune", steps=3,
                    batch_size=2, progress=False, echo=lines.append)
            stderr = "\n".join(lines)
        else:
            assert run_cli("init", str(folder), "--base", str(tiny_base)).returncode == 0
            result = run_cli("learn", str(folder), "sunburst", "--images", str(concept_images["sunburst"][0]),
                             "--class-word", "circle", "--method", "finetune", "--steps", "3", "--mixed-precision",
                             precision, "--set", "batch_size=2", "--device", "cpu")
            assert result.returncode == 0, result.stderr
            stderr = result.stderr
        assert "no GPU found: training on CPU in " + ("bf16 autocast" if precision == "bf16" else "fp32") in stderr
        assert "memory estimate on cpu (an estimate, not a measurement)" in stderr
        state = Museum.open(folder).manifest.state["finetune"]["file"]
        runs[precision] = load_file(folder / state)
    assert all(v.dtype == torch.float32 for v in runs["bf16"].values())
    assert any(not torch.equal(runs["no"][k], runs["bf16"][k]) for k in runs["no"])  # bf16 did compute differently
    for k, v in runs["no"].items():  # the LoRA's B starts at 0: bf16 moved it where fp32 did, to ~25%
        assert float((v - runs["bf16"][k]).norm()) <= 0.25 * float(v.norm()) + 1e-6, k


def test_gpu_options_refused_clearly_on_this_machine(tiny_base, concept_images, tmp_path):
    folder = tmp_path / "m"
    m = Museum.init(folder, base=tiny_base)
    fp16 = run_cli("learn", str(folder), "sunburst", "--images", str(concept_images["sunburst"][0]), "--class-word",
                   "circle", "--steps", "2", "--mixed-precision", "fp16")
    assert fp16.returncode == 2 and "fp16 needs a GPU" in fp16.stderr and "bf16" in fp16.stderr
    learn = lambda **kw: m.learn("sunburst", concept_images["sunburst"][0], class_word="circle", steps=2,  # noqa: E731
                                 progress=False, **kw)
    try:
        import bitsandbytes  # noqa: F401
        message = "needs a CUDA GPU"
    except ImportError:
        message = "pip install bitsandbytes"
    with pytest.raises(MuseumError, match=message):
        learn(options=TrainOptions(use_8bit_adam=True))
    if not torch.cuda.is_available():
        with pytest.raises(MuseumError, match="no CUDA GPU is visible"):
            learn(device="cuda")
    with pytest.raises(MuseumError, match="not a device"):
        learn(device="gpu-please")
    with pytest.raises(ValueError, match=r"no setting\(s\) \['nonsense'\]"):
        learn(nonsense=1)
    assert Museum.open(folder).concepts == []  # nothing was learned by a refused run


def test_memory_estimate_counts_what_trains(tiny_base):
    pipe = load_pipeline(tiny_base)
    lora = [p for n, p in pipe.unet.named_parameters() if "attn2.to_k" in n]
    everything = list(pipe.unet.parameters())
    small, big = memory.estimate(pipe, lora, 2), memory.estimate(pipe, everything, 2)
    n = sum(p.numel() for p in everything)
    assert big.trainable == big.gradients == 4 * n and big.optimizer == 8 * n
    assert small.trainable < big.trainable and small.activations == big.activations
    assert memory.estimate(pipe, everything, 2, adam_8bit=True).optimizer == 2 * n
    assert memory.estimate(pipe, everything, 4).activations == 2 * big.activations
    assert memory.estimate(pipe, everything, 2, mixed_precision="bf16").activations == big.activations // 2
    assert memory.estimate(pipe, everything, 2, checkpointing=True).activations < big.activations


def test_sd_size_bases_get_the_papers_defaults(tiny_base, concept_images, tmp_path, monkeypatch):
    """Defaults follow the base family (the papers' SD settings on SD-1.x/2.x/XL), and overrides win."""
    assert family_of({"cross_attention_dim": 768}) == "sd1"
    assert family_of({"cross_attention_dim": 1024}) == "sd2"
    assert family_of({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}) == "sdxl"
    assert family_of({"cross_attention_dim": 16}) == "small"
    m = Museum.init(tmp_path / "m", base=tiny_base)
    assert m.family == "small"
    monkeypatch.setattr(Museum, "family", property(lambda self: "sd1"))  # as if the base were SD-1.5
    c = m.learn("sunburst", concept_images["sunburst"][0], method="textual-inversion", class_word="circle",
                steps=2, progress=False)
    sd = TextualInversionConfig.SD15
    assert c.info["config"]["steps"] == 2  # the override
    assert c.info["config"]["batch_size"] == sd["batch_size"] and c.info["config"]["token_lr"] == sd["token_lr"]

    shown = run_cli("methods").stdout  # `museum methods` shows both sets of defaults
    block = shown[shown.index("textual-inversion:"):]
    assert f"on SD-1.x/2.x/XL bases: {sd}" in block
    assert "perfusion:" in shown and "(not on SDXL yet)" not in shown  # every method runs on SDXL


# --------------------------------------------------------------------------- several processes


def test_two_processes_learn_what_one_does(tiny_base, concept_images, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (torchrun, gloo): each process trains on half
    of the same global batch and gradients are averaged, so the concept equals the one-process run's."""
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate command is not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    learn = ["learn", "sunburst", "--images", str(concept_images["sunburst"][0]), "--class-word", "circle",
             "--method", "c-lora", "--steps", "6", "--set", "batch_size=4"]
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "museum"]
    runs = {}
    for procs, command in ((1, [sys.executable, "-m", "museum"]), (2, launch)):
        folder = tmp_path / f"p{procs}"
        subprocess.run([sys.executable, "-m", "museum", "init", str(folder), "--base", str(tiny_base)], check=True,
                       capture_output=True, env=env)
        result = subprocess.run(command + [learn[0], str(folder)] + learn[1:], capture_output=True, text=True,
                                env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert ("data parallel: 2 processes x 2 samples = global batch 4" in result.stderr) == (procs == 2)
        assert result.stdout.count("learned sunburst") == 1  # only the main process commits and reports
        runs[procs] = load_file(folder / "concepts" / "000-sunburst" / "tensors.safetensors")
    assert runs[1].keys() == runs[2].keys()
    for key, one in runs[1].items():
        assert float((one - runs[2][key]).norm()) <= 1e-4 * float(one.norm()) + 1e-7, key
    # a failure before training (the name is taken) stops every process with the error, none waits forever
    again = subprocess.run(launch + [learn[0], str(tmp_path / "p2")] + learn[1:], capture_output=True, text=True,
                           env=env, timeout=300)
    assert again.returncode != 0 and "already has a concept 'sunburst'" in again.stderr


# --------------------------------------------------------------------------- SDXL


def test_perfusion_on_sdxl_reads_both_encoders(tiny_family, concept_images, tmp_path):
    """Perfusion on SDXL: C, i* and the key lock live in the cross-attention input (both encoders' outputs
    concatenated), i_super is the class word in both encoders, and a prompt without the token draws the base."""
    base = tiny_family("sdxl")
    m = Museum.init(tmp_path / "m", base=base)
    m.learn("sunburst", concept_images["sunburst"][0], method="perfusion", class_word="circle", steps=2,
            progress=False)
    pipe, stored = m.pipe, m.collection.tensors["sunburst"]
    width = pipe.unet.config.cross_attention_dim
    assert width == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert stored["perfusion.i_star"].shape == (width,)
    cov = perfusion.text_covariance(pipe, perfusion.corpus(perfusion.PerfusionConfig(cov_captions=64)))
    assert cov.shape == (width, width) and torch.allclose(cov, cov.T)
    # key-locking: o*_K is W_K i_super with i_super encoded from "circle" in both encoders
    fresh = load_pipeline(base)
    i_super = objectives.encode_prompts(fresh, ["a circle circle"])[0, 2].detach()
    layer = next(k.removeprefix("perfusion.o_k.") for k in stored if k.startswith("perfusion.o_k."))
    assert torch.allclose(stored[f"perfusion.o_k.{layer}"], pipe.unet.get_submodule(layer).to_k(i_super), atol=1e-5)
    plain = "a circle on a sand background"
    base_image = np.asarray(Museum.init(tmp_path / "empty", base=base).generate(plain, n=1, steps=2, seed=3)[0])
    assert np.array_equal(np.asarray(m.generate(plain, n=1, steps=2, seed=3)[0]), base_image)


def test_sdxl_token_trains_in_both_text_encoders(tiny_family, concept_images, tmp_path):
    """On SDXL a concept's token is added to both tokenizers; both embeddings train and are stored, reload
    into both encoders, and the UNet gets SDXL's added conditioning (pooled text, time ids) in training."""
    base = tiny_family("sdxl")
    m = Museum.init(tmp_path / "m", base=base)
    lines = []
    c = m.learn("sunburst", concept_images["sunburst"][0], method="textual-inversion", class_word="circle",
                steps=3, token_lr=0.5, progress=False, echo=lines.append)
    assert any("memory estimate" in line for line in lines)
    stored = m.collection.tensors["sunburst"]
    fresh = load_pipeline(base)
    for which, key in enumerate(("<sunburst>", "<sunburst>" + tokens.SECOND)):
        start = tokens.word_vector(fresh, "circle", which)
        assert stored[key].shape == (1, start.shape[0])
        assert not torch.allclose(stored[key][0], start)  # trained away from the class word
    reopened = Museum.open(tmp_path / "m")
    pipe = reopened.pipe
    for which, key in enumerate(("<sunburst>", "<sunburst>" + tokens.SECOND)):
        assert torch.equal(tokens.token_vector(pipe, "<sunburst>", which), stored[key][0])
    assert len(reopened.generate(f"a {c.phrase} on a sand background", n=1, steps=2)) == 1

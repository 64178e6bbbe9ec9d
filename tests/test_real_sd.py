"""Real Stable Diffusion families (issue 8): what differs from the embedded model's path.

The per-method matrix on SD-1.x and SD-2.x pipelines lives in test_method_matrix.py; this file
checks the family-specific pieces: the v-prediction target, single-file checkpoints, offline errors
and the GPU-practice options."""

import numpy as np
import pytest
import torch

from museum.base.loading import load_pipeline
from museum.methods.base import ConceptInfo, get_method
from museum.training import objectives, trainer
from museum.training.trainer import train_concept


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
    from ldm_checkpoint import write_ldm_checkpoint

    root = tmp_path_factory.mktemp("single")
    pipe = load_pipeline(tiny_base)
    return {s: write_ldm_checkpoint(pipe, root / f"tiny-sd1.{s}") for s in ("safetensors", "ckpt")}


def test_init_from_a_single_file_checkpoint(single_files, tiny_base, concept_images, tmp_path):
    from museum.museum import Museum

    from conftest import run_cli

    folder = tmp_path / "museum"
    result = run_cli("init", str(folder), "--base", str(single_files["safetensors"]), "--config", str(tiny_base))
    assert result.returncode == 0, result.stderr
    m = Museum.open(folder)
    assert m.manifest.base_path == str((folder / "base").resolve())  # saved once as a pipeline folder
    # the same weights as the folder the file was written from: the same images
    ours = m.generate("a red circle on a sand background", n=1, steps=3)[0]
    from museum.generation.sampling import generate_images

    ref = generate_images(load_pipeline(tiny_base), ["a red circle on a sand background"], seeds=[0], steps=3)[0]
    assert np.array_equal(np.asarray(ours), np.asarray(ref))
    m.learn("sunburst", concept_images["sunburst"][0], method="textual-inversion", class_word="circle", steps=2,
            progress=False)
    assert [c.name for c in Museum.open(folder).concepts] == ["sunburst"]


def test_single_file_errors_say_what_to_do(single_files, tiny_base, tmp_path):
    from museum.errors import BaseModelError
    from museum.museum import Museum

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


def test_missing_model_offline_names_the_path(tmp_path):
    from conftest import run_cli

    missing = tmp_path / "models" / "sd-1-5"
    result = run_cli("init", str(tmp_path / "m"), "--base", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "m").exists()


def test_hub_id_offline_is_a_clear_error(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([sys.executable, "-m", "museum", "init", str(tmp_path / "m"), "--base",
                             "someone/no-such-model"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert "'someone/no-such-model'" in result.stderr and "nor in the local Hugging Face cache" in result.stderr
    assert not (tmp_path / "m").exists()

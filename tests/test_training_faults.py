"""Numerical faults while learning (issue 9): a NaN or infinite loss, a diverging learning rate and a loss that
rises far above its start stop training with a clear error and leave the museum as it was; --resume refuses a
checkpoint made by another run."""

from __future__ import annotations

import pytest
import torch

import museum.training.trainer as trainer
from conftest import interrupted_learning, museum_snapshot
from museum.errors import MuseumError, TrainingDivergedError
from museum.museum import Museum

# ----------------------------------------------------------------------------- numerical faults


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_loss_stops_training(one_concept_museum, concept_images, monkeypatch, value):
    real = trainer.denoising_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        if not torch.is_grad_enabled():  # the starting model's loss, measured before the first step
            return loss
        calls["n"] += 1
        return loss * value if calls["n"] == 5 else loss

    monkeypatch.setattr(trainer, "denoising_loss", poisoned)
    before = museum_snapshot(one_concept_museum.folder)
    with pytest.raises(TrainingDivergedError, match=r"loss became (nan|inf) at step 5 .*nothing was saved.*Lower the"):
        one_concept_museum.learn("checker", concept_images["checker"][0], method="c-lora", class_word="square", steps=8,
                     checkpoint_every=2, progress=False)
    assert museum_snapshot(one_concept_museum.folder) == before  # no concept, and no checkpoint to resume a diverged run from
    assert not (one_concept_museum.folder / "work" / "checker").exists()


@pytest.mark.parametrize("method, settings, message", [
    ("textual-inversion", dict(token_lr=1e3), "token embedding grew"),  # the loss stays finite: the size is caught
    ("c-lora", dict(lr=1e4, token_lr=1e-3), "trained tensor of shape"),
    ("custom-diffusion", dict(lr=1e3, token_lr=0.0, num_class_images=2), "trained tensor of shape"),
])
def test_diverging_learning_rate_is_caught(one_concept_museum, concept_images, method, settings, message):
    before = museum_snapshot(one_concept_museum.folder)
    with pytest.raises(TrainingDivergedError, match=f"training diverged at step .*{message}.*Lower the learning rate"):
        one_concept_museum.learn("checker", concept_images["checker"][0], method=method, class_word="square", steps=20,
                     progress=False, **settings)
    after = {k: v for k, v in museum_snapshot(one_concept_museum.folder).items() if not k.startswith("cache")}
    assert after == before
    m = Museum.open(one_concept_museum.folder)
    assert [c.name for c in m.concepts] == ["sunburst"]
    m.learn("checker", concept_images["checker"][0], method=method, class_word="square", steps=4, progress=False,
            **{k: v for k, v in settings.items() if k == "num_class_images"})  # sane settings learn


def test_loss_that_rises_far_above_the_start_is_caught(one_concept_museum, concept_images, monkeypatch):
    real = trainer.denoising_loss
    calls = {"n": 0}

    def rising(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()
        return real(*args, **kwargs) * (50.0 if calls["n"] > 10 else 1.0)

    monkeypatch.setattr(trainer, "denoising_loss", rising)
    before = museum_snapshot(one_concept_museum.folder)
    with pytest.raises(TrainingDivergedError, match=r"step 11 .*denoising loss rose to .* from the starting model's"):
        one_concept_museum.learn("checker", concept_images["checker"][0], method="textual-inversion", class_word="square",
                     steps=30, progress=False)
    assert museum_snapshot(one_concept_museum.folder) == before



def test_resume_refuses_a_checkpoint_of_another_run(one_concept_museum, concept_images):
    """--resume continues only the run that made the checkpoint (same settings, images, earlier concepts)."""
    kw = dict(method="c-lora", class_word="square", progress=False, checkpoint_every=2)
    with interrupted_learning(5), pytest.raises(KeyboardInterrupt):
        one_concept_museum.learn("checker", concept_images["checker"][0], steps=8, **kw)
    m = Museum.open(one_concept_museum.folder)
    with pytest.raises(MuseumError, match="cannot resume: the checkpoint .* different config"):
        m.learn("checker", concept_images["checker"][0], steps=10, resume=True, **kw)
    with pytest.raises(MuseumError, match="different images"):
        m.learn("checker", concept_images["neon"][0], steps=8, resume=True, **kw)
    assert (one_concept_museum.folder / "work" / "checker" / "checkpoint-4").is_dir()  # refusing kept it
    with pytest.warns(UserWarning, match="discarding the checkpoints"):
        m.learn("checker", concept_images["neon"][0], steps=8, **kw)  # without --resume: start over
    assert [c.name for c in Museum.open(one_concept_museum.folder).concepts] == ["sunburst", "checker"]
    assert not (one_concept_museum.folder / "work").exists() or not any((one_concept_museum.folder / "work").iterdir())

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

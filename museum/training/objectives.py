"""The objective pieces every method shares: prompts, text encoding and the denoising loss.

    L_diff = E ||mask * (target - eps_theta(x_t, t, c))||^2      (Rombach et al. 2022, eq. 2)

where the target is the noise (epsilon prediction) or the velocity (v-prediction, SD 2.x).
"""

from __future__ import annotations

import torch

OBJECT_TEMPLATE = "a {}"
STYLE_TEMPLATE = "{} style"


def concept_prompt(method, concept) -> str:
    """The training prompt of a concept: \"a <tok> circle\" for objects, \"<tok> style\" for styles."""
    return (STYLE_TEMPLATE if concept.is_style else OBJECT_TEMPLATE).format(method.phrase(concept))


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]


def diffusion_target(scheduler, latents, noise, t):
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return noise


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the valid region (mask broadcast over channels)."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    mask = mask.expand_as(err)
    return (err * mask).sum() / mask.sum().clamp(min=1.0)

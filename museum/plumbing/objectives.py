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


def encode_prompts(pipe, prompts: list[str], pooled: bool = False):
    """The UNet's cross-attention input for ``prompts`` (with gradients). On SDXL it is the pipeline's own
    ``encode_prompt`` (both encoders' penultimate states, concatenated); ``pooled=True`` also returns the
    second encoder's pooled projection that SDXL's UNet takes as ``text_embeds`` (None on SD-1.x/2.x)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        embeds, _, pooled_embeds, _ = pipe.encode_prompt(list(prompts), device=pipe.text_encoder_2.device,
                                                         num_images_per_prompt=1, do_classifier_free_guidance=False)
        return (embeds, pooled_embeds) if pooled else embeds
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    embeds = pipe.text_encoder(ids)[0]
    return (embeds, None) if pooled else embeds


class SDXLConditioning:
    """SDXL's UNet also takes ``added_cond_kwargs`` (pooled text embedding, size/crop time ids). While
    installed, a forward pre-hook gives every UNet call that passes none (the training loop's, the
    methods' extra passes, a teacher copied from it) the pooled embedding of the concept's training
    prompt, refreshed each step, and the time ids of an uncropped image at the training resolution."""

    def __init__(self, pipe, resolution: int):
        self.pooled = None
        self.time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        self.handle = pipe.unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if kwargs.get("added_cond_kwargs") is None and self.pooled is not None:
            sample = args[0] if args else kwargs["sample"]
            n = sample.shape[0]
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled.to(sample.device, sample.dtype).expand(n, -1),
                "time_ids": self.time_ids.to(sample.device, sample.dtype).expand(n, -1)}
        return args, kwargs

    def remove(self) -> None:
        self.handle.remove()


def diffusion_target(scheduler, latents, noise, t):
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return noise


def noisy_batch(latents, scheduler, batch_size: int, generator: torch.Generator, device, dtype) -> dict:
    """A training batch of the task's images: ``x0`` (sampled latents), ``mask``, ``noise``, timesteps ``t``
    and ``noisy`` = x_t. The training loop draws its batches with it; methods use it for extra passes over
    the task's data (e.g. EWC's Fisher estimate at the end of a task). Random draws come from ``generator``."""
    idx = torch.randint(0, len(latents), (batch_size,), generator=generator)
    x0, mask = latents.sample(idx, generator)
    x0, mask = x0.to(device, dtype), mask.to(device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator).to(device)
    return dict(x0=x0, mask=mask, noise=noise, t=t, noisy=scheduler.add_noise(x0, noise, t))


def predicted_x0(scheduler, noisy: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean latent the model's prediction implies, x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    (or sqrt(a_t) x_t - sqrt(1 - a_t) v for v-prediction)."""
    a = scheduler.alphas_cumprod.to(noisy.device)[t].float().view(-1, *([1] * (noisy.dim() - 1)))
    if scheduler.config.prediction_type == "v_prediction":
        return a.sqrt() * noisy.float() - (1 - a).sqrt() * pred.float()
    return (noisy.float() - (1 - a).sqrt() * pred.float()) / a.sqrt()


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                   valid: float | None = None) -> torch.Tensor:
    """Mean squared error over the valid region (mask broadcast over channels). ``valid``: the number of
    valid values to divide by, when this is one process's share of a larger batch (data parallel: the
    mean over processes is then exactly the global batch's loss)."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    mask = mask.expand_as(err)
    return (err * mask).sum() / (mask.sum().clamp(min=1.0) if valid is None else max(valid, 1.0))

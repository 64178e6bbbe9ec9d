"""Elastic weight consolidation (Kirkpatrick et al., PNAS 2017) on the shared K/V LoRA.

The same parameterisation as ``finetune`` (one LoRA on cross-attention K/V that every task
continues, a new token per concept), plus a quadratic penalty that holds each LoRA parameter
near its value before the task, weighted by how much earlier tasks' losses depend on it:

    L = L_diff + (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2                   (eq. 3)

theta are the LoRA factors A, B of every K/V projection, theta* their values at the end of the
previous task. F is the diagonal Fisher information, estimated at the end of each task as the
mean squared gradient of the task's own denoising loss over ``fisher_samples`` single-sample
draws (x0 from the task's augmented latents, one noise and one timestep each; the empirical
Fisher), and accumulated over tasks in the museum state, F <- fisher_decay * F + F_task (online
EWC, Schwarz et al. 2018, with one anchor theta*; fisher_decay = 1 sums the tasks' Fishers, the
penalty of eq. 3 summed over earlier tasks up to where the anchors differ).

Museum state: the LoRA factors and ``fisher/{module}.lora_A`` / ``fisher/{module}.lora_B``.
Deviation: the Fisher is that of the mean-squared denoising loss, not of a normalised
likelihood, so lambda absorbs the noise variance and the element count; it is tuned on the
embedded model (docs/METHODS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from museum.methods.base import ConceptCost, TrainContext, register
from museum.methods.lora import LoRAConfig, SharedLoRAMethod
from museum.plumbing import kv
from museum.plumbing.objectives import denoising_loss, diffusion_target, encode_prompts, noisy_batch

FISHER = "fisher/"


@dataclass
class EWCConfig(LoRAConfig):
    ewc_weight: float = 1e4  # lambda of eq. 3 (0 switches the penalty off); scale: see docs/METHODS.md
    fisher_samples: int = 32  # single-sample gradients averaged into each task's Fisher
    fisher_decay: float = 1.0  # F <- fisher_decay * F + F_task (1: sum over tasks)

    SD15 = dict(LoRAConfig.SD15, ewc_weight=1e4, fisher_samples=100)


@register
class EWC(SharedLoRAMethod):
    name = "ewc"
    config_class = EWCConfig

    @classmethod
    def cost(cls, kv, width, config) -> ConceptCost:  # a Fisher value per LoRA value; Fisher: forward + backward
        shared = super().cost(kv, width, config)
        return replace(shared, state_values=2 * shared.state_values,
                       once_forward_passes=config.get("fisher_samples", 0) * 3)

    def setup(self, ctx: TrainContext) -> list[dict]:
        groups = super().setup(ctx)
        self.fisher = {k.removeprefix(FISHER): v for k, v in ctx.state.items() if k.startswith(FISHER)}
        return groups

    def loss_terms(self, ctx: TrainContext, batch: dict) -> dict[str, torch.Tensor]:
        if not self.fisher or self.config.ewc_weight == 0:
            return {}
        params = kv.lora_parameters(ctx.pipe.unet, self.adapter)
        penalty = sum((self.fisher[k].to(p) * (p - self.start[k].to(p)) ** 2).sum() for k, p in params.items())
        return {"ewc": 0.5 * self.config.ewc_weight * penalty}

    def task_fisher(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher of this task's denoising loss at the trained parameters."""
        unet, sched = ctx.pipe.unet, ctx.noise_scheduler
        params = kv.lora_parameters(unet, self.adapter)
        names, tensors = list(params), list(params.values())
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
        gen = torch.Generator().manual_seed(self.config.seed * 7919 + 1)
        with torch.no_grad():
            text = encode_prompts(ctx.pipe, [ctx.prompt])
        n = self.config.fisher_samples
        for _ in range(n):
            b = noisy_batch(ctx.latents, sched, 1, gen, unet.device, unet.dtype)
            pred = unet(b["noisy"], b["t"], text).sample
            loss = denoising_loss(pred, diffusion_target(sched, b["x0"], b["noise"], b["t"]), b["mask"])
            for f, g in zip(fisher, torch.autograd.grad(loss, tensors)):
                f += g.float() ** 2 / n
        return dict(zip(names, fisher))

    def extra_state(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        new = self.task_fisher(ctx)
        total = {k: self.config.fisher_decay * self.fisher[k].float() + f if k in self.fisher else f
                 for k, f in new.items()}
        return {FISHER + k: v.cpu() for k, v in total.items()}

"""C-LoRA (Smith et al., TMLR 2024): a fresh LoRA per task with self-regularisation.

Task t trains (A_t, B_t) on top of the frozen earlier ones, W_t = W0 + sum_{t'<=t} B_t' A_t',
and penalises writing where earlier tasks wrote (METHODS.md sec. 3):

    L = L_diff + lambda * sum_layers || |sum_{t'<t} B_t' A_t'|  (hadamard)  B_t A_t ||_F^2

The accumulated delta is the sum of per-task products (never a product of sums). Tokens are
initialised at random and the class word is not in the prompt ("a <v3>"). Nothing is shared
state: the accumulated delta is recomputed from the concepts' own factors, so removing one
concept removes exactly its product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from museum.methods.base import ConceptCost, ConceptInfo, TrainContext, lora_values, register
from museum.methods.lora import LoRAConfig, LoRAMethod
from museum.plumbing import kv


@dataclass
class CLoRAConfig(LoRAConfig):
    reg_weight: float = 1e4  # lambda; scale depends on |Delta W| (METHODS.md), tuned on the embedded model

    SD15 = dict(LoRAConfig.SD15, reg_weight=1e8)


def accumulated_delta(concepts: list[ConceptInfo]) -> dict[str, torch.Tensor]:
    """sum_t (alpha_t / r_t) B_t A_t over the given C-LoRA concepts."""
    return kv.sum_deltas(*[kv.factor_deltas(c.tensors, LoRAMethod.concept_scale(c)) for c in concepts])


@register
class CLoRA(LoRAMethod):
    name = "c-lora"
    config_class = CLoRAConfig

    @classmethod
    def cost(cls, kv, width, config) -> ConceptCost:  # a fresh LoRA per concept
        lora, b = lora_values(kv, config.get("rank", 0)), config.get("batch_size", 1)
        return ConceptCost(lora + width, 0, lora + width, b, 0, added_values=lora, batch_samples=b)

    def setup(self, ctx: TrainContext) -> list[dict]:
        self.previous = accumulated_delta([c for c in ctx.earlier if c.method == self.name])
        with torch.no_grad():  # W0 + sum of earlier tasks; the trainer restores W0 afterwards
            modules = kv.kv_modules(ctx.pipe.unet)
            for name, delta in self.previous.items():
                modules[name].weight.add_(delta.to(modules[name].weight.dtype))
        return super().setup(ctx)

    def loss_terms(self, ctx: TrainContext, batch: dict) -> dict[str, torch.Tensor]:
        if not self.previous or self.config.reg_weight == 0:
            return {}
        live = kv.live_lora_deltas(ctx.pipe.unet, self.adapter)
        penalty = sum(((self.previous[n].abs() * live[n]) ** 2).sum() for n in live if n in self.previous)
        return {"self_regularisation": self.config.reg_weight * penalty}

    def finish(self, ctx: TrainContext):
        return self.factors(ctx), {}

    def kv_deltas(self, concepts: list[ConceptInfo], active, state, pipe):
        return accumulated_delta(concepts)

"""Shared base of the methods that learn a LoRA (Hu et al. 2021) on cross-attention K/V with peft.

``finetune``, ``c-lora`` and the continual baselines differ only in where the LoRA starts,
what it is regularised against and what is kept after a task; the adapter, its checkpoints
and its dense deltas ``(alpha / r) * B @ A`` live here once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from museum.methods import kv
from museum.methods.base import ConceptInfo, Method, MethodConfig, TrainContext


@dataclass
class LoRAConfig(MethodConfig):
    rank: int = 4
    alpha: float = 4.0
    lr: float = 2e-3
    token_lr: float = 5e-3
    token_init: str = "random"
    class_word_in_prompt: bool = False

    SD15 = dict(rank=16, alpha=16.0, lr=1e-4, token_lr=1e-3, steps=500, batch_size=2)


class LoRAMethod(Method):
    """A fresh (or continued) LoRA adapter on every K/V projection."""

    config_class = LoRAConfig
    export_format = "lora"
    adapter = "museum"

    @property
    def scale(self) -> float:
        return self.config.alpha / self.config.rank

    @staticmethod
    def concept_scale(concept: ConceptInfo) -> float:
        return concept.config["alpha"] / concept.config["rank"]

    def initial_factors(self, ctx: TrainContext) -> dict[str, torch.Tensor] | None:
        """LoRA factors to start from (None: peft's fresh initialisation, B = 0)."""
        return None

    def setup(self, ctx: TrainContext) -> list[dict]:
        params = kv.add_kv_lora(ctx.pipe.unet, self.adapter, self.config.rank, self.config.alpha)
        start = self.initial_factors(ctx)
        if start:
            kv.load_lora_factors(ctx.pipe.unet, self.adapter, start)
        return [{"params": params, "lr": self.config.lr}]

    def trainable_state(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        return kv.lora_factors(ctx.pipe.unet, self.adapter)

    def load_trainable_state(self, ctx: TrainContext, tensors: dict[str, torch.Tensor]) -> None:
        kv.load_lora_factors(ctx.pipe.unet, self.adapter, tensors)

    def factors(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        return kv.lora_factors(ctx.pipe.unet, self.adapter)

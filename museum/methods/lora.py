"""Shared base of the methods that learn a LoRA (Hu et al. 2021) on cross-attention K/V with peft.

``finetune``, ``c-lora`` and the continual baselines differ only in where the LoRA starts,
what it is regularised against and what is kept after a task; the adapter, its checkpoints
and its dense deltas ``(alpha / r) * B @ A`` live here once (:class:`LoRAMethod`). The methods
whose one LoRA is museum state that every task continues (``finetune``, ``ewc``, ``lwf``,
``museummaker``) share :class:`SharedLoRAMethod`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from museum.methods.base import ConceptCost, ConceptInfo, Method, MethodConfig, TrainContext, lora_values
from museum.plumbing import kv


@dataclass
class LoRAConfig(MethodConfig):
    rank: int = 4
    alpha: float = 4.0
    lr: float = 2e-4
    token_lr: float = 1e-3
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


class SharedLoRAMethod(LoRAMethod):
    """One LoRA, kept in the museum state, that every task of the method continues training.

    State layout: the adapter's factors under their module keys (``{module}.lora_A``,
    ``{module}.lora_B``; module names hold no "/"), plus whatever a subclass keeps across tasks
    under ``"{kind}/..."`` keys (e.g. EWC's ``fisher/{module}.lora_A``), returned by
    :meth:`extra_state`. At generation the LoRA is applied to every prompt naming one of the
    method's concepts; a prompt without one is drawn by the untouched base model.
    """

    removable = False
    removable_why = ("this method keeps one LoRA shared by every concept, so one concept's "
                     "contribution cannot be taken out; learn the rest again in a new museum")

    @classmethod
    def cost(cls, kv, width, config) -> ConceptCost:  # the token per concept; one shared LoRA in the museum state
        lora, b = lora_values(kv, config.get("rank", 0)), config.get("batch_size", 1)
        return ConceptCost(width, lora, lora + width, b, 0, added_values=lora, batch_samples=b)

    @staticmethod
    def lora_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The shared LoRA's factors in a state dict (the keys without a "/")."""
        return {k: v for k, v in state.items() if "/" not in k}

    def initial_factors(self, ctx: TrainContext):
        start = self.lora_state(ctx.state)
        ranks = {v.shape[0] for k, v in start.items() if k.endswith(".lora_A")}
        if ranks and ranks != {self.config.rank}:
            raise ValueError(f"this museum's {self.name} LoRA has rank {ranks.pop()}, the settings ask for rank "
                             f"{self.config.rank}: every task of {self.name} continues the same LoRA, so keep its rank")
        return start or None

    def setup(self, ctx: TrainContext) -> list[dict]:
        groups = super().setup(ctx)
        self.start = self.factors(ctx)  # the LoRA before this task (peft's initialisation, B = 0, on the first)
        return groups

    def start_deltas(self) -> dict[str, torch.Tensor]:
        """Dense deltas of the LoRA before this task (what earlier tasks wrote)."""
        return kv.factor_deltas(self.start, self.scale)

    def extra_state(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        """Tensors besides the LoRA factors to keep in the museum state (keys ``"kind/..."``)."""
        return {}

    def finish(self, ctx: TrainContext):
        return {}, {**self.factors(ctx), **self.extra_state(ctx)}

    def kv_deltas(self, concepts: list[ConceptInfo], active, state: dict[str, torch.Tensor], pipe):
        factors = self.lora_state(state)
        if not factors:
            return {}
        # the LoRA's scale is the one the latest task trained it with
        scale = self.concept_scale(concepts[-1]) if concepts and concepts[-1].config else self.scale
        return kv.factor_deltas(factors, scale)

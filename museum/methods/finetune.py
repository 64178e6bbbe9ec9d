"""Sequential fine-tuning: one LoRA on cross-attention K/V, trained on task after task, no regulariser.

The forgetting reference of every continual-learning table (METHODS.md, "Classic
baselines"): each task starts from the adapter the previous task left, so later concepts
overwrite earlier ones. Each concept keeps its own token; the adapter is museum state.
"""

from __future__ import annotations

import torch

from museum.methods import kv
from museum.methods.base import ConceptInfo, TrainContext, register
from museum.methods.lora import LoRAMethod


@register
class Finetune(LoRAMethod):
    name = "finetune"
    removable = False
    removable_why = ("sequential fine-tuning keeps one LoRA shared by every concept, so one concept's "
                     "contribution cannot be taken out; learn the rest again in a new museum")

    def initial_factors(self, ctx: TrainContext):
        return ctx.state or None

    def finish(self, ctx: TrainContext):
        return {}, self.factors(ctx)

    def kv_deltas(self, concepts: list[ConceptInfo], active, state: dict[str, torch.Tensor], pipe):
        return kv.factor_deltas(state, self.scale) if state else {}

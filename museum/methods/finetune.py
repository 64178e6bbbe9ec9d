"""Sequential fine-tuning: one LoRA on cross-attention K/V, trained on task after task, no regulariser.

The forgetting reference of every continual-learning table (METHODS.md, "Classic
baselines"): each task starts from the adapter the previous task left, so later concepts
overwrite earlier ones. Each concept keeps its own token; the adapter is museum state
(:class:`~museum.methods.lora.SharedLoRAMethod`, shared with ``ewc``, ``lwf`` and ``museummaker``).
Learned together (``joint``: one run over every concept's images), it is the multi-task oracle sequential
fine-tuning is measured against.
"""

from __future__ import annotations

from museum.methods.base import register
from museum.methods.lora import SharedLoRAMethod


@register
class Finetune(SharedLoRAMethod):
    name = "finetune"
    joint = True
    removable_why = ("sequential fine-tuning keeps one LoRA shared by every concept, so one concept's "
                     "contribution cannot be taken out; learn the rest again in a new museum")

"""Pieces the continual methods share (``ewc``, ``lwf``, ``museummaker``; METHODS.md sec. 5 and
"Classic baselines"): which earlier concepts a task must protect, prompts that name them, and
distillation against the frozen model from before the task (``TrainContext.teacher``).

All three continue one shared LoRA (:class:`~museum.methods.lora.SharedLoRAMethod`), so the
concepts a task can damage are the earlier concepts of the same method: concepts of other methods
are drawn without this LoRA.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from museum.methods.base import ConceptInfo, Method, TrainContext
from museum.training.objectives import encode_prompts


def earlier_concepts(method: Method, ctx: TrainContext) -> list[ConceptInfo]:
    """The concepts learned before this task with the same method (those the shared LoRA carries)."""
    return [c for c in ctx.earlier if c.method == method.name]


def varied_prompts(method: Method, concept: ConceptInfo, n: int, seed: int) -> list[str]:
    """``n`` prompts naming ``concept`` with varied content: generic captions of the world with the style
    added ("a blue circle on a grass background, <s> style") or the object put in ("a <v> on a sand background")."""
    from museum.world.render import base_samples, caption

    phrase = method.phrase(concept)
    scenes = [s for s, _ in base_samples(n, seed=seed)]
    if concept.is_style:
        return [f"{caption(s, drop=frozenset({'style'}))}, {phrase} style" for s in scenes]
    return [caption(s, object_phrase=phrase, drop=frozenset({"style"})) for s in scenes]


@torch.no_grad()
def encode_fixed(pipe, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Text conditioning of prompts whose tokens are frozen (earlier concepts, plain words), once."""
    return torch.cat([encode_prompts(pipe, prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])


@contextmanager
def cross_attention_outputs(unet) -> Iterator[list[torch.Tensor]]:
    """Collect the output of every cross-attention block (``attn2``) of the forward passes run inside."""
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _in, out: outputs.append(out))
               for name, m in unet.named_modules() if name.endswith("attn2")]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def output_distillation(unet, teacher, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """||eps_student(x_t, t, c) - eps_teacher(x_t, t, c)||^2 (mean over elements)."""
    with torch.no_grad():
        target = teacher(noisy, t, text).sample
    return F.mse_loss(unet(noisy, t, text).sample.float(), target.float())

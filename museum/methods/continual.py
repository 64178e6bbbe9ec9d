"""Pieces the continual methods share (``ewc``, ``lwf``, ``museummaker``; METHODS.md sec. 5 and
"Classic baselines"; ``lfs``): which earlier concepts a task must protect, prompts that name them, and
prompts of a concept's class word. Distillation against the frozen model from before the task
(``TrainContext.teacher``) lives in ``museum.methods.distill``.

All of them continue one shared LoRA (:class:`~museum.methods.lora.SharedLoRAMethod`), so the
concepts a task can damage are the earlier concepts of the same method: concepts of other methods
are drawn without this LoRA.
"""

from __future__ import annotations

import torch

from museum.methods.base import ConceptInfo, Method, TrainContext
from museum.plumbing.objectives import encode_prompts
from museum.world.render import SHAPES, base_samples, caption, replace


def earlier_concepts(method: Method, ctx: TrainContext) -> list[ConceptInfo]:
    """The concepts learned before this task with the same method (those the shared LoRA carries)."""
    return [c for c in ctx.earlier if c.method == method.name]


def varied_prompts(method: Method, concept: ConceptInfo, n: int, seed: int) -> list[str]:
    """``n`` prompts naming ``concept`` with varied content: generic captions of the world with the style
    added ("a blue circle on a grass background, <s> style") or the object put in ("a <v> on a sand background")."""
    phrase = method.phrase(concept)
    scenes = [s for s, _ in base_samples(n, seed=seed)]
    if concept.is_style:
        return [f"{caption(s, drop=frozenset({'style'}))}, {phrase} style" for s in scenes]
    return [caption(s, object_phrase=phrase, drop=frozenset({"style"})) for s in scenes]


def class_prompts(concept: ConceptInfo, n: int, seed: int) -> list[str]:
    """``n`` prompts of the concept's class without the concept: world captions whose object is the class word
    ("a large red circle on the left on a sand background"); for a word that is not a shape of the world,
    "a red dog on a sand background"; for a style, generic captions without a style part."""
    scenes = [s for s, _ in base_samples(n, seed=seed)]
    plain = frozenset({"style"})
    if concept.is_style:
        return [caption(s, drop=plain) for s in scenes]
    if concept.class_word in SHAPES:
        return [caption(replace(s, shape=concept.class_word), drop=plain) for s in scenes]
    return [caption(s, object_phrase=f"{s.colour} {concept.class_word}", drop=plain) for s in scenes]


@torch.no_grad()
def encode_fixed(pipe, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Text conditioning of prompts whose tokens are frozen (earlier concepts, plain words), once."""
    return torch.cat([encode_prompts(pipe, prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])

"""What a concept costs at a given model size: stored values per concept, trained values, and UNet passes per step.

The storage formulas follow what each method's ``finish`` returns (per-concept tensors) and keeps in the
museum state; tests/test_real_sd.py checks them against the files real runs write on a tiny pipeline, and
``scripts/gpu_estimates.py`` applies them to Stable Diffusion 1.5's layer shapes (docs/GPU.md).

``kv``: ``{module: (out, in)}`` of every cross-attention K/V projection; ``width``: the text encoder's
embedding width; ``config``: the method's settings (``MethodConfig.to_dict()``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ConceptCost:
    concept_values: int  # float32 values stored with each concept (token included)
    state_values: int  # float32 values the museum keeps for the method as a whole (shared LoRA, Fisher)
    trained_values: int  # values the optimizer updates (the token's row counted once, not the table)
    passes_per_step: float  # UNet sample passes (forward + backward of one sample) per training step
    once_forward_passes: float  # UNet forward-only sample passes done once per concept (class images, Fisher)


def _lora(kv: dict, rank: int) -> int:
    return sum(rank * (out + inp) for out, inp in kv.values())


def concept_cost(method: str, kv: dict[str, tuple[int, int]], width: int, config: dict) -> ConceptCost:
    b = config.get("batch_size", 1)
    rank = config.get("rank", 0)
    dense = sum(out * inp for out, inp in kv.values())
    if method == "textual-inversion":
        return ConceptCost(width, 0, width, b, 0)
    if method == "custom-diffusion":  # dense K/V deltas; the prior batch doubles the passes
        classes = config.get("num_class_images", 0) * 25 * 2  # 25 DDIM steps with classifier-free guidance
        return ConceptCost(dense + width, 0, dense + width, 2 * b if config.get("prior_weight", 1) else b, classes)
    if method == "c-lora":  # a fresh LoRA per concept
        return ConceptCost(_lora(kv, rank) + width, 0, _lora(kv, rank) + width, b, 0)
    if method == "perfusion":  # o*_K, o*_V per K/V output + i* and C^-1 i* (width each) + the token
        outs = sum(out for out, _ in kv.values())
        return ConceptCost(outs + 3 * width, 0, outs // 2 + width, b, 0)
    if method == "lfs":  # the shared LoRA (+ N x 128 ICGen context values per concept on the embedded model, not
        # counted: bases without a fitting adapter store none); the distillation adds a student and a teacher pass
        n = config.get("distill_batch", 0) if config.get("distill_weight", 0) else 0
        # the noise bank: teacher DDIM steps for each class prompt (and as many per earlier concept, not counted here)
        once = config.get("num_prompts", 0) * config.get("teacher_steps", 0) if n else 0
        return ConceptCost(width, _lora(kv, rank), _lora(kv, rank) + width, b + n * (1 + 1 / 3), once)
    if method in ("finetune", "lwf", "ewc", "museummaker"):  # one shared LoRA in the museum state
        state = _lora(kv, rank) * (2 if method == "ewc" else 1)  # EWC keeps a Fisher per LoRA value
        per_concept = width + (_lora(kv, 2 * rank) if method == "museummaker" else 0)  # its rank-2r task update
        n = config.get("distill_batch", 0)
        passes = {"finetune": b, "ewc": b, "lwf": b + n * (1 + 1 / 3), "museummaker": b + 2 * n + n / 3}[method]
        once = config.get("fisher_samples", 0) * 3 if method == "ewc" else 0  # Fisher: forward + backward each
        return ConceptCost(per_concept, state, _lora(kv, rank) + width, passes, once)
    raise ValueError(f"no cost model for method {method!r}")

"""A training memory estimate, printed before the first step (an estimate, not a measurement).

    total = weights of the pipeline (as loaded)
          + trainable parameters (fp32) + their gradients (fp32)
          + AdamW's two moments (fp32 each; 1 byte each with 8-bit Adam)
          + activations kept for the backward pass

Activations are counted on one forward pass of the UNet at batch 1 and the training latent size
(forward hooks on every leaf module, outputs summed), times the batch size, at 2 bytes per value
under mixed precision and 4 in fp32. With gradient checkpointing only the outputs of the UNet's
top-level blocks are kept, plus the largest block's internals while it is recomputed. Allocator
overhead, workspace buffers, the CUDA context (~0.5 GB) and the text encoder's activations are not
counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MemoryEstimate:
    weights: int
    trainable_params: int  # number of trainable values
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    batch_size: int
    precision: str
    checkpointing: bool

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.gradients + self.optimizer + self.activations

    def describe(self, device: str) -> str:
        g = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"  # noqa: E731
        return (f"memory estimate on {device} (an estimate, not a measurement): weights {g(self.weights)} + trainable "
                f"{self.trainable_params:,} values {g(self.trainable)} + gradients {g(self.gradients)} + optimizer "
                f"states {g(self.optimizer)} + activations ~{g(self.activations)} (batch {self.batch_size}, "
                f"{self.precision}{', gradient checkpointing' if self.checkpointing else ''}) = ~{g(self.total)}")


def _module_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


@torch.no_grad()
def activation_values(unet, latent_shape: tuple[int, int, int], text_shape: tuple[int, int],
                      checkpointing: bool = False) -> int:
    """Values a training forward keeps for backward at batch 1 (see the module docstring)."""
    leaves = [m for m in unet.modules() if not list(m.children())]
    counts: dict[int, int] = {}
    # the units checkpointing keeps the outputs of: top-level modules, each block of a ModuleList
    units = [b for c in unet.children() for b in (c if isinstance(c, torch.nn.ModuleList) else [c])]
    owner = {}  # leaf -> index of the unit it belongs to
    for i, unit in enumerate(units):
        for m in unit.modules():
            owner[id(m)] = i
    top_out: dict[int, int] = {}

    def numel(out) -> int:
        if isinstance(out, torch.Tensor):
            return out.numel()
        if isinstance(out, (tuple, list)):
            return sum(numel(o) for o in out)
        return sum(numel(v) for v in getattr(out, "__dict__", {}).values()) if hasattr(out, "sample") else 0

    def leaf_hook(module, args, out):
        i = owner.get(id(module), -1)
        counts[i] = counts.get(i, 0) + numel(out)

    handles = [m.register_forward_hook(leaf_hook) for m in leaves]
    for i, unit in enumerate(units):
        handles.append(unit.register_forward_hook(lambda m, a, o, i=i: top_out.__setitem__(i, top_out.get(i, 0) + numel(o))))
    try:
        p = next(unet.parameters())
        extra = {}
        if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 time ids
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(1, pooled, device=p.device, dtype=p.dtype),
                                           "time_ids": torch.zeros(1, 6, device=p.device, dtype=p.dtype)}}
        unet(torch.zeros(1, *latent_shape, device=p.device, dtype=p.dtype), torch.tensor([500], device=p.device),
             torch.zeros(1, *text_shape, device=p.device, dtype=p.dtype), **extra)
    finally:
        for h in handles:
            h.remove()
    if not checkpointing:
        return sum(counts.values())
    return sum(top_out.values()) + max(counts.values(), default=0)


def estimate(pipe, params: list[torch.Tensor], batch_size: int, *, mixed_precision: str = "no",
             checkpointing: bool = False, adam_8bit: bool = False) -> MemoryEstimate:
    unet = pipe.unet
    weights = sum(_module_bytes(m) for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None),
                                             pipe.vae) if m is not None)
    n = sum(p.numel() for p in params)
    size = unet.config.sample_size
    latent = (unet.config.in_channels, size, size)
    text = (pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    acts = activation_values(unet, latent, text, checkpointing)
    per_value = 2 if mixed_precision in ("fp16", "bf16") else 4
    return MemoryEstimate(weights=weights, trainable_params=n, trainable=4 * n, gradients=4 * n,
                          optimizer=(2 if adam_8bit else 8) * n, activations=acts * batch_size * per_value,
                          batch_size=batch_size, precision=mixed_precision if per_value == 2 else "fp32",
                          checkpointing=checkpointing)

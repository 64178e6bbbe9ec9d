"""Shared mechanics of the cross-attention key/value projections (``attn2.to_k``, ``attn2.to_v``).

Every weight-editing method in METHODS.md edits exactly these projections (Custom Diffusion
sec. 3.1, C-LoRA eq. 3, Perfusion eq. 4, MuseumMaker's shared LoRA). This module finds
them, adds and removes peft LoRA adapters on them, turns LoRA factors into dense deltas, and
applies a set of deltas to a UNet for the duration of a generation.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

KV_PATTERN = r".*attn2\.to_(k|v)"
_KV_RE = re.compile(r"(^|.*\.)attn2\.to_(k|v)$")


def kv_modules(unet: nn.Module) -> dict[str, nn.Linear]:
    """Module name -> the base ``nn.Linear`` of every cross-attention K/V projection."""
    out = {}
    for name, module in unet.named_modules():
        if _KV_RE.match(name):
            out[name] = getattr(module, "base_layer", module)
    if not out:
        raise ValueError("this UNet has no cross-attention K/V projections (attn2.to_k / attn2.to_v)")
    return out


def kv_weights(unet: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every K/V weight (W0)."""
    return {name: m.weight.detach().clone() for name, m in kv_modules(unet).items()}


@contextmanager
def applied_deltas(unet: nn.Module, deltas: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily set W = W0 + dW for the named K/V projections; W0 is restored bit-exactly."""
    modules = kv_modules(unet)
    unknown = set(deltas) - set(modules)
    if unknown:
        raise ValueError(f"deltas for modules this UNet does not have: {sorted(unknown)[:3]}; "
                         "was the concept learned on another base model?")
    saved = {}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                w = modules[name].weight
                if delta.shape != w.shape:
                    raise ValueError(f"delta for {name} has shape {tuple(delta.shape)}, the UNet's weight "
                                     f"{tuple(w.shape)}; the concept was learned on another base model")
                saved[name] = w.detach().clone()
                w.add_(delta.to(w))
        yield
    finally:
        with torch.no_grad():
            for name, w0 in saved.items():
                modules[name].weight.copy_(w0)


def sum_deltas(*delta_dicts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for deltas in delta_dicts:
        for name, d in deltas.items():
            total[name] = total[name] + d if name in total else d.clone()
    return total


# --------------------------------------------------------------------------- LoRA (peft)


def add_kv_lora(unet: nn.Module, adapter: str, rank: int, alpha: float) -> list[nn.Parameter]:
    """Add a peft LoRA adapter on every K/V projection; return its trainable parameters."""
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=KV_PATTERN, init_lora_weights="gaussian"),
                     adapter_name=adapter)
    unet.set_adapters([adapter])
    params = [p for n, p in unet.named_parameters() if f".{adapter}." in n and "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_parameters(unet: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """The live ``{module}.lora_A`` / ``{module}.lora_B`` parameters of one adapter (for per-parameter
    penalties such as EWC's, and gradients of them)."""
    out = {}
    for name, module in unet.named_modules():
        if _KV_RE.match(name) and hasattr(module, "lora_A") and adapter in module.lora_A:
            out[f"{name}.lora_A"] = module.lora_A[adapter].weight
            out[f"{name}.lora_B"] = module.lora_B[adapter].weight
    return out


def lora_factors(unet: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """``{module}.lora_A`` / ``{module}.lora_B`` tensors of one adapter (detached copies)."""
    return {k: p.detach().clone() for k, p in lora_parameters(unet, adapter).items()}


def live_lora_deltas(unet: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """Dense deltas scale * B @ A of an adapter being trained, with gradients."""
    out = {}
    for name, module in unet.named_modules():
        if _KV_RE.match(name) and hasattr(module, "lora_A") and adapter in module.lora_A:
            out[name] = module.scaling[adapter] * module.lora_B[adapter].weight @ module.lora_A[adapter].weight
    return out


def load_lora_factors(unet: nn.Module, adapter: str, factors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, module in unet.named_modules():
            if _KV_RE.match(name) and hasattr(module, "lora_A") and adapter in module.lora_A:
                module.lora_A[adapter].weight.copy_(factors[f"{name}.lora_A"])
                module.lora_B[adapter].weight.copy_(factors[f"{name}.lora_B"])


def factor_deltas(factors: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Dense deltas scale * B @ A from stored factors."""
    names = {k.removesuffix(".lora_A") for k in factors if k.endswith(".lora_A")}
    return {n: scale * factors[f"{n}.lora_B"].float() @ factors[f"{n}.lora_A"].float() for n in names}


def remove_loras(unet: nn.Module) -> None:
    """Remove every peft adapter, restoring plain ``nn.Linear`` projections."""
    if getattr(unet, "peft_config", None):
        unet.delete_adapters(list(unet.peft_config))

        for name, module in list(unet.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, BaseTunerLayer):
                    setattr(module, child_name, child.get_base_layer())
        unet._hf_peft_config_loaded = False
        unet.__dict__.pop("peft_config", None)

"""Export concepts in the formats plain diffusers loads.

A concept becomes

* ``learned_embeds.safetensors``: its token, ``{token: (1, D)}``, for ``pipe.load_textual_inversion``
  (SDXL: ``{"clip_l": (1, D1), "clip_g": (1, D2)}``, loaded into each text encoder);
* ``pytorch_lora_weights.safetensors`` (methods that change K/V): the exact K/V deltas the
  museum applies for a prompt naming the concept(s), written as one LoRA with its adapter
  metadata (``unet_lora_adapter_metadata``: without it diffusers does not know the LoRA's alpha when it
  reloads it, and its scale is lost), for ``pipe.load_lora_weights``. Dense deltas (Custom
  Diffusion, a C-LoRA stack, a closed-form merge) are factored exactly by SVD, keeping
  every singular value above 1e-6 of the largest;
* ``museum-{name}.safetensors`` (methods with ``export_format = "museum"``, e.g. Perfusion, whose
  effect is not a weight delta): the concept's stored tensors, token included, read by the
  method module's ``load_into(pipe, export_dir)``; ``museum_export.json`` then says
  ``needs_museum: true`` and names the loader;
* what a method's concepts need besides (``Method.export_extras``: e.g. ``lfs`` concepts that keep image
  context write ``ip_adapter_image_embeds.safetensors`` and the lines that load their IP-Adapter);
* ``museum_export.json``: what was exported and the lines that load it.

Loading the export in plain diffusers (plus Museum's loader where ``needs_museum``) gives the
image Museum gives (a test checks this).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from museum.methods.base import METHODS, get_method
from museum.models.loading import resolve_base
from museum.plumbing.kv import KV_PATTERN
from museum.plumbing.tokens import SECOND, is_sdxl
from museum.store.atomic import atomic_dir
from museum.store.faults import fault_point

LOAD_SNIPPET = """from diffusers import {cls}
pipe = {cls}.from_pretrained("{base}")
{loads}"""
#: an SDXL token: one file with both encoders' rows, loaded into each encoder (diffusers' SDXL layout)
SDXL_TOKEN_LOADS = """from safetensors.torch import load_file; emb = load_file("{file}")
pipe.load_textual_inversion(emb["clip_l"], token="{token}", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
pipe.load_textual_inversion(emb["clip_g"], token="{token}", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"""


def deltas_to_lora(deltas: dict[str, torch.Tensor], rel_tol: float = 1e-6) -> tuple[dict[str, torch.Tensor], int]:
    """Exact low-rank factors of dense deltas: (peft-style state dict, rank). Smaller ranks are zero-padded."""
    factors, rank = {}, 1
    for name, delta in deltas.items():
        u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
        r = max(1, int((s > s[0] * rel_tol).sum())) if s.numel() and s[0] > 0 else 1
        factors[name] = (u[:, :r] * s[:r].sqrt(), s[:r].sqrt()[:, None] * vh[:r])
        rank = max(rank, r)
    state = {}
    for name, (b, a) in factors.items():
        pad = rank - a.shape[0]
        state[f"{name}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        state[f"{name}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1).contiguous()
    return state, rank


def export_concepts(museum, names: list[str], out: Path) -> Path:
    """Export one concept, or several composed (their deltas as the museum combines them), to ``out``."""
    entries = [museum.manifest.concept(n) for n in names]
    pipe = museum.pipe  # loads and verifies every concept
    sdxl = is_sdxl(pipe)
    deltas = museum.deltas_for(entries)
    loads, museum_concepts, loaders = [], [], {}
    fault_point("export.begin")
    with atomic_dir(out) as tmp:
        infos = [museum.concept_info(e) for e in entries]
        for e, info in zip(entries, infos):
            file = "learned_embeds.safetensors" if len(entries) == 1 else f"learned_embeds-{e.name}.safetensors"
            if sdxl:  # diffusers' SDXL embedding layout
                save_file({"clip_l": info.tensors[e.token].contiguous(),
                           "clip_g": info.tensors[e.token + SECOND].contiguous()}, tmp / file)
            else:
                save_file({e.token: info.tensors[e.token].contiguous()}, tmp / file)
            method = get_method(e.method)
            if method.export_format == "museum":  # the method's own loader adds the token too
                own = f"museum-{e.name}.safetensors"
                save_file({k: v.contiguous() for k, v in info.tensors.items()}, tmp / own)
                loader = f"{type(method).__module__}:load_into"
                museum_concepts.append({"name": e.name, "token": e.token, "method": e.method, "file": own,
                                        "config": info.config, "loader": loader})
                loaders[loader] = None
            elif sdxl:
                loads.append(SDXL_TOKEN_LOADS.format(file=out / file, token=e.token))
            else:
                loads.append(f'pipe.load_textual_inversion("{out / file}", token="{e.token}")')
        fault_point("export.partial")
        lora_rank = None
        if deltas:
            state, lora_rank = deltas_to_lora(deltas)
            config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=KV_PATTERN)
            type(pipe).save_lora_weights(tmp, unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict())
            loads.append(f'pipe.load_lora_weights("{out}")')
        for loader in loaders:
            module, func = loader.split(":")
            loads.append(f'from {module} import {func}; {func}(pipe, "{out}")')
        extras = {}
        for name, cls in sorted(METHODS.items()):
            lines, fields = cls.export_extras([i for e, i in zip(entries, infos) if e.method == name], tmp, out)
            loads += lines
            extras.update(fields)
        base = str(resolve_base(museum.manifest.base_path))
        snippet = LOAD_SNIPPET.format(cls=type(pipe).__name__, base=base, loads="\n".join(loads))
        (tmp / "museum_export.json").write_text(json.dumps({
            "concepts": [{"name": e.name, "token": e.token, "method": e.method,
                          "phrase": museum.concept(e.name).phrase} for e in entries],
            "base": base, "base_hash": museum.manifest.base_hash, "lora_rank": lora_rank,
            "needs_museum": bool(museum_concepts), "museum_concepts": museum_concepts,
            **extras, "load_with_diffusers": snippet,
        }, indent=2))
    return out


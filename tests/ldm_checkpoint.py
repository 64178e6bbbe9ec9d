"""Write a diffusers Stable Diffusion 1.x pipeline as one original-layout (LDM) checkpoint file.

A test helper: the inverse of diffusers' own single-file conversion (``diffusers.loaders.single_file_utils``
``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` / ``convert_ldm_clip_checkpoint``), after
diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``, with its fixed SD-1.5 block counts
generalised to any block count and layers per block, so a tiny random pipeline becomes the kind of file
users download (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``).
Loading it back with ``from_single_file`` and getting the same images checks both directions.
"""

from __future__ import annotations

from pathlib import Path

import torch

RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
          ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    cfg = unet.config
    n, lpb = len(cfg.block_out_channels), cfg.layers_per_block
    top = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
           ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    layers = [("middle_block.1.", "mid_block.attentions.0.")] + [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.")
                                                                for j in range(2)]
    for i in range(n):
        for j in range(lpb):
            layers.append((f"input_blocks.{(lpb + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            layers.append((f"input_blocks.{(lpb + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(lpb + 1):
            layers.append((f"output_blocks.{(lpb + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            layers.append((f"output_blocks.{(lpb + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            layers.append((f"input_blocks.{(lpb + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            up_attn = "CrossAttn" in cfg.up_block_types[i]
            layers.append((f"output_blocks.{(lpb + 1) * i + lpb}.{2 if up_attn else 1}.", f"up_blocks.{i}.upsamplers.0."))
    out = {}
    for key, value in unet.state_dict().items():
        new = key
        for sd, hf in top:
            if new.startswith(hf):
                new = sd + new[len(hf):]
        if "resnets" in key:
            for sd, hf in RESNET:
                new = new.replace(f".{hf}.", f".{sd}.")
        for sd, hf in layers:
            new = new.replace(hf, sd)
        out[f"model.diffusion_model.{new}"] = value
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    cfg = vae.config
    n, lpb = len(cfg.block_out_channels), cfg.layers_per_block
    layers = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(n):
        for j in range(lpb):
            layers.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            layers.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            layers.append((f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(lpb + 1):
            layers.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        layers.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in vae.state_dict().items():
        new = key
        for sd, hf in layers:
            new = new.replace(hf, sd)
        if "attentions" in key:
            for sd, hf in attn:
                new = new.replace(hf, sd)
            if value.dim() == 2:  # the original VAE's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out[f"first_stage_model.{new}"] = value
    return out


def text_encoder_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    return {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
            for k, v in text_encoder.state_dict().items()}


def write_ldm_checkpoint(pipe, path: str | Path) -> Path:
    """All weights of an SD-1.x ``pipe`` in one LDM-layout file (.safetensors, or a pickle .ckpt)."""
    path = Path(path)
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **text_encoder_to_ldm(pipe.text_encoder)}
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save({"state_dict": state}, path)
    return path

"""Write a diffusers Stable Diffusion pipeline (1.x, 2.x or XL) as one original-layout (LDM/SGM) checkpoint file.

A test helper: the inverse of diffusers' own single-file conversion (``diffusers.loaders.single_file_utils``
``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` / ``convert_ldm_clip_checkpoint`` /
``convert_open_clip_checkpoint``), after diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``,
with its fixed block counts generalised to any block count and layers per block, so a tiny random pipeline
becomes the kind of file users download:

* SD-1.x: ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*`` (OpenAI CLIP);
* SD-2.x: the same UNet/VAE layout (linear transformer projections stay linear, as in SD-2's
  ``use_linear_in_transformer``), the text encoder as an OpenCLIP text tower under ``cond_stage_model.model.*``
  (``transformer.resblocks.N.attn.in_proj_*`` = q, k, v concatenated, ``ln_1``/``ln_2``, ``mlp.c_fc``/``c_proj``,
  ``token_embedding``, ``positional_embedding``, ``ln_final``, ``text_projection`` stored transposed);
* SDXL: the UNet with the added text/time embedding under ``label_emb.0.{0,2}``, the first text encoder
  (OpenAI CLIP) under ``conditioner.embedders.0.transformer.*``, the second (with projection) as OpenCLIP
  under ``conditioner.embedders.1.model.*``.

Layer counts: a real SD-2 file holds all 24 OpenCLIP blocks, but SD-2 conditions on the penultimate block
(then ``ln_final``), so diffusers' SD-2 text encoder has 23 layers and its conversion drops ``resblocks.23``
by name (``SD_2_TEXT_ENCODER_KEYS_TO_IGNORE``); any other extra block would be an unexpected key. So the file
holds exactly the encoder's ``num_hidden_layers`` blocks, which are all the pipeline uses. SDXL's second
encoder has as many layers as its OpenCLIP tower (the pipeline takes ``hidden_states[-2]`` itself), so there
the counts are the same. Loading a written file back with ``from_single_file`` and getting the same images
checks both directions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
          ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    cfg = unet.config
    n, lpb = len(cfg.block_out_channels), cfg.layers_per_block
    top = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
           ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
           ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]  # SDXL
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


def text_encoder_to_ldm(text_encoder, prefix: str = "cond_stage_model.transformer.") -> dict[str, torch.Tensor]:
    """An OpenAI CLIP text encoder in the original layout: the transformers keys under ``prefix``."""
    return {f"{prefix}text_model.{k.removeprefix('text_model.')}": v for k, v in text_encoder.state_dict().items()}


OPEN_CLIP_LAYER = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
                   ("attn.out_proj", "self_attn.out_proj")]


def text_encoder_to_open_clip(text_encoder, prefix: str = "cond_stage_model.model.") -> dict[str, torch.Tensor]:
    """A ``CLIPTextModel`` (SD-2) or ``CLIPTextModelWithProjection`` (SDXL's second encoder) as an OpenCLIP text
    tower under ``prefix``. Without a projection (SD-2, which never uses it) ``text_projection`` is the identity."""
    cfg = text_encoder.config
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    projection = state.pop("text_projection.weight", None)
    out = {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias"),
           # OpenCLIP applies x @ text_projection: the transpose of the Linear weight
           "text_projection": torch.eye(cfg.hidden_size) if projection is None else projection.T}
    for i in range(cfg.num_hidden_layers):
        hf, sd = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{sd}attn.in_proj_{kind}"] = torch.cat([state.pop(f"{hf}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for sd_name, hf_name in OPEN_CLIP_LAYER:
                out[f"{sd}{sd_name}.{kind}"] = state.pop(f"{hf}{hf_name}.{kind}")
    assert not state, f"text encoder weights with no OpenCLIP place: {sorted(state)}"
    return {prefix + k: v for k, v in out.items()}


def pipeline_family(pipe) -> str:
    """"sdxl" (two text encoders), "sd2" (an OpenCLIP-style text encoder: gelu, not OpenAI CLIP's quick_gelu)
    or "sd1"."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if pipe.text_encoder.config.hidden_act == "gelu" else "sd1"


def ldm_state_dict(pipe, family: str | None = None) -> dict[str, torch.Tensor]:
    """All weights of ``pipe`` in the original layout of its ``family`` (inferred when not given)."""
    family = family or pipeline_family(pipe)
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    if family == "sd1":
        state.update(text_encoder_to_ldm(pipe.text_encoder))
    elif family == "sd2":
        state.update(text_encoder_to_open_clip(pipe.text_encoder))
    elif family == "sdxl":
        state.update(text_encoder_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        state.update(text_encoder_to_open_clip(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    else:
        raise ValueError(f"unknown family {family!r}")
    return state


def write_ldm_checkpoint(pipe, path: str | Path, family: str | None = None) -> Path:
    """All weights of ``pipe`` in one original-layout file (.safetensors, or a pickle .ckpt)."""
    path = Path(path)
    state = {k: v.detach().contiguous().clone() for k, v in ldm_state_dict(pipe, family).items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state}, path)
    return path

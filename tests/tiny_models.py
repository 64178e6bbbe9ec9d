"""Tiny random Stable Diffusion pipelines for tests, built offline from configs.

The same construction as diffusers' own ``get_dummy_components`` tests, with the
rendered world's tokenizer; saved with ``save_pretrained`` so loading it exercises the
code path a real Stable Diffusion checkpoint goes through. One builder per base family:

* ``sd1``: Stable Diffusion 1.x: epsilon prediction, CLIP text encoder (quick_gelu),
  one attention head width for all blocks, convolutional transformer projections;
* ``sd2``: Stable Diffusion 2.x (768-v): v-prediction scheduler, OpenCLIP-style text encoder
  (gelu), per-block attention head dims, linear transformer projections
  (``use_linear_projection``) and attention upcast, as in SD-2.1's configs;
* ``sdxl``: Stable Diffusion XL: two text encoders and tokenizers (the second with a projection,
  whose pooled output conditions the UNet with the size/crop time ids, ``addition_embed_type=
  "text_time"``), cross-attention over both encoders' penultimate states concatenated.

And World v2's layout (``build_tiny_v2_pipeline``: 64x64 images, eight latent channels, its vocabulary) with a
64x64 evaluator (``tiny_v2_evaluator``), for the benchmark on the new world.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import (
    CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from museum.models import icgen
from museum.models.components import SD_SCHEDULER
from museum.models.evaluator import Evaluator
from museum.models.tokenizer import write_clip_tokenizer
from museum.models.v2 import components as v2
from museum.world.render import base_vocabulary
from museum.world.v2 import render as render_v2

FAMILIES = ("sd1", "sd2", "sdxl")


def build_tiny_pipeline(directory: str | Path, seed: int = 0, family: str = "sd1") -> Path:
    """Write a random tiny 32x32 pipeline (latent 4x8x8) of ``family`` to ``directory`` and return it."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    sd2 = family == "sd2"
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(base_vocabulary(), directory / "_tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu" if sd2 else "quick_gelu",
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=(2, 4) if sd2 else 2, norm_num_groups=4,
        use_linear_projection=sd2, upcast_attention=sd2,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(4, 8, 8), latent_channels=4,
        norm_num_groups=2, layers_per_block=1, sample_size=32,
    )
    scheduler = DDIMScheduler(**dict(SD_SCHEDULER, prediction_type="v_prediction" if sd2 else "epsilon"),
                              set_alpha_to_one=False)
    if family == "sdxl":
        return _build_sdxl(directory, tokenizer, text_encoder, vae, scheduler)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def _build_sdxl(directory: Path, tokenizer, text_encoder, vae, scheduler) -> Path:
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
        projection_dim=24,
    ))
    time_dim = 4
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 + 24, attention_head_dim=(2, 4), norm_num_groups=4, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=24 + 6 * time_dim,
    )
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(directory)
    return directory


def build_tiny_ip_adapter(pipeline: str | Path, directory: str | Path, seed: int = 0, image_embed_dim: int = 12,
                          weight_name: str = "ip-adapter_tiny.safetensors") -> Path:
    """Write a random IP-Adapter for the tiny pipeline folder ``pipeline`` to ``directory``, in the layout
    diffusers' ``load_ip_adapter`` reads: ``weight_name`` (``image_proj.*``, ``ip_adapter.N.to_{k,v}_ip``) and a
    tiny ``CLIPVisionModelWithProjection`` with its preprocessor config in ``image_encoder/``."""
    directory = Path(directory)
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
        projection_dim=image_embed_dim))
    encoder.save_pretrained(directory / icgen.IMAGE_ENCODER)
    CLIPImageProcessor(size=32, crop_size=32).save_pretrained(directory / icgen.IMAGE_ENCODER)
    unet = UNet2DConditionModel.from_pretrained(Path(pipeline) / "unet")
    params = icgen.install(unet, image_embed_dim=image_embed_dim)
    with torch.no_grad():  # a fresh adapter's K/V copy the text ones: make the context matter
        for p in params:
            p.add_(0.5 * torch.randn_like(p))
    save_file(icgen.adapter_state(unet), directory / weight_name)
    return directory


# --------------------------------------------------------------------------- World v2 (64x64, 8 latent channels)


def tiny_v2_vae() -> AutoencoderKL:
    """World v2's VAE layout (three levels, factor 4, eight latent channels, no attention) at a tiny width."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(4, 8, 8), layers_per_block=1,
                         latent_channels=v2.LATENT_CHANNELS, norm_num_groups=4, sample_size=v2.IMAGE_SIZE,
                         mid_block_add_attention=False)


def tiny_v2_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(sample_size=v2.LATENT_SIZE, in_channels=v2.LATENT_CHANNELS,
                                out_channels=v2.LATENT_CHANNELS, block_out_channels=(8, 16),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)


def tiny_v2_text_encoder(tokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=tokenizer.model_max_length,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))


def build_tiny_v2_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """Write a random tiny World v2 pipeline (64x64 images, latent 8x16x16, the v2 vocabulary) to ``directory``."""
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(render_v2.vocabulary(), directory / "_tokenizer", v2.MODEL_MAX_LENGTH)
    scheduler = DDIMScheduler(**SD_SCHEDULER, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=tiny_v2_vae(), text_encoder=tiny_v2_text_encoder(tokenizer), tokenizer=tokenizer,
                                   unet=tiny_v2_unet(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def tiny_v2_evaluator(folder: str | Path, seed: int = 0) -> Evaluator:
    """A random evaluator reading 64x64 images with the v2 vocabulary (the same weights for the same ``seed``)."""
    tokenizer = write_clip_tokenizer(render_v2.vocabulary(), folder, v2.MODEL_MAX_LENGTH)
    torch.manual_seed(seed)
    return Evaluator.create(tokenizer, image_size=v2.IMAGE_SIZE).eval().requires_grad_(False)

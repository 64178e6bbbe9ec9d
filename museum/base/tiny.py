"""Tiny random Stable Diffusion pipelines for tests, built offline from configs.

The same construction as diffusers' own ``get_dummy_components`` tests, with the
rendered world's tokenizer; saved with ``save_pretrained`` so loading it exercises the
code path a real Stable Diffusion checkpoint goes through.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from museum.base.components import make_sample_scheduler
from museum.base.tokenizer import write_clip_tokenizer
from museum.world.render import base_vocabulary


def build_tiny_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """Write a random tiny 32x32 pipeline (latent 4x8x8) to ``directory`` and return it."""
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(base_vocabulary(), directory / "_tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(4, 8, 8), latent_channels=4,
        norm_num_groups=2, layers_per_block=1, sample_size=32,
    )
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_sample_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory

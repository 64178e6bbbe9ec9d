"""Configurations of the World v2 embedded model, all stock diffusers/transformers classes.

64x64 RGB images; AutoencoderKL with three levels (factor 4) to a 16x16x8 latent: eight latent
channels instead of Stable Diffusion's four, because the world's patterns (stripes 4-6 pixels
wide, dots, checks, halftone) must survive the round trip at a quarter of SD's compression
(64*64*3 / (16*16*8) = 6, SD 1.x: 48). No attention in the VAE, so it is fully convolutional and
can be trained on crops (:func:`museum.models.v2.pretrain.train_vae`). Widths 24/48/96: 32/64/128
cost 1.4x as much a step (docs/logs/pretrain-v2.log), too much for this machine's budget. The scheduler is Stable
Diffusion 1.x's (:mod:`museum.models.components`).
"""

from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from museum.models import components

IMAGE_SIZE = 64
LATENT_CHANNELS = 8
LATENT_SIZE = 16


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(24, 48, 96),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


TEXT_WIDTH = 128
MODEL_MAX_LENGTH = 48  # the longest two-object caption with a style is ~42 tokens


def make_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return components.make_text_encoder(tokenizer, width=TEXT_WIDTH, layers=4)


def make_unet() -> UNet2DConditionModel:
    """Wider and two ResNet layers a level (64/128/192; cross-attention at 8x8 and 4x4, none at the highest
    resolution, as SDXL): about twice the old model's cost per step for four times its parameters."""
    return components.make_unet(channels=(64, 128, 192), layers_per_block=2, latent_channels=LATENT_CHANNELS,
                                text_width=TEXT_WIDTH, head_dim=32)

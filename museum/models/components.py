"""Configurations of the embedded model's components, all stock diffusers/transformers classes.

The embedded model is a Stable Diffusion pipeline shrunk to the rendered world: 32x32 RGB
images, a 16x16x4 latent (AutoencoderKL, factor 2, 4 channels as SD 1.x), a 3-layer CLIP text
encoder of width 64 and a three-level UNet2DConditionModel (16x16, 8x8, 4x4) with cross-attention
at 8x8 and 4x4 and none at 16x16 (SDXL likewise drops it at its highest resolution). The
scheduler is Stable Diffusion 1.x's (scaled-linear betas, 1000 steps, epsilon prediction).

Why 16x16: with an 8x8 latent (factor 4) a small shape spans three latent pixels, and the
first embedded model drew colour and background right but shapes as blobs; at 16x16 the
UNet's convolutions see the outline (docs/BASE_MODEL.md: 94% of shapes right). The first
model (8x8x8 latent, two-level UNet of 64/128 channels) is this module at commit d2bc5dc.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TEXT_WIDTH = 64
LATENT_CHANNELS = 4
LATENT_SIZE = 16

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=32,
        mid_block_add_attention=False,
    )


def make_text_encoder(tokenizer: CLIPTokenizer, width: int = TEXT_WIDTH, layers: int = 3) -> CLIPTextModel:
    config = CLIPTextConfig(
        # vocab_size must equal len(tokenizer), or load_textual_inversion shrinks the embedding table and fails
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=width,
    )
    return CLIPTextModel(config)


def make_unet(channels: tuple = (64, 96, 96), layers_per_block: int = 1, latent_channels: int = LATENT_CHANNELS,
              text_width: int = TEXT_WIDTH, head_dim: int = 4) -> UNet2DConditionModel:
    """Three levels (16x16, 8x8, 4x4 latents), cross-attention at the two lower ones."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        cross_attention_dim=text_width,
        attention_head_dim=head_dim,
        norm_num_groups=16,
    )


def make_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SD_SCHEDULER)


def make_sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SD_SCHEDULER, set_alpha_to_one=False)

"""Parameter counts, FLOPs, memory and storage per concept for Stable Diffusion 1.5, for docs/GPU.md.

Builds SD-1.5's UNet (and CLIP ViT-L/14 text encoder, VAE) from their configs with random weights on
CPU (no download), counts parameters, counts the FLOPs of one training step (forward + backward,
batch 1, 64x64 latents, 77 text tokens) with torch.utils.flop_counter.FlopCounterMode, and applies
each method's SD defaults (``MethodConfig.SD15``) and storage formulas (each method's ``cost``, tested
against real runs) to SD-1.5's cross-attention shapes. Prints the markdown tables of docs/GPU.md.

    OMP_NUM_THREADS=1 python scripts/gpu_estimates.py            # ~2-3 minutes, ~10 GB RAM
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from museum.methods import METHODS, method_names
from museum.methods.base import get_method
from museum.plumbing.kv import kv_modules
from museum.training.memory import activation_values

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TOKENS = 77
# assumed sustained throughput (bf16 tensor cores at 40% of the dense peak): stated, not measured
GPUS = {"A100 (125 TFLOP/s)": 0.4 * 312e12, "RTX 4090 (66 TFLOP/s)": 0.4 * 165e12}


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_flops(unet, text_encoder) -> tuple[int, int, int, float]:
    """(UNet fwd, UNet fwd+bwd, text encoder fwd+bwd) FLOPs for one sample, and seconds of the UNet step on CPU."""
    latents = torch.randn(1, 4, 64, 64)
    ids = torch.randint(0, SD15_TEXT["vocab_size"], (1, TOKENS))
    text_encoder.get_input_embeddings().weight.requires_grad_(True)
    with FlopCounterMode(display=False) as te:
        text = text_encoder(ids)[0]
        text.pow(2).mean().backward()
    unet.requires_grad_(True)
    start = time.time()
    # the math attention path: FlopCounterMode has no formula for the fused CPU attention kernel and would
    # miss the attention matmuls (~125 GFLOP of the forward at 64x64)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out = unet(latents, torch.tensor([500]), text.detach()).sample
        forward = fc.get_total_flops()
        out.pow(2).mean().backward()
    return forward, fc.get_total_flops(), te.get_total_flops(), time.time() - start


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def size(n_bytes: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.1f} {unit}"
    return f"{n_bytes:.0f} B"


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    vae = AutoencoderKL(**SD15_VAE)
    n_unet, n_text, n_vae = count(unet), count(text_encoder), count(vae)
    kv = {name: tuple(m.weight.shape) for name, m in kv_modules(unet).items()}
    width = SD15_TEXT["hidden_size"]
    acts = activation_values(unet, (4, 64, 64), (TOKENS, 768))
    acts_ckpt = activation_values(unet, (4, 64, 64), (TOKENS, 768), checkpointing=True)
    fwd, step, text_step, cpu_seconds = step_flops(unet, text_encoder)

    print("## Stable Diffusion 1.5, built from its configs (random weights, CPU)\n")
    print("| component | parameters | fp32 | fp16 |\n|---|---|---|---|")
    for name, n in (("UNet", n_unet), ("text encoder (CLIP ViT-L/14)", n_text), ("VAE", n_vae)):
        print(f"| {name} | {n:,} | {gib(4 * n)} | {gib(2 * n)} |")
    print(f"\nCross-attention K/V projections: {len(kv)} (`attn2.to_k`/`to_v` of 16 transformer blocks), "
          f"{sum(o * i for o, i in kv.values()):,} weights.\n")
    print(f"One training sample at 512x512 (64x64 latents, 77 tokens), FlopCounterMode: UNet forward "
          f"{fwd / 1e9:,.0f} GFLOP, forward + backward {step / 1e9:,.0f} GFLOP; text encoder forward + backward "
          f"{text_step / 1e9:,.0f} GFLOP. Activations kept for backward (forward hooks): {acts / 1e6:,.0f}M values "
          f"per sample ({acts_ckpt / 1e6:,.0f}M with gradient checkpointing). Measured here: one UNet forward + "
          f"backward at batch 1 (math attention) took {cpu_seconds:.0f} s on this CPU ({torch.get_num_threads()} "
          f"thread(s)).\n")

    print("## Per concept, with each method's SD defaults\n")
    head = ["method", "steps x batch", "trained values", "stored per concept", "museum state", "TFLOP per concept"]
    head += [f"time on {g}" for g in GPUS] + ["training memory (bf16 autocast)"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    weights = 4 * (n_unet + n_text + n_vae)  # Museum keeps the pipeline in fp32 (it also draws with it)
    table = 4 * SD15_TEXT["vocab_size"] * width  # the token trains through the embedding table (masked rows)
    for name in method_names():
        cfg = get_method(name, family="sd1").config.to_dict()
        cost = METHODS[name].cost(kv, width, cfg)
        flops = cfg["steps"] * (cost.passes_per_step * step + text_step) + cost.once_forward_passes * fwd
        trained_bytes = 4 * (cost.trained_values - width) + table  # grads + 2 Adam moments of what trains
        memory = weights + 4 * cost.added_values + 3 * trained_bytes + 2 * acts * cost.batch_samples
        row = [name, f"{cfg['steps']} x {cfg['batch_size']}", f"{cost.trained_values:,}",
               size(4 * cost.concept_values), size(4 * cost.state_values) if cost.state_values else "-",
               f"{flops / 1e12:,.0f}"]
        row += [f"{flops / rate / 60:.1f} min" for rate in GPUS.values()] + [f"~{gib(memory)}"]
        print("| " + " | ".join(row) + " |")
    print("\nTime = FLOPs / assumed sustained throughput (bf16 at 40% of the dense peak); memory = fp32 weights "
          "+ trained values with their gradients and AdamW moments (the token's whole embedding table, as Museum "
          "masks its gradient) + activations at 2 bytes (bf16) for the step's samples. Both are estimates, "
          "not measurements.")
    assert set(METHODS) == set(method_names())


if __name__ == "__main__":
    main()

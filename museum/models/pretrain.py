"""Pretraining of the embedded model and of the evaluator on the rendered world.

Stages (each reproducible by seed, all together in at most ~90 minutes on 2 CPU cores):

1. ``render``    : the pretraining set (base vocabulary only) and the evaluator set
                   (base + held-out pools), cached as .npz under ``--work``.
2. ``vae``       : AutoencoderKL, L1 + MSE + image-gradient L1 reconstruction and a small KL
                   (SD's VAE objective with an edge term in place of GAN and LPIPS); the
                   latent scaling factor is set to 1/std.
3. ``evaluator`` : the CLIP-style evaluator, contrastive on the whole world, each caption with
                   a hard negative that differs in one attribute word (:func:`hard_negative`).
4. ``unet``      : UNet2DConditionModel + CLIP text encoder jointly from scratch, epsilon
                   prediction on cached latents with Min-SNR-5 loss weights (Hang et al. 2023,
                   eq. 8), 10% caption dropout for classifier-free guidance, EMA weights
                   (diffusers' ``EMAModel``).

Run ``museum pretrain --out museum/embedded`` (or ``python scripts/pretrain.py``); the
result is a Stable Diffusion pipeline directory plus ``evaluator/``. ``--continue-from DIR``
trains such a folder further instead of starting from scratch (the VAE's decoder only).
The shipped ``museum/embedded`` comes from this module and ``components`` (docs/logs/pretrain.log);
the first model (8x8 latent) came from this module at commit d2bc5dc. ``pipeline-two-objects``
(``embedded-two-objects``) is ``pipeline`` continued for 2000 UNet steps on a set in which half the
scenes show two objects (``pair_fraction=0.5``; docs/logs/pretrain-two-objects.log, docs/two-objects/).
"""

from __future__ import annotations

import random
import re
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, StableDiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr

from museum.models import components
from museum.models.evaluator import Evaluator
from museum.models.tokenizer import write_clip_tokenizer
from museum.world.render import (
    BACKGROUNDS, CAPTION_PARTS, COLOURS, INSTANCES, NOVEL_STYLES, SHAPES, base_samples, base_vocabulary, caption,
    held_out_vocabulary, random_scene, render_batch,
)

VAE_STEPS, EVALUATOR_STEPS, UNET_STEPS = 1500, 3000, 6000  # the shipped model's recipe
CFG_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0
# attribute vocabularies a hard negative swaps, and how often each is picked: the shape is the
# attribute a batch of random scenes separates worst (colour and background it reads at ~100%)
SWAPS = ((SHAPES, 0.6), (tuple(COLOURS), 0.2), (BACKGROUNDS, 0.2))
CONTINUE_LR = 0.3  # learning-rate factor when continuing a trained model (pretrain(continue_from=...))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data


def _render_chunk(args):
    samples, drop_seed, drop_p = args
    rng = random.Random(drop_seed)
    images = render_batch(samples)
    captions = [caption(s, drop=frozenset(p for p in CAPTION_PARTS if rng.random() < drop_p)) for s, _ in samples]
    return images, captions


def render_set(samples, *, drop_p: float, seed: int, workers: int = 2):
    chunks = [samples[i:i + 500] for i in range(0, len(samples), 500)]
    with Pool(workers) as pool:
        parts = pool.map(_render_chunk, [(c, seed + k, drop_p) for k, c in enumerate(chunks)])
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


def evaluator_samples(n: int, seed: int):
    """Base scenes, held-out instances and held-out styles: the evaluator sees the whole world."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.5:
            scene = random_scene(rng)
        elif kind < 0.78:
            scene = random_scene(rng, instance=rng.choice(list(INSTANCES)), base_styles=False)
        elif kind < 0.95:
            scene = random_scene(rng, novel_style=rng.choice(list(NOVEL_STYLES)))
        else:
            scene = random_scene(rng, instance=rng.choice(list(INSTANCES)),
                                       novel_style=rng.choice(list(NOVEL_STYLES)))
        samples.append((scene, seed * 7_000_001 + i))
    return samples


def load_or_render(work: Path, name: str, make):
    path = work / f"{name}.npz"
    if path.exists():
        data = np.load(path, allow_pickle=False)
        return data["images"], list(data["captions"])
    images, captions = make()
    np.savez(path, images=images, captions=np.array(captions))
    return images, captions


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------- stages


def edge_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between image gradients: keeps the world's thin outlines and stripes sharp."""
    return (F.l1_loss(rec.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(rec.diff(dim=-2), x.diff(dim=-2)))


def train_vae(images: np.ndarray, *, steps: int, batch: int, seed: int, lr: float = 1e-3, init=None):
    """From scratch, or with ``init`` (a trained AutoencoderKL) its decoder only: the encoder, the latent
    space and the scaling factor stay, so a UNet trained on them stays valid (as Stable Diffusion's
    fine-tuned decoders, sd-vae-ft-mse, were made)."""
    torch.manual_seed(seed)
    vae = init if init is not None else components.make_vae()
    if init is not None:
        vae.requires_grad_(False)
        vae.decoder.requires_grad_(True), vae.post_quant_conv.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 100, steps)
    data = to_tensor(images)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        x = data[torch.randint(0, len(data), (batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + edge_loss(rec, x) + 1e-6 * posterior.kl().mean()
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        if step % 100 == 0 or step == 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(data[i:i + 256]).latent_dist.mean for i in range(0, min(len(data), 4096), 256)])
        rec = vae.decode(z[:256]).sample
        log(f"vae reconstruction L1 on 256 images: {F.l1_loss(rec, data[:256]).item():.4f}")
    if init is None:
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    log(f"vae scaling factor {vae.config.scaling_factor:.4f}")
    return vae


def hard_negative(caption: str, rng: random.Random) -> str:
    """``caption`` with one attribute word swapped for another value of its vocabulary ("a red star ..." ->
    "a red hexagon ..."); the same caption when it names none of the attributes in :data:`SWAPS`."""
    present = [(vocab, weight, word) for vocab, weight in SWAPS for word in vocab
               if re.search(rf"\b{word}\b", caption)]
    if not present:
        return caption
    vocab, _, word = rng.choices(present, weights=[w for _, w, _ in present])[0]
    return re.sub(rf"\b{word}\b", rng.choice([v for v in vocab if v != word]), caption, count=1)


def train_evaluator(images: np.ndarray, captions: list[str], *, steps: int, batch: int, seed: int, lr: float = 1e-3,
                    init: Evaluator | None = None):
    torch.manual_seed(seed)
    if init is None:
        words = base_vocabulary() + held_out_vocabulary()
        init = Evaluator.create(write_clip_tokenizer(words, Path("/tmp") / f"museum-evaluator-tokenizer-{seed}"))
    evaluator = init.train().requires_grad_(True)
    opt = torch.optim.AdamW(evaluator.parameters(), lr=lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, 100, steps)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(pixels), (batch,), generator=gen)
        texts = [captions[i] for i in idx.tolist()]
        loss = evaluator.contrastive_loss(pixels[idx], texts, negatives=[hard_negative(c, rng) for c in texts])
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        if step % 100 == 0 or step == 1:
            log(f"evaluator step {step}/{steps} loss {loss.item():.4f}")
    return evaluator.eval().requires_grad_(False)


def train_unet(images: np.ndarray, captions: list[str], vae, tokenizer, *, steps: int, batch: int, seed: int,
               lr: float = 5e-4, checkpoint_dir: Path | None = None, init=None):
    """UNet and text encoder from scratch, or continued from ``init`` = (unet, text_encoder)."""
    torch.manual_seed(seed)
    accelerator = Accelerator()
    unet, text_encoder = init if init is not None else (components.make_unet(), components.make_text_encoder(tokenizer))
    unet.train().requires_grad_(True), text_encoder.train().requires_grad_(True)
    scheduler = components.make_train_scheduler()
    with torch.no_grad():
        data = to_tensor(images)
        dists = [vae.encode(data[i:i + 512]).latent_dist for i in range(0, len(data), 512)]
        means = torch.cat([d.mean for d in dists])
        stds = torch.cat([d.std for d in dists])
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, 200, steps)
    unet, text_encoder, opt = accelerator.prepare(unet, text_encoder, opt)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=0.75)
    gen = torch.Generator().manual_seed(seed)
    sf = vae.config.scaling_factor
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(means), (batch,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * sf
        tokens = ids[idx].clone()
        tokens[torch.rand(batch, generator=gen) < CFG_DROPOUT] = empty[0]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, text_encoder(tokens)[0]).sample
        snr = compute_snr(scheduler, t)
        weights = snr.clamp(max=MIN_SNR_GAMMA) / snr  # Min-SNR-gamma for epsilon prediction
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        ema.step(params)
        if step % 100 == 0 or step == 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f}")
        if checkpoint_dir is not None and step % 1000 == 0:
            torch.save({"step": step}, checkpoint_dir / "unet-progress.pt")
    ema.copy_to(params)
    return accelerator.unwrap_model(unet).eval(), accelerator.unwrap_model(text_encoder).eval()


def assemble(out: Path, vae, unet, text_encoder, tokenizer) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=components.make_sample_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    return pipe


def pretrain(out: Path, work: Path, *, seed: int = 0, n_base: int = 30_000, n_eval: int = 24_000,
             vae_steps: int = VAE_STEPS, evaluator_steps: int = EVALUATOR_STEPS, unet_steps: int = UNET_STEPS,
             stages=("all",), continue_from: Path | None = None, pair_fraction: float = 0.0) -> None:
    """Train every stage (or those named in ``stages``) and write the embedded model to ``out``.

    With ``continue_from`` (a folder this function wrote, e.g. ``museum/embedded``) every stage starts from
    that model's component, at ``CONTINUE_LR`` times the learning rate: the VAE trains its decoder only
    (:func:`train_vae`), the evaluator and the UNet + text encoder train on. ``pair_fraction`` of the
    pretraining scenes show two objects (``museum.world.render.base_samples``; the shipped model: 0)."""
    out, work = Path(out), Path(work)
    trained = (StableDiffusionPipeline.from_pretrained(Path(continue_from) / "pipeline", safety_checker=None)
               if continue_from is not None else None)
    lr_scale = CONTINUE_LR if trained is not None else 1.0
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run = lambda name: "all" in stages or name in stages  # noqa: E731
    t0 = time.time()
    base_name = f"base-{seed}-{n_base}" + (f"-pairs{pair_fraction:g}" if pair_fraction else "")
    base_images, base_captions = load_or_render(
        work, base_name, lambda: render_set(base_samples(n_base, seed, pair_fraction=pair_fraction),
                                            drop_p=0.0, seed=seed))
    log(f"base set: {len(base_images)} images ({time.time() - t0:.0f}s)")
    if run("vae"):
        vae = train_vae(base_images, steps=vae_steps, batch=32, seed=seed, lr=1e-3 * lr_scale,
                        init=trained.vae if trained else None)
        vae.save_pretrained(work / "vae")
    if run("evaluator"):
        ev_images, ev_captions = load_or_render(
            work, f"evaluator-{seed}-{n_eval}",
            lambda: render_set(evaluator_samples(n_eval, seed + 1), drop_p=0.25, seed=seed + 1))
        images = np.concatenate([base_images[: n_eval // 2], ev_images])
        # base captions with dropped parts too, so partial queries ("a red shape") read well
        rng = random.Random(seed)
        drop_captions = [caption(s, drop=frozenset(p for p in CAPTION_PARTS if rng.random() < 0.25))
                         for s, _ in base_samples(n_base, seed)[: n_eval // 2]]
        evaluator = train_evaluator(images, drop_captions + ev_captions, steps=evaluator_steps, batch=256, seed=seed,
                                    lr=1e-3 * lr_scale,
                                    init=Evaluator.from_pretrained(Path(continue_from) / "evaluator") if trained else None)
        evaluator.save_pretrained(out / "evaluator")
    if run("unet"):
        if trained is None:
            vae = AutoencoderKL.from_pretrained(work / "vae")
            tokenizer, start = write_clip_tokenizer(base_vocabulary(), work / "tokenizer"), None
        else:  # its VAE has the continued decoder when this run's vae stage trained it
            vae, tokenizer, start = trained.vae, trained.tokenizer, (trained.unet, trained.text_encoder)
        unet, text_encoder = train_unet(base_images, base_captions, vae, tokenizer, steps=unet_steps, batch=64,
                                        seed=seed, lr=5e-4 * lr_scale, checkpoint_dir=work, init=start)
        assemble(out, vae, unet, text_encoder, tokenizer)
    log(f"pretraining done in {(time.time() - t0) / 60:.1f} min; model at {out}")

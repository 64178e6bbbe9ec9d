"""Resumable pretraining of the World v2 embedded model, in chunks that fit a session.

Each stage keeps its state under ``work`` (outside git) with accelerate's ``save_state`` /
``load_state`` (``checkpoint-N`` folders, the diffusers training scripts' convention: model,
optimizer, learning-rate schedule, RNG states and the data sampler), so a later session picks up
where the last one stopped: ``--minutes`` bounds one call, and a call on a finished stage does
nothing. Stages:

1. ``render``: the pretraining set (:func:`museum.world.v2.render.base_samples`, no pooled concept),
   rendered in chunks of ``CHUNK`` images, each an .npz written once.
2. ``vae``: AutoencoderKL, L1 + MSE + image-gradient L1 + a small KL (Stable Diffusion's objective
   with an edge term in place of the GAN and LPIPS, which need a network this world has no weights
   for); first on 32x32 crops (the VAE is fully convolutional; four crops cost one image), then on
   whole images. The latent scaling factor is set to 1/std at the end.
2b. ``vae-refine``: the VAE trained further on whole images, half of them styled, with a frequency term
   (:func:`refine_vae`).
3. ``unet``: UNet + CLIP text encoder from scratch on the VAE's cached latents (:func:`train_unet`).
4. ``evaluator``: the CLIP-style evaluator at 64x64 (:func:`train_evaluator`).
5. ``icgen``: LFS-Diffusion's image-context adapter on the frozen UNet, context from the evaluator
   (:func:`train_icgen`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import AutoencoderKL, StableDiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from transformers import CLIPTokenizer

from museum.models import components as old_components
from museum.models import icgen
from museum.models.evaluator import Evaluator
from museum.models.tokenizer import write_clip_tokenizer
from museum.models.v2 import components
from museum.world.v2 import concepts, render

CHUNK = 5000
N_BASE = 150_000
N_VAE = 40_000  # the VAE trains on the first chunks only
VAE_STEPS = 4000
VAE_CROP_STEPS = 3500  # the first steps train on crops
VAE_CROP = 32
VAE_BATCH = 32  # crops, or whole images for the last steps (half as many)
VAE_LR = 1e-3
VAE_REFINE_STEPS = 2000  # then all of it again on whole images, half of them styled, with a frequency term
VAE_REFINE_LR = 2e-4
VAE_REFINE_BATCH = 16
STYLED_SHARE = 0.5
FREQUENCY_WEIGHT = 10.0  # not tuned; the round trip measured after refining (scripts/measure_vae_v2.py) decides
EVALUATOR_STEPS = 3000
EVALUATOR_BATCH = 128
EVALUATOR_LR = 1e-3
EVALUATOR_STEM = 32  # a full-resolution first convolution (evaluator.ImageEncoder): patterns are read at 64x64
EVALUATOR_NEGATIVES = 3  # hard negatives per caption, each changing another attribute
N_EVALUATOR = 80_000  # the first chunks of the pretraining set
UNET_STEPS = 8000  # the first run's 12,000 took 1.25-1.6 s a step; the second run's machine takes 3.4 s
UNET_PLANNED_STEPS, UNET_LENGTHENED_AT = 6000, 4250  # planned for 6,000; shapes were still blobs at 4,000
UNET_WARMUP = 500
UNET_BATCH = 64
UNET_LR = 4e-4
CFG_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0
# Offset noise (Guttenberg 2023; diffusers' train_text_to_image ``--noise_offset``): a per-channel constant added to
# the training noise. A 16x16 latent's mean keeps a signal-to-noise ratio of ~0.8 at the last timestep of SD's
# schedule (its 256 positions average the noise down), so the UNet learned to read the ground's colour from the
# starting noise and ignored the words: at step 6,250, 6 seeds x 3 ground words gave a top-strip colour variance of
# 4,967 between seeds and 48 between words (docs/logs/pretrain-v2.log). 0.25 brings that mean's ratio at the last
# step to ~0.05 (SD-1.5's 64x64 latents with the usual 0.1: ~0.1). The first run switched it on at step 6,500, after
# which the grounds followed the words; the second (after that run's checkpoints were lost) uses it from step 1.
NOISE_OFFSET = 0.25
CHECKPOINT_EVERY = 250
ICGEN_OBJECTS = 2048  # objects, each drawn in ICGEN_VIEWS settings
ICGEN_VIEWS = 4
ICGEN_STEPS = 1500
ICGEN_BATCH = 32
ICGEN_LR = 1e-3
ICGEN_DROP = 0.1  # share of samples without context: the unconditional branch of guidance
SHIPPED_LIMIT = 60 * 2**20  # bytes: everything the package ships (issue "World v2")


def log(msg: str, logfile: Path | None = None) -> None:
    line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
    print(line, flush=True)
    if logfile is not None:
        with open(logfile, "a") as f:
            f.write(line + "\n")


# --------------------------------------------------------------------------- render


def _render_chunk(args) -> np.ndarray:
    index, seed, size = args
    return render.render_batch(render.base_samples(size, seed * 10_000 + index, reserved=concepts.reserved_signatures()))


def render_chunks(work: Path, n: int, seed: int, *, workers: int = 2, chunk: int | None = None, minutes: float | None = None,
                  logfile: Path | None = None) -> list[Path]:
    """Render the first ``n`` images of the pretraining set into ``work/render/chunk-XXX.npz`` (their scenes
    are drawn again from the seeds: :func:`chunk_scenes`); chunks already on disk are kept. Stops starting
    chunks after ``minutes``: the paths of all chunks are returned, those not yet rendered do not exist."""
    chunk = chunk or CHUNK
    folder = work / "render"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"chunk-{i:03d}.npz" for i in range(-(-n // chunk))]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    deadline = time.time() + 60 * minutes if minutes is not None else float("inf")
    with Pool(workers) as pool:
        for i, images in zip(todo, pool.imap(_render_chunk, [(i, seed, chunk) for i in todo])):
            tmp = paths[i].with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, images=images)
            tmp.replace(paths[i])
            log(f"render chunk {i + 1}/{len(paths)}", logfile)
            if time.time() > deadline:
                pool.terminate()
                break
    return paths


def load_images(paths: list[Path]) -> np.ndarray:
    return np.concatenate([np.load(p)["images"] for p in paths])


class StaleCacheError(RuntimeError):
    """A cached file no longer matches what the current code would make."""


def verify_chunks(paths: list[Path], seed: int, chunk: int | None = None) -> None:
    """Re-render the first and last image of every chunk and compare them with the cached pixels: captions are
    drawn again from the seeds (:func:`chunk_scenes`), so a change to the world, the pools or the sampler that
    moves the scenes must not meet pixels rendered before it."""
    size = chunk or CHUNK
    for path in paths:
        index = int(path.stem.split("-")[-1])
        images = np.load(path)["images"]
        samples = render.base_samples(size, seed * 10_000 + index, reserved=concepts.reserved_signatures())
        for k in (0, len(images) - 1):
            if not np.array_equal(np.asarray(render.render(*samples[k])), images[k]):
                raise StaleCacheError(f"{path} was rendered from another world or pool than the current code draws "
                                      f"(image {k} differs); delete {path.parent} and {path.parent.parent / 'latents'} "
                                      "to render them again")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------- resumable training


class SamplerState:
    """The data sampler's generator, checkpointed with the model (``accelerator.register_for_checkpointing``)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def _accelerator(folder: Path) -> Accelerator:
    return Accelerator(project_config=ProjectConfiguration(
        project_dir=str(folder), automatic_checkpoint_naming=True, total_limit=2))


def _number(path: Path) -> int:
    return int(path.name.split("_")[-1])


def _resume(accelerator: Accelerator, folder: Path, settings: dict) -> int:
    """Load the latest complete ``checkpoint_N`` under ``folder/checkpoints`` (one with its ``step.json``,
    written after the state: accelerate removes the oldest checkpoint before it writes the next, so a
    process killed while saving leaves an incomplete newest one, which is deleted); the step it was saved at
    (0 if none). A checkpoint saved with other ``settings`` (steps, batch, learning rate) is refused: the
    schedule and data would silently change."""
    checkpoints = sorted((folder / "checkpoints").glob("checkpoint_*"), key=_number)
    if not checkpoints:
        return 0
    accelerator.project_configuration.iteration = _number(checkpoints[-1]) + 1
    complete = [c for c in checkpoints if (c / "step.json").exists()]
    for incomplete in set(checkpoints) - set(complete):
        shutil.rmtree(incomplete)
    if not complete:
        return 0
    saved = json.loads((complete[-1] / "step.json").read_text())
    if saved.get("settings", settings) != settings:
        raise StaleCacheError(f"{complete[-1]} was saved with {saved['settings']}, this run has {settings}; "
                              f"restore those settings or delete {folder} to start the stage again")
    accelerator.load_state(str(complete[-1]))
    return saved["step"]


def _save(accelerator: Accelerator, step: int, settings: dict) -> None:
    path = Path(accelerator.save_state())
    (path / "step.json").write_text(json.dumps({"step": step, "settings": settings}))


def write_atomically(folder: Path, write) -> None:
    """``write(tmp)`` into a temporary folder renamed to ``folder``: a finished stage is marked by its folder
    (diffusers writes a model's config before its weights)."""
    tmp = folder.with_name(folder.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    tmp.replace(folder)


def save_atomically(model, folder: Path, **kwargs) -> None:
    """``model.save_pretrained`` into ``folder``, atomically (:func:`write_atomically`)."""
    write_atomically(folder, lambda tmp: model.save_pretrained(tmp, **kwargs))


def edge_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between image gradients: keeps thin outlines, stripes and dots sharp."""
    return F.l1_loss(rec.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(rec.diff(dim=-2), x.diff(dim=-2))


def frequency_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the amplitude spectra (2-D FFT) of reconstruction and image: a periodic texture (scanlines,
    halftone dots, hatching) that the pixel losses average to grey is a peak here (after the focal frequency
    loss, Jiang et al. 2021, without its focal weights)."""
    return F.l1_loss(torch.fft.rfft2(rec, norm="ortho").abs(), torch.fft.rfft2(x, norm="ortho").abs())


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, generator: torch.Generator, frequency_weight: float = 0.0
             ) -> torch.Tensor:
    posterior = vae.encode(x).latent_dist
    rec = vae.decode(posterior.sample(generator=generator)).sample
    loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + edge_loss(rec, x) + 1e-6 * posterior.kl().mean()
    return loss + frequency_weight * frequency_loss(rec, x) if frequency_weight else loss


def _vae_batch(data: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
    """``VAE_BATCH`` random images cropped to 32x32 (one random window for the batch) for the first
    ``VAE_CROP_STEPS`` steps, then half as many whole images."""
    if step <= VAE_CROP_STEPS:
        x = data[torch.randint(0, len(data), (VAE_BATCH,), generator=generator)]
        i, j = torch.randint(0, components.IMAGE_SIZE - VAE_CROP + 1, (2,), generator=generator).tolist()
        return x[:, :, i:i + VAE_CROP, j:j + VAE_CROP]
    return data[torch.randint(0, len(data), (VAE_BATCH // 2,), generator=generator)]


def run_stage(name: str, folder: Path, models: list[torch.nn.Module], optimizer, scheduler, loss_fn, *,
              steps: int, minutes: float, seed: int, settings: dict, extra_state=(), after_step=None,
              max_grad_norm: float | None = None, max_new_steps: int | None = None, logfile: Path | None = None) -> bool:
    """Run (or resume) a training stage for at most ``minutes``: ``loss_fn(step, generator)`` gives the loss
    of one step; ``extra_state`` (objects with state_dict / load_state_dict, e.g. an EMA) is checkpointed
    with the models, optimizer, schedule and data sampler; ``after_step()`` runs after each optimizer step.
    One process: ``loss_fn`` uses the models as given. ``settings`` (the stage's constants) are saved with
    each checkpoint and must match on resume. ``max_new_steps`` bounds the call in steps as ``minutes``
    does in time. True once all ``steps`` are done."""
    accelerator = _accelerator(folder)
    sampler = SamplerState(seed)
    *models, optimizer, scheduler = accelerator.prepare(*models, optimizer, scheduler)
    for state in (sampler, *extra_state):
        accelerator.register_for_checkpointing(state)
    settings = dict(settings, steps=steps, seed=seed)
    start = _resume(accelerator, folder, settings)
    log(f"{name}: {'resumed at step ' + str(start) if start else 'from scratch'} of {steps}", logfile)
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    deadline = time.time() + 60 * minutes
    step = start
    last = steps if max_new_steps is None else min(steps, start + max_new_steps)
    while step < last and time.time() < deadline:
        step += 1
        loss = loss_fn(step, sampler.generator)
        accelerator.backward(loss)
        if max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
        if after_step is not None:
            after_step()
        if step % 100 == 0 or step == start + 1:
            log(f"{name} step {step}/{steps} loss {loss.item():.4f}", logfile)
        if step % CHECKPOINT_EVERY == 0 and step < steps:
            _save(accelerator, step, settings)
    if step < steps:
        if step % CHECKPOINT_EVERY or step == start:  # not saved just now
            _save(accelerator, step, settings)
        log(f"{name}: stopped at step {step}/{steps} (budget of this call); the same command resumes it", logfile)
        return False
    return True


def train_vae(work: Path, images: np.ndarray, *, steps: int = VAE_STEPS, minutes: float, seed: int = 0,
              max_new_steps: int | None = None, logfile: Path | None = None) -> AutoencoderKL | None:
    """Train (or resume) the VAE for at most ``minutes``; the finished VAE (saved to ``work/vae``) once all
    ``steps`` are done, else None."""
    if (work / "vae" / "config.json").exists():
        return AutoencoderKL.from_pretrained(work / "vae")
    torch.manual_seed(seed)
    vae = components.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 200, steps)
    data = to_tensor(images)
    settings = {"lr": VAE_LR, "batch": VAE_BATCH, "crop": VAE_CROP, "crop_steps": VAE_CROP_STEPS, "images": len(images)}
    done = run_stage("vae", work / "vae-run", [vae], opt, sched,
                     lambda step, gen: vae_loss(vae, _vae_batch(data, step, gen), gen), steps=steps,
                     minutes=minutes, seed=seed, settings=settings, max_new_steps=max_new_steps, logfile=logfile)
    if not done:
        return None
    return finish_vae(vae, data, work / "vae", "vae", logfile)


def finish_vae(vae: AutoencoderKL, data: torch.Tensor, folder: Path, name: str, logfile: Path | None) -> AutoencoderKL:
    """Set the latent scaling factor to 1/std of the latents of the first 4096 images, log the reconstruction
    error, and save the VAE to ``folder``."""
    vae = vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(data[i:i + 256]).latent_dist.mean for i in range(0, 4096, 256)])
        rec = vae.decode(z[:256]).sample
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    log(f"{name} done: reconstruction L1 {F.l1_loss(rec, data[:256]).item():.4f} on 256 training images, "
        f"scaling factor {vae.config.scaling_factor:.4f}", logfile)
    save_atomically(vae, folder)
    return vae


def refine_vae(work: Path, images: np.ndarray, styled: np.ndarray, *,
               steps: int = VAE_REFINE_STEPS, minutes: float, seed: int = 0, max_new_steps: int | None = None,
               logfile: Path | None = None) -> AutoencoderKL | None:
    """Train the finished VAE further (encoder and decoder) on whole images, ``STYLED_SHARE`` of each batch
    drawn from the styled ones (indices ``styled``), with :func:`frequency_loss` added: the first VAE lost
    the finest style textures (docs/world-v2/README.md). Starts from ``work/vae``; the refined VAE
    (``work/vae-refined``) once done, else None."""
    if (work / "vae-refined" / "config.json").exists():
        return AutoencoderKL.from_pretrained(work / "vae-refined")
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(work / "vae").train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_REFINE_LR, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 100, steps)
    data, styled_index = to_tensor(images), torch.from_numpy(styled)
    n_styled = int(VAE_REFINE_BATCH * STYLED_SHARE)

    def loss_fn(step, gen):
        idx = torch.cat([styled_index[torch.randint(0, len(styled_index), (n_styled,), generator=gen)],
                         torch.randint(0, len(data), (VAE_REFINE_BATCH - n_styled,), generator=gen)])
        return vae_loss(vae, data[idx], gen, FREQUENCY_WEIGHT)

    settings = {"lr": VAE_REFINE_LR, "batch": VAE_REFINE_BATCH, "styled_share": STYLED_SHARE,
                "frequency_weight": FREQUENCY_WEIGHT, "images": len(images)}
    if not run_stage("vae-refine", work / "vae-refine-run", [vae], opt, sched, loss_fn, steps=steps, minutes=minutes,
                     seed=seed, settings=settings, max_new_steps=max_new_steps, logfile=logfile):
        return None
    return finish_vae(vae, data, work / "vae-refined", "vae-refine", logfile)


# --------------------------------------------------------------------------- captions of the cached set


def chunk_scenes(index: int, seed: int, size: int | None = None) -> list[render.Scene]:
    """The scenes of chunk ``index``, drawn again from its seed (cheap; nothing but the pixels is stored)."""
    samples = render.base_samples(size or CHUNK, seed * 10_000 + index, reserved=concepts.reserved_signatures())
    return [scene for scene, _ in samples]


def batch_rng(generator: torch.Generator) -> random.Random:
    """A Python RNG for one batch's caption choices, drawn from the checkpointed sampler."""
    return random.Random(int(torch.randint(0, 2 ** 31, (1,), generator=generator)))


PERTURBED = {"shape": 3, "colour": 2, "pattern": 2, "background": 1, "style": 1, "position": 1}  # how often each


def perturbable(scene: render.Scene, drop: frozenset = frozenset()) -> list[str]:
    """The attributes of :data:`PERTURBED` that the caption of ``scene`` without ``drop`` names."""
    return [k for k in PERTURBED if k not in drop and not (k == "position" and scene.position == "center")]


def negative_kinds(scene: render.Scene, rng: random.Random, n: int, drop: frozenset = frozenset()) -> list[str]:
    """Up to ``n`` different attributes to change, drawn by the weights of :data:`PERTURBED` without
    replacement: one hard negative each."""
    kinds, chosen = perturbable(scene, drop), []
    while kinds and len(chosen) < n:
        kind = rng.choices(kinds, [PERTURBED[k] for k in kinds])[0]
        kinds.remove(kind)
        chosen.append(kind)
    return chosen


def _other_pattern(look: render.Look, rng: random.Random) -> render.Look:
    """``look`` with another pattern and the same colours where a pattern takes that many (then the caption
    differs in its pattern words alone, and the negative can only be told apart by reading the pattern)."""
    fits = [p for p in render.patterns_taking(len(look.palette)) if p != look.pattern]
    if not fits:
        other = render.random_look(rng, shape=look.shape)
        while other.pattern == look.pattern:
            other = render.random_look(rng, shape=look.shape)
        return replace(other, palette=(look.palette + other.palette)[:len(other.palette)])
    pattern = rng.choice(fits)
    spec = render.PATTERNS[pattern]
    return replace(look, pattern=pattern, orientation=rng.choice(render.ORIENTATIONS) if spec.oriented else None,
                   layout=tuple(rng.choice(choices) for choices in spec.layouts))


def perturb(scene: render.Scene, rng: random.Random, drop: frozenset = frozenset(), kind: str | None = None
            ) -> render.Scene:
    """``scene`` with one attribute its caption (without the parts in ``drop``) names changed: ``kind``, or one
    drawn by :data:`PERTURBED` (shape, main colour, pattern, background, style or position). The hard negative
    of that caption (NegCLIP, Yuksekgonul et al. 2023); the shape is always named, so there is always one to
    change."""
    look = scene.look
    kind = kind or negative_kinds(scene, rng, 1, drop)[0]
    if kind == "shape":
        return replace(scene, look=replace(look, shape=rng.choice([s for s in render.SHAPES if s != look.shape])))
    if kind == "colour":
        colour = rng.choice([c for c in render.COLOURS if c not in look.palette])
        return replace(scene, look=replace(look, palette=(colour,) + look.palette[1:]))
    if kind == "pattern":
        return replace(scene, look=_other_pattern(look, rng))
    if kind == "background":
        return replace(scene, background=rng.choice([b for b in render.BACKGROUNDS if b != scene.background]))
    if kind == "style":
        families = [None] + [f for f in render.STYLES if scene.style is None or f != scene.style.family]
        family = rng.choice([f for f in families if f is not None] if scene.style is None else families)
        return replace(scene, style=render.random_style(rng, family) if family else None)
    return replace(scene, position=rng.choice([p for p in render.POSITIONS if p != scene.position]))


# --------------------------------------------------------------------------- evaluator


def train_evaluator(work: Path, images: np.ndarray, scenes: list[render.Scene], *, steps: int = EVALUATOR_STEPS,
                    minutes: float, seed: int = 0, max_new_steps: int | None = None,
                    logfile: Path | None = None) -> Evaluator | None:
    """The CLIP-style evaluator v2 on ``images`` (the first :data:`N_EVALUATOR` of the pretraining set: no pooled
    concept, so the zero-shot pool checks it on combinations it never saw), partial captions, and
    :data:`EVALUATOR_NEGATIVES` hard negatives per caption, each changing another attribute; None until done."""
    if (work / "evaluator" / "config.json").exists():
        return Evaluator.from_pretrained(work / "evaluator")
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(render.vocabulary(), work / "evaluator-tokenizer", components.MODEL_MAX_LENGTH)
    evaluator = Evaluator.create(tokenizer, image_size=components.IMAGE_SIZE, stem_width=EVALUATOR_STEM)
    evaluator = evaluator.train().requires_grad_(True)
    opt = torch.optim.AdamW(evaluator.parameters(), lr=EVALUATOR_LR, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, 200, steps)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)

    def loss_fn(step, gen):
        idx = torch.randint(0, len(pixels), (EVALUATOR_BATCH,), generator=gen).tolist()
        rng = batch_rng(gen)
        drops = [render.caption_drop(rng) for _ in idx]
        texts = [render.caption(scenes[i], drop=d) for i, d in zip(idx, drops)]
        negatives = [render.caption(perturb(scenes[i], rng, d, kind), drop=d) for i, d in zip(idx, drops)
                     for kind in negative_kinds(scenes[i], rng, EVALUATOR_NEGATIVES, d)]
        return evaluator.contrastive_loss(pixels[idx].float() / 255.0, texts, negatives=negatives)

    settings = {"lr": EVALUATOR_LR, "batch": EVALUATOR_BATCH, "images": len(images), "stem": EVALUATOR_STEM,
                "negatives": EVALUATOR_NEGATIVES}
    if not run_stage("evaluator", work / "evaluator-run", [evaluator], opt, sched, loss_fn, steps=steps,
                     minutes=minutes, seed=seed, settings=settings, max_new_steps=max_new_steps, logfile=logfile):
        return None
    evaluator = evaluator.eval().requires_grad_(False)
    save_atomically(evaluator, work / "evaluator")
    log("evaluator done", logfile)
    return evaluator


# --------------------------------------------------------------------------- ICGen adapter


def icgen_views(scene: render.Scene, rng: random.Random, n: int) -> list[render.Scene]:
    """``n`` settings of the scene's object: a new ground, position and size, no style."""
    return [replace(scene, background=render.random_background(rng, scene.look), position=rng.choice(list(render.POSITIONS)),
                    size=rng.choice(list(render.SIZES)), style=None, companion=None) for _ in range(n)]


def icgen_caption(scene: render.Scene, rng: random.Random) -> str:
    """The view's caption with the object named by its shape only (half the samples), by its main colour and
    shape (a quarter) or fully (a quarter): the context must carry what the words leave out."""
    r = rng.random()
    if r >= 0.75:
        return render.caption(scene)
    phrase = scene.look.shape if r < 0.5 else f"{scene.look.palette[0]} {scene.look.shape}"
    return render.caption(scene, object_phrase=phrase)


@torch.no_grad()
def icgen_data(work: Path, pipe: StableDiffusionPipeline, evaluator: Evaluator, seed: int) -> dict:
    """Latents, evaluator embeddings and captions of ``ICGEN_OBJECTS`` pretraining objects (no pooled
    concept) in ``ICGEN_VIEWS`` settings each, cached in ``work/icgen-data.pt``."""
    path = work / "icgen-data.pt"
    settings = {"objects": ICGEN_OBJECTS, "views": ICGEN_VIEWS, "seed": seed, "vae": _fingerprint(pipe.vae)}
    if path.exists():
        data = torch.load(path)
        if data["settings"] == settings:
            return data
    rng = random.Random(f"icgen:{seed}")
    images, captions = [], []
    for scene, render_seed in render.base_samples(ICGEN_OBJECTS, seed + 2, reserved=concepts.reserved_signatures(),
                                                  pair_fraction=0.0):
        views = icgen_views(scene, rng, ICGEN_VIEWS)
        images += [render.render(v, render_seed * 31 + k) for k, v in enumerate(views)]
        captions.append([icgen_caption(v, rng) for v in views])
    embeds = evaluator.embed_images(images).float().reshape(ICGEN_OBJECTS, ICGEN_VIEWS, -1)
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1
    latents = torch.cat([pipe.vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
    latents = (latents * pipe.vae.config.scaling_factor).reshape(ICGEN_OBJECTS, ICGEN_VIEWS, *latents.shape[1:])
    data = {"settings": settings, "latents": latents, "embeds": embeds, "captions": captions}
    torch.save(data, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return data


def train_icgen(work: Path, pipe: StableDiffusionPipeline, evaluator: Evaluator, *, steps: int = ICGEN_STEPS,
                minutes: float, seed: int = 0, max_new_steps: int | None = None, logfile: Path | None = None
                ) -> Path | None:
    """The image-context adapter LFS-Diffusion's ICGen uses (:mod:`museum.models.icgen`, IP-Adapter's layout):
    one view of an object is the target, the mean evaluator embedding of its other views the context, so the
    context shows the object and never the target's setting; only the adapter trains. The adapter folder
    ``work/icgen`` once done, else None."""
    if (work / "icgen" / icgen.WEIGHT_NAME).exists():
        return work / "icgen"
    data = icgen_data(work, pipe, evaluator, seed)
    unet = copy.deepcopy(pipe.unet).requires_grad_(False)
    torch.manual_seed(seed)
    params = icgen.install(unet, data["embeds"].shape[-1])
    opt = torch.optim.AdamW(params, lr=ICGEN_LR, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 100, steps)
    noise_scheduler = old_components.make_train_scheduler()
    latents, embeds, captions = data["latents"], data["embeds"], data["captions"]

    def loss_fn(step, gen):
        obj = torch.randint(0, ICGEN_OBJECTS, (ICGEN_BATCH,), generator=gen)
        target = torch.randint(0, ICGEN_VIEWS, (ICGEN_BATCH,), generator=gen)
        others = torch.ones(ICGEN_BATCH, ICGEN_VIEWS)
        others[torch.arange(ICGEN_BATCH), target] = 0
        context = F.normalize((embeds[obj] * others[..., None]).sum(1), dim=-1)
        context = context * (torch.rand(ICGEN_BATCH, 1, generator=gen) >= ICGEN_DROP)
        x0 = latents[obj, target]
        noise = training_noise(x0, NOISE_OFFSET, gen)  # the noise the UNet was last trained on
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (ICGEN_BATCH,), generator=gen)
        ids = pipe.tokenizer([captions[o][v] for o, v in zip(obj.tolist(), target.tolist())], padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            text = pipe.text_encoder(ids)[0]
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, text,
                    added_cond_kwargs={"image_embeds": [context[:, None]]}).sample
        return F.mse_loss(pred, noise)

    settings = {"lr": ICGEN_LR, "batch": ICGEN_BATCH, "drop": ICGEN_DROP, "noise_offset": NOISE_OFFSET,
                **data["settings"]}
    if not run_stage("icgen", work / "icgen-run", [unet], opt, sched, loss_fn, steps=steps, minutes=minutes, seed=seed,
                     settings=settings, max_new_steps=max_new_steps, logfile=logfile):
        return None
    write_atomically(work / "icgen", lambda tmp: icgen.save_adapter(unet, tmp))
    log("icgen done: adapter saved", logfile)
    return work / "icgen"


# --------------------------------------------------------------------------- UNet + text encoder


def _fingerprint(vae: AutoencoderKL) -> str:
    """A hash of the VAE's weights: the latents cache belongs to one VAE."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def encode_latents(work: Path, vae: AutoencoderKL, paths: list[Path], *, minutes: float | None = None,
                   logfile: Path | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE posterior's mean and std of every image, cached per chunk in ``work/latents`` (for the VAE
    recorded there); None when ``minutes`` ran out before every chunk was encoded."""
    folder = work / "latents"
    folder.mkdir(exist_ok=True)
    stamp, fingerprint = folder / "vae.sha256", _fingerprint(vae)
    if stamp.exists() and stamp.read_text() != fingerprint:
        raise StaleCacheError(f"{folder} holds latents of another VAE; delete it to encode them again")
    stamp.write_text(fingerprint)
    deadline = time.time() + 60 * minutes if minutes is not None else float("inf")
    for path in paths:
        cached = folder / path.name
        if cached.exists():
            continue
        if time.time() > deadline:
            return None
        with torch.no_grad():
            data = to_tensor(np.load(path)["images"])
            dists = [vae.encode(data[i:i + 500]).latent_dist for i in range(0, len(data), 500)]
        tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, mean=torch.cat([d.mean for d in dists]).numpy(), std=torch.cat([d.std for d in dists]).numpy())
        tmp.replace(cached)
        log(f"latents of {path.name}", logfile)
    arrays = [np.load(folder / p.name) for p in paths]
    return torch.cat([torch.from_numpy(a["mean"]) for a in arrays]), torch.cat([torch.from_numpy(a["std"]) for a in arrays])


def training_noise(latents: torch.Tensor, offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise plus ``offset`` times a Gaussian constant per sample and channel (offset noise)."""
    noise = torch.randn(latents.shape, generator=generator)
    return noise + offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator) if offset else noise


def unet_loss(unet, text_encoder, scheduler, latents, ids, noise_offset: float = 0.0) -> torch.Tensor:
    """Epsilon prediction with Min-SNR-gamma weights (Hang et al. 2023, eq. 8), on offset noise."""
    noise = training_noise(latents, noise_offset)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
    pred = unet(scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
    snr = compute_snr(scheduler, t)
    weights = snr.clamp(max=MIN_SNR_GAMMA) / snr
    return (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()


def lengthened_cosine(optimizer, warmup: int, planned: int, lengthened_at: int, steps: int
                      ) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' ``get_cosine_schedule_with_warmup`` over ``planned`` steps, continued from step
    ``lengthened_at`` as if it had been planned over ``steps``: the schedule of a run lengthened on the way,
    so that a run from scratch repeats it (the second UNet run, docs/world-v2/README.md)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        total = planned if step <= lengthened_at else steps  # the step after the checkpoint kept its planned rate
        return max(0.0, 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_unet(work: Path, vae: AutoencoderKL, paths: list[Path], scenes: list[render.Scene], *,
               steps: int = UNET_STEPS, minutes: float, seed: int = 0, max_new_steps: int | None = None,
               logfile: Path | None = None):
    """UNet + text encoder from scratch on cached latents, partial and class-only captions
    (:func:`museum.world.v2.render.caption_drop`), 10% empty captions for classifier-free guidance, EMA
    weights (diffusers' ``EMAModel``); the pipeline folder ``work/pipeline`` once done, else None."""
    if (work / "pipeline" / "model_index.json").exists():
        return StableDiffusionPipeline.from_pretrained(work / "pipeline", safety_checker=None)
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(render.vocabulary(), work / "tokenizer", components.MODEL_MAX_LENGTH)
    unet, text_encoder = components.make_unet(), components.make_text_encoder(tokenizer)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=UNET_LR, weight_decay=1e-2)
    sched = lengthened_cosine(opt, UNET_WARMUP, min(UNET_PLANNED_STEPS, steps), UNET_LENGTHENED_AT, steps)
    ema = EMAModel(params, decay=0.9995, use_ema_warmup=True, power=0.75)
    start = time.time()
    latents = encode_latents(work, vae, paths, minutes=minutes, logfile=logfile)
    if latents is None:
        log("unet: the latents are not all encoded yet (budget of this call); the same command continues", logfile)
        return None
    means, stds = latents
    minutes -= (time.time() - start) / 60
    scale = vae.config.scaling_factor
    noise_scheduler = old_components.make_train_scheduler()

    def loss_fn(step, gen):
        idx = torch.randint(0, len(means), (UNET_BATCH,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        rng = batch_rng(gen)
        texts = ["" if rng.random() < CFG_DROPOUT else render.caption(scenes[i], drop=render.caption_drop(rng))
                 for i in idx.tolist()]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return unet_loss(unet, text_encoder, noise_scheduler, latents, ids, NOISE_OFFSET)

    settings = {"lr": UNET_LR, "batch": UNET_BATCH, "cfg_dropout": CFG_DROPOUT, "min_snr": MIN_SNR_GAMMA,
                "images": len(means), "noise_offset": NOISE_OFFSET, "captions": "position first",
                "planned_steps": UNET_PLANNED_STEPS, "lengthened_at": UNET_LENGTHENED_AT}
    if not run_stage("unet", work / "unet-run", [unet, text_encoder], opt, sched, loss_fn, steps=steps,
                     minutes=minutes, seed=seed, settings=settings, extra_state=[ema], after_step=lambda: ema.step(params),
                     max_grad_norm=1.0, max_new_steps=max_new_steps, logfile=logfile):
        return None
    ema.copy_to(params)
    pipe = _pipeline(vae, text_encoder, tokenizer, unet)
    save_atomically(pipe, work / "pipeline", safe_serialization=True)
    log("unet done: pipeline saved", logfile)
    return pipe


def _pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=old_components.make_sample_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def unet_snapshot(work: Path) -> tuple[StableDiffusionPipeline, int]:
    """The pipeline as the UNet stage's latest complete checkpoint has it (EMA weights), and its step: to
    look at samples while pretraining goes on. Reads the checkpoint only; the run is not touched."""
    checkpoints = sorted((c for c in (work / "unet-run" / "checkpoints").glob("checkpoint_*")
                          if (c / "step.json").exists()), key=_number)
    if not checkpoints:
        raise FileNotFoundError(f"no complete UNet checkpoint under {work / 'unet-run'}; run the UNet stage first")
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    unet, text_encoder = components.make_unet(), components.make_text_encoder(tokenizer)
    ema = EMAModel(list(unet.parameters()) + list(text_encoder.parameters()))
    ema.load_state_dict(torch.load(checkpoints[-1] / "custom_checkpoint_1.pkl", weights_only=False))  # [sampler, ema]
    ema.copy_to(list(unet.parameters()) + list(text_encoder.parameters()))
    vae = AutoencoderKL.from_pretrained(work / "vae-refined")
    step = json.loads((checkpoints[-1] / "step.json").read_text())["step"]
    return _pipeline(vae, text_encoder, tokenizer, unet), step


# --------------------------------------------------------------------------- all stages


def refined_vae(work: Path, images: np.ndarray, vae_paths: list[Path], seed: int, left, logfile: Path | None
                ) -> AutoencoderKL | None:
    """The refined VAE: loaded when ``work/vae-refined`` exists (a copy of the committed one will do, see
    docs/world-v2/README.md), else the vae and vae-refine stages, within the time ``left()``."""
    if (work / "vae-refined" / "config.json").exists():
        return AutoencoderKL.from_pretrained(work / "vae-refined")
    if train_vae(work, images, steps=VAE_STEPS, minutes=left(), seed=seed, logfile=logfile) is None:
        return None
    scenes = [s for i in range(len(vae_paths)) for s in chunk_scenes(i, seed)]
    styled = np.array([i for i, s in enumerate(scenes) if s.style is not None])
    return refine_vae(work, images, styled, steps=VAE_REFINE_STEPS, minutes=left(), seed=seed, logfile=logfile)


def pretrain_evaluator(work: Path, *, minutes: float, seed: int = 0, logfile: Path | None = None) -> Evaluator | None:
    """The evaluator stage alone, on the first :data:`N_EVALUATOR` rendered images (rendered first if need be):
    it does not depend on the UNet, so it can train beside it, each process on one core (one thread each uses
    the two cores better than two threads on one model: ``scripts/pretrain_v2.py --stage evaluator``)."""
    deadline = time.time() + 60 * minutes
    paths = render_chunks(work, min(N_EVALUATOR, N_BASE), seed, minutes=minutes, logfile=logfile)
    if not all(p.exists() for p in paths):
        return None
    verify_chunks(paths, seed)
    scenes = [s for i in range(len(paths)) for s in chunk_scenes(i, seed)]
    return train_evaluator(work, load_images(paths), scenes, steps=EVALUATOR_STEPS,
                           minutes=max(0.0, (deadline - time.time()) / 60), seed=seed, logfile=logfile)


def pretrain(work: Path, *, minutes: float, seed: int = 0, logfile: Path | None = None) -> bool:
    """Run the stages in order, each resumed where the last call stopped, for at most ``minutes`` in all:
    render the VAE's set, vae, vae-refine, render the rest, unet (whose samples can be looked at without
    the evaluator), evaluator, icgen (LFS-Diffusion's image-context adapter). True once every stage is done."""
    deadline = time.time() + 60 * minutes
    left = lambda: max(0.0, (deadline - time.time()) / 60)  # noqa: E731
    work.mkdir(parents=True, exist_ok=True)
    vae_paths = render_chunks(work, N_VAE, seed, logfile=logfile)
    verify_chunks(vae_paths, seed)
    images = load_images(vae_paths)
    vae = refined_vae(work, images, vae_paths, seed, left, logfile)
    if vae is None:
        return False
    paths = render_chunks(work, N_BASE, seed, minutes=left(), logfile=logfile)
    if not all(p.exists() for p in paths):
        return False
    verify_chunks(paths[len(vae_paths):], seed)
    scenes = [s for i in range(len(paths)) for s in chunk_scenes(i, seed)]
    pipe = train_unet(work, vae, paths, scenes, steps=UNET_STEPS, minutes=left(), seed=seed, logfile=logfile)
    if pipe is None:
        return False
    del images
    evaluator = pretrain_evaluator(work, minutes=left(), seed=seed, logfile=logfile)
    if evaluator is None:
        return False
    return train_icgen(work, pipe, evaluator, steps=ICGEN_STEPS, minutes=left(), seed=seed, logfile=logfile) is not None


# --------------------------------------------------------------------------- the package


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def ship(work: Path, out: Path) -> dict[str, int]:
    """Write the finished models as the package ships them: ``out/pipeline`` with its UNet stored in fp16
    (as Stable Diffusion checkpoints ship; ``from_pretrained(..., dtype=torch.float32)`` loads it back as fp32),
    ``out/evaluator`` and ``out/icgen``; their sizes in bytes. Refuses, writing nothing, when all of it would
    exceed ``SHIPPED_LIMIT``."""
    for stage in ("pipeline", "evaluator", "icgen"):
        if not (work / stage).is_dir():
            raise FileNotFoundError(f"{work / stage} is missing: finish pretraining first (scripts/pretrain_v2.py)")
    staging = out.with_name(out.name + f".{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe = StableDiffusionPipeline.from_pretrained(work / "pipeline", safety_checker=None)
    pipe.unet.to(torch.float16)
    pipe.save_pretrained(staging / "pipeline", safe_serialization=True)
    for stage in ("evaluator", "icgen"):
        shutil.copytree(work / stage, staging / stage)
    sizes = {stage: _bytes(staging / stage) for stage in ("pipeline", "evaluator", "icgen")}
    if sum(sizes.values()) > SHIPPED_LIMIT:
        shutil.rmtree(staging)
        raise ValueError(f"the package would hold {sum(sizes.values()) / 2**20:.1f} MB ({sizes}), over the "
                         f"{SHIPPED_LIMIT / 2**20:.0f} MB limit")
    out.mkdir(parents=True, exist_ok=True)
    for stage in sizes:
        shutil.rmtree(out / stage, ignore_errors=True)
        (staging / stage).replace(out / stage)
    shutil.rmtree(staging)
    return sizes

"""The one training loop every method plugs into.

For a concept (a token, a class word or "style", a few images) and a method, the loop
minimises the denoising loss of Stable Diffusion (Rombach et al. 2022, eq. 2)

    L_diff = E ||mask * (eps - eps_theta(x_t, t, c))||^2

plus whatever terms the method adds (prior preservation, regularisers, distillation).
Latents of the augmented images are encoded once; the text conditioning is recomputed
each step only when the concept token is being trained. One ``Accelerator`` per process is
reused across tasks (accelerate keeps one global state per process, ``AcceleratorState``, that every
``Accelerator`` shares); under ``accelerate launch`` with several processes each
draws the same global batch, trains on its share of the rows and averages gradients with the others
(``accelerator.reduce``), so N processes train what one does with the same global batch. Checkpoints (safetensors + JSON, no pickle)
are written every ``checkpoint_every`` steps; ``resume=True`` continues from the latest
checkpoint, and only if it was made by the same run (method, settings, images, earlier
concepts: ``Checkpointer.fingerprint``).

Training stops with ``TrainingDivergedError`` (nothing saved) when the loss becomes NaN/Inf,
when the denoising loss rises far above the starting model's (measured on a few batches of
the concept's images before the first step), or when a trained tensor grows far beyond the
model's scale or stops being finite: a learning rate that diverges is caught even where the
loss stays finite (a huge token embedding is normalised away by the text encoder).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from museum.errors import MuseumError, TrainingDivergedError
from museum.methods.base import ConceptInfo, Method, TrainContext
from museum.models.loading import resolution
from museum.plumbing import kv, tokens
from museum.plumbing.objectives import (
    SDXLConditioning, concept_prompt, denoising_loss, diffusion_target, encode_prompts, noisy_batch,
)
from museum.store.atomic import atomic_dir
from museum.store.faults import fault_point
from museum.training import memory
from museum.training.data import encode_variants

_ACCELERATOR: Optional[Accelerator] = None
PRECISIONS = ("no", "fp16", "bf16")


def get_accelerator(mixed_precision: str | None = None) -> Accelerator:
    """The process's single Accelerator (accelerate keeps one global state per process).

    ``mixed_precision`` ("no", "fp16", "bf16") is fixed when the Accelerator is created (``accelerate
    launch --mixed_precision`` sets it through the environment); asking for another one later in the
    same process is refused, since accelerate cannot change it."""
    global _ACCELERATOR
    if mixed_precision is not None and mixed_precision not in PRECISIONS:
        raise MuseumError(f"--mixed-precision must be one of {', '.join(PRECISIONS)} (got {mixed_precision!r})")
    if _ACCELERATOR is None:
        # cpu=True without a GPU: several processes then form a gloo (MULTI_CPU) group under torchrun /
        # `accelerate launch --multi_gpu`, instead of each training alone
        _ACCELERATOR = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    elif mixed_precision is not None and mixed_precision != _ACCELERATOR.mixed_precision:
        raise MuseumError(f"this process already trains with mixed precision {_ACCELERATOR.mixed_precision!r} and "
                          f"accelerate cannot change it within a process; learn with --mixed-precision "
                          f"{mixed_precision} in a new process (each `museum learn` is one)")
    return _ACCELERATOR


@dataclass
class TrainOptions:
    """How to train on the hardware at hand, as users of diffusers' training scripts expect. None of these
    change what is learned beyond numerical precision."""

    mixed_precision: Optional[str] = None  # "no" | "fp16" | "bf16"; None: the process's Accelerator's ("no")
    gradient_checkpointing: bool = False  # recompute UNet block activations in backward (less memory, ~30% slower)
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit (1 byte per moment instead of 4); needs a CUDA GPU
    memory_estimate: bool = True  # print the estimate before training (when an ``echo`` is given)
    # under `accelerate launch`: True, the processes train this concept together (data parallel); False,
    # this process trains alone (``museum bench`` gives each process whole methods instead)
    data_parallel: bool = True

    def check(self, device: torch.device) -> None:
        """Refuse what this machine cannot do (the precision's name is checked by ``get_accelerator``)."""
        if self.mixed_precision == "fp16" and device.type == "cpu":
            raise MuseumError("--mixed-precision fp16 needs a GPU (fp16 autocast and its gradient scaler are GPU "
                              "features); on CPU use --mixed-precision bf16 (autocast) or no (fp32)")
        if self.use_8bit_adam:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise MuseumError("--use-8bit-adam needs bitsandbytes, which is not installed: `pip install "
                                  "bitsandbytes` (on a machine with a CUDA GPU), or train without --use-8bit-adam") \
                    from None
            if device.type != "cuda":
                raise MuseumError(f"--use-8bit-adam needs a CUDA GPU; this run trains on {device}")


def make_optimizer(groups: list[dict], use_8bit_adam: bool = False) -> torch.optim.Optimizer:
    if use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=0.0)
    return torch.optim.AdamW(groups, weight_decay=0.0)


@dataclass
class LearnResult:
    tensors: dict[str, torch.Tensor]  # stored with the concept (token embedding included)
    state: dict[str, torch.Tensor]  # the method's new shared state
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    terms: dict[str, list[float]] = field(default_factory=dict)  # each method loss term, per step it was added


@dataclass
class Checkpointer:
    """Step checkpoints in ``folder``: ``checkpoint-{step}/`` with trainable tensors and Adam moments."""

    folder: Optional[Path]
    every: int = 100
    keep: int = 2
    fingerprint: dict = field(default_factory=dict)  # what the run depends on; resume refuses a mismatch
    read_only: bool = False  # other processes of a data-parallel run read the main process's checkpoints

    def latest(self) -> Optional[Path]:
        if self.folder is None or not self.folder.is_dir():
            return None
        done = [p for p in self.folder.glob("checkpoint-*") if (p / "step.json").is_file()]
        return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)

    def save(self, step: int, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, params: list) -> None:
        if self.folder is None or self.read_only:
            return

        moments = {}
        for i, p in enumerate(params):
            st = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    moments[f"{i}.{key}"] = st[key].detach().cpu().contiguous()
            if "step" in st:
                moments[f"{i}.step"] = torch.as_tensor(st["step"]).reshape(1).float()
        fault_point("checkpoint.begin")
        with atomic_dir(self.folder / f"checkpoint-{step}") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
            fault_point("checkpoint.partial")
            save_file(moments or {"none": torch.zeros(1)}, tmp / "optimizer.safetensors")
            (tmp / "step.json").write_text(json.dumps({"step": step, "fingerprint": self.fingerprint}))
        for old in sorted(self.folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        fault_point("checkpoint.done")

    def check(self, path: Path) -> None:
        """Refuse to resume from a checkpoint another run (other settings, images or earlier concepts) made."""
        try:
            saved = json.loads((path / "step.json").read_text()).get("fingerprint", {})
        except (OSError, ValueError) as err:
            raise MuseumError(f"checkpoint {path} is unreadable ({err}); delete {self.folder} and learn without "
                              "--resume") from None
        changed = sorted(k for k in set(saved) | set(self.fingerprint)
                         if json.dumps(saved.get(k), sort_keys=True) != json.dumps(self.fingerprint.get(k), sort_keys=True))
        if changed:
            raise MuseumError(f"cannot resume: the checkpoint in {self.folder} was made with different "
                              f"{', '.join(changed)}; rerun with the same settings, or without --resume to start over")

    def load(self, path: Path, optimizer: torch.optim.Optimizer, params: list) -> tuple[int, dict[str, torch.Tensor]]:
        trainable = load_file(path / "trainable.safetensors")
        moments = load_file(path / "optimizer.safetensors")
        for i, p in enumerate(params):
            if f"{i}.exp_avg" in moments:
                optimizer.state[p] = {
                    "exp_avg": moments[f"{i}.exp_avg"].to(p.device),
                    "exp_avg_sq": moments[f"{i}.exp_avg_sq"].to(p.device),
                    "step": torch.tensor(float(moments[f"{i}.step"].item())),
                }
        return json.loads((path / "step.json").read_text())["step"], trainable


def train_concept(
    pipe,
    method: Method,
    concept: ConceptInfo,
    images,
    *,
    state: dict[str, torch.Tensor] | None = None,
    earlier: list[ConceptInfo] | None = None,
    cache_dir: Path | None = None,
    checkpoints: Checkpointer | None = None,
    resume: bool = False,
    variants: int = 8,
    flip: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    options: TrainOptions | None = None,
    echo: Callable[[str], None] | None = None,
) -> LearnResult:
    """Learn ``concept`` from PIL ``images`` with ``method``; returns what the museum stores.

    The token is added to ``pipe`` (and stays: it is the concept's); every UNet weight the
    method touched is restored afterwards, so the caller's base model is unchanged. ``options``:
    mixed precision (autocast; every weight, trainable ones included, stays fp32), gradient
    checkpointing, 8-bit Adam; ``echo`` receives the memory estimate and notes before training.
    """
    cfg = method.config
    options = options or TrainOptions()
    options.check(pipe.unet.device)
    accelerator = get_accelerator(options.mixed_precision)
    procs, rank = (accelerator.num_processes, accelerator.process_index) if options.data_parallel else (1, 0)
    if cfg.batch_size % procs:
        raise MuseumError(f"the batch ({cfg.batch_size}) is the global batch of {procs} processes and must divide "
                          f"evenly; pass --set batch_size={procs * max(1, cfg.batch_size // procs)}")
    local = slice(rank * cfg.batch_size // procs, (rank + 1) * cfg.batch_size // procs)  # this process's rows
    if rank:  # one process writes checkpoints and prints
        checkpoints = Checkpointer(checkpoints.folder, checkpoints.every, checkpoints.keep, checkpoints.fingerprint,
                                   read_only=True) if checkpoints is not None else None
        progress, echo, on_step = False, None, None
    checkpoints = checkpoints or Checkpointer(None)
    t_start = time.time()
    gen = torch.Generator().manual_seed(cfg.seed)
    unet, text_encoder, vae, scheduler = pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler

    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    w0 = kv.kv_weights(unet)
    encoders = [encoder for _, encoder in tokens.text_pairs(pipe)]  # two on SDXL
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)

    # SDXL: the token goes into both encoders (the first one's draw first: SD runs are unchanged)
    starts = [tokens.initial_vector(pipe, cfg.token_init, concept.class_word, gen, which) for which in range(len(encoders))]
    token_id = tokens.add_token(pipe, concept.token, *starts)
    row_ids = tokens.token_ids(pipe, concept.token)
    latents = encode_variants(vae, images, resolution(pipe), variants=variants, flip=flip and not concept.is_style,
                              seed=cfg.seed)
    prompt = concept_prompt(method, concept)
    sdxl = SDXLConditioning(pipe, resolution(pipe)) if len(encoders) == 2 else None
    if sdxl is not None:
        sdxl.pooled = encode_prompts(pipe, [prompt], pooled=True)[1].detach()
    torch.manual_seed(cfg.seed)  # adapters initialise from the global generator
    ctx = TrainContext(pipe=pipe, concept=concept, state=dict(state or {}), earlier=list(earlier or []),
                       accelerator=accelerator, cache_dir=cache_dir, latents=latents, prompt=prompt,
                       noise_scheduler=noise_scheduler, images=list(images))
    groups = method.setup(ctx)
    if method.wants_teacher(ctx):  # the model before this task (taken before a resume reloads its checkpoint)
        ctx.teacher = copy.deepcopy(unet).requires_grad_(False).eval()
    trains_token = cfg.token_lr > 0
    embedding = text_encoder.get_input_embeddings()
    embeddings = [encoder.get_input_embeddings() for encoder in encoders]
    hooks = [tokens.train_only_rows(e, [i]) for e, i in zip(embeddings, row_ids)] if trains_token else []
    if trains_token:
        groups = groups + [{"params": [e.weight for e in embeddings], "lr": cfg.token_lr, "weight_decay": 0.0}]
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError(f"method {method.name} trains nothing: check its config (lr, token_lr)")
    optimizer = make_optimizer(groups, options.use_8bit_adam)
    optimizer = accelerator.prepare(optimizer)
    if options.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if echo is not None and procs > 1:
        echo(f"data parallel: {procs} processes x {cfg.batch_size // procs} samples = global batch {cfg.batch_size} "
             f"({accelerator.distributed_type.value}, backend {accelerator.state.backend})")
    if echo is not None and options.memory_estimate:
        device = pipe.unet.device
        if device.type == "cpu" and not torch.cuda.is_available():
            echo(f"note: no GPU found: training on CPU in {'bf16 autocast' if accelerator.mixed_precision == 'bf16' else 'fp32'}")
        echo(memory.estimate(pipe, params, cfg.batch_size // procs, mixed_precision=accelerator.mixed_precision,
                             checkpointing=options.gradient_checkpointing,
                             adam_8bit=options.use_8bit_adam).describe(str(device)))

    start = 0
    latest = checkpoints.latest() if resume else None
    if latest is not None:
        checkpoints.check(latest)
        start, trainable = checkpoints.load(latest, optimizer, params)
        method.load_trainable_state(ctx, trainable)
        with torch.no_grad():
            for which, (e, i) in enumerate(zip(embeddings, row_ids)):
                e.weight[i] = trainable["token" + (tokens.SECOND if which else "")].to(e.weight.dtype)
    fixed_text = None
    if not trains_token:
        fixed_text, pooled = encode_prompts(pipe, [prompt], pooled=True)
        fixed_text = fixed_text.detach()
        if sdxl is not None:
            sdxl.pooled = pooled.detach()

    watch = _DivergenceWatch(pipe, params, embedding, token_id if trains_token else None, method, concept)
    watch.measure_baseline(pipe, latents, noise_scheduler, prompt, fixed_text, cfg.batch_size, cfg.seed)
    fault_point("train.start")
    losses: list[float] = []
    term_log: dict[str, list[float]] = {}
    bar = _progress(range(start, cfg.steps), progress, f"learning {concept.name} ({method.name})")
    try:
        for step in bar:
            gen.manual_seed(cfg.seed * 1_000_003 + step)  # per-step seeding: resume reproduces the run
            # every process draws the same global batch and trains on its own rows (data parallel)
            b = noisy_batch(latents, noise_scheduler, cfg.batch_size, gen, unet.device, unet.dtype)
            x0, mask, noise, t, noisy = (b[k][local] for k in ("x0", "mask", "noise", "t", "noisy"))
            # this process's share of the global batch's valid values (None: one process, its own count)
            valid = float(b["mask"].sum()) * x0.shape[1] / procs if procs > 1 else None
            if fixed_text is not None:
                text = fixed_text
            else:
                text, pooled = encode_prompts(pipe, [prompt], pooled=True)
                if sdxl is not None:
                    sdxl.pooled = pooled  # the UNet's pooled conditioning follows the training token too
            text = text.expand(len(x0), -1, -1)
            with accelerator.autocast():  # a no-op unless mixed precision was asked for
                pred = unet(noisy, t, text).sample
                loss_diff = denoising_loss(pred, diffusion_target(noise_scheduler, x0, noise, t), mask, valid)
                batch = dict(x0=x0, noise=noise, t=t, noisy=noisy, text=text, mask=mask, generator=gen, step=step,
                             scheduler=noise_scheduler, pred=pred)
                terms = method.loss_terms(ctx, batch)
                loss = loss_diff + sum(terms.values())
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"loss became {loss.item()} at step {step + 1} while learning {concept.name!r} with {method.name}; "
                    f"nothing was saved. Lower the learning rate (lr={cfg.lr}, token_lr={cfg.token_lr}) and try again")
            accelerator.backward(loss)
            if procs > 1:  # the mean gradient over processes: the gradient of the global batch
                for p in params:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_optimizer_step(ctx, batch)
            losses.append(loss.item())
            watch.check(step + 1, float(loss_diff.detach()))
            fault_point("train.step")
            for name, value in terms.items():
                term_log.setdefault(name, []).append(float(value.detach()))
            if progress and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if on_step is not None:
                on_step(step + 1, loss.item())
            if checkpoints.folder is not None and (step + 1) % checkpoints.every == 0 and step + 1 < cfg.steps:
                trainable = method.trainable_state(ctx)
                for which, (e, i) in enumerate(zip(embeddings, row_ids)):
                    trainable["token" + (tokens.SECOND if which else "")] = e.weight[i].detach().clone()
                checkpoints.save(step + 1, trainable, optimizer, params)
        concept_tensors, new_state = method.finish(ctx)
        concept_tensors = {**concept_tensors, **tokens.token_tensors(pipe, concept.token)}
        watch.check_result(concept_tensors, new_state)
        fault_point("train.finished")
    finally:
        if options.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        ctx.teacher = None
        method.teardown(ctx)
        for hook in hooks:
            hook.remove()
        for e in embeddings:
            e.weight.requires_grad_(False)
        if sdxl is not None:
            sdxl.remove()
        kv.remove_loras(unet)
        with torch.no_grad():
            for name, module in kv.kv_modules(unet).items():
                module.weight.copy_(w0[name])
        unet.requires_grad_(False)
    return LearnResult(concept_tensors, new_state, cfg.steps, time.time() - t_start, losses, term_log)


class _DivergenceWatch:
    """Stops a run whose loss or trained tensors blow up (see the module docstring)."""

    LOSS_GROWTH = 5.0  # mean denoising loss of the last WINDOW steps vs the starting model's
    WINDOW = 10
    BASELINE_BATCHES = 8
    SIZE_GROWTH = 100.0  # RMS of a trained tensor vs the model's own scale

    def __init__(self, pipe, params, embedding, token_id, method, concept):
        self.method, self.concept = method, concept
        self.losses: list[float] = []  # the denoising loss (method terms may rightly grow from 0)
        self.baseline = None
        self.embedding, self.token_id = embedding, token_id
        with torch.no_grad():
            rows = embedding.weight.detach().float()
            keep = torch.ones(len(rows), dtype=torch.bool)
            if token_id is not None:
                keep[token_id] = False
            self.token_limit = self.SIZE_GROWTH * float(rows[keep].pow(2).mean(1).sqrt().max())
            kv_scale = float(torch.cat([w.float().flatten() for w in kv.kv_weights(pipe.unet).values()])
                             .pow(2).mean().sqrt())
            self.limits = [(p, self.SIZE_GROWTH * max(_rms(p), kv_scale)) for p in params if p is not embedding.weight]

    def _fail(self, what: str, step: int | None = None) -> None:
        cfg = self.method.config
        at = f" at step {step}" if step is not None else ""
        raise TrainingDivergedError(
            f"training diverged{at} while learning {self.concept.name!r} with {self.method.name}: {what}; nothing was "
            f"saved. Lower the learning rate (lr={cfg.lr}, token_lr={cfg.token_lr}) and try again")

    @torch.no_grad()
    def measure_baseline(self, pipe, latents, noise_scheduler, prompt, fixed_text, batch_size: int, seed: int) -> None:
        """The starting model's denoising loss on the concept's images (own generator: training is unchanged)."""
        unet = pipe.unet
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 999_983)
        text = (fixed_text if fixed_text is not None else encode_prompts(pipe, [prompt])).expand(batch_size, -1, -1)
        values = []
        for _ in range(self.BASELINE_BATCHES):
            idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
            x0, mask = latents.sample(idx, gen)
            x0, mask = x0.to(unet.device, unet.dtype), mask.to(unet.device)
            noise = torch.randn(x0.shape, generator=gen).to(x0)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=gen).to(unet.device)
            pred = unet(noise_scheduler.add_noise(x0, noise, t), t, text).sample
            values.append(float(denoising_loss(pred, diffusion_target(noise_scheduler, x0, noise, t), mask)))
        self.baseline = sum(values) / len(values)

    @torch.no_grad()
    def check(self, step: int, loss_diff: float) -> None:
        losses, w = self.losses, self.WINDOW
        losses.append(loss_diff)
        if self.baseline is not None and len(losses) >= w:
            last = sum(losses[-w:]) / w
            if last > self.LOSS_GROWTH * self.baseline:
                self._fail(f"the denoising loss rose to {last:.3g} over the last {w} steps, from the starting "
                           f"model's {self.baseline:.3g}", step)
        if self.token_id is not None:
            size = _rms(self.embedding.weight[self.token_id])
            if not size <= self.token_limit:  # also catches NaN
                self._fail(f"the token embedding grew to RMS {size:.3g} (the vocabulary's largest is "
                           f"{self.token_limit / self.SIZE_GROWTH:.3g})", step)
        for p, limit in self.limits:
            size = _rms(p)
            if not size <= limit:
                self._fail(f"a trained tensor of shape {tuple(p.shape)} grew to RMS {size:.3g} "
                           f"(limit {limit:.3g}, {self.SIZE_GROWTH:.0f}x the model's scale)", step)

    def check_result(self, tensors: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
        for name, t in {**tensors, **state}.items():
            if not torch.isfinite(t).all():
                self._fail(f"the learned tensor {name} has NaN/Inf values")


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt()) if t.numel() else 0.0


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


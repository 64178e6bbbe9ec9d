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
                import bitsandbytes  # noqa: F401  (optional: only --use-8bit-adam needs it)
            except ImportError:
                raise MuseumError("--use-8bit-adam needs bitsandbytes, which is not installed: `pip install "
                                  "bitsandbytes` (on a machine with a CUDA GPU), or train without --use-8bit-adam") \
                    from None
            if device.type != "cuda":
                raise MuseumError(f"--use-8bit-adam needs a CUDA GPU; this run trains on {device}")


def make_optimizer(groups: list[dict], use_8bit_adam: bool = False) -> torch.optim.Optimizer:
    if use_8bit_adam:
        import bitsandbytes as bnb  # optional, checked by TrainOptions.check

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
    options = options or TrainOptions()
    options.check(pipe.unet.device)
    t_start = time.time()
    run = _TrainingRun(pipe, method, concept, images, state=state, earlier=earlier, cache_dir=cache_dir,
                       variants=variants, flip=flip, options=options)
    if run.rank:  # one process writes checkpoints and prints
        checkpoints = Checkpointer(checkpoints.folder, checkpoints.every, checkpoints.keep, checkpoints.fingerprint,
                                   read_only=True) if checkpoints is not None else None
        progress, echo, on_step = False, None, None
    checkpoints = checkpoints or Checkpointer(None)
    run.install(echo)
    start = run.resume(checkpoints) if resume else 0
    run.fix_text()
    fault_point("train.start")
    try:
        _steps(run, start, progress, f"learning {concept.name} ({method.name})", on_step, checkpoints)
        concept_tensors, new_state = run.finish()
        fault_point("train.finished")
    finally:
        run.teardown()
    return LearnResult(concept_tensors, new_state, run.cfg.steps, time.time() - t_start, run.losses, run.term_log)


def _steps(run: "_TrainingRun", start: int, progress: bool, desc: str, on_step, checkpoints: "Checkpointer") -> None:
    """The training loop: steps ``start`` .. the config's, with the progress bar, ``on_step`` and checkpoints."""
    bar = _progress(range(start, run.cfg.steps), progress, desc)
    for step in bar:
        loss = run.step(step)
        fault_point("train.step")
        if progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss:.4f}")
        if on_step is not None:
            on_step(step + 1, loss)
        if checkpoints.folder is not None and (step + 1) % checkpoints.every == 0 and step + 1 < run.cfg.steps:
            checkpoints.save(step + 1, run.trainable(), run.optimizer, run.params)


def train_together(pipe, method: Method, concepts: list[ConceptInfo], images: list, *,
                   state: dict[str, torch.Tensor] | None = None, earlier: list[ConceptInfo] | None = None,
                   cache_dir: Path | None = None, progress: bool = True,
                   options: TrainOptions | None = None) -> list[LearnResult]:
    """Learn several ``concepts`` in one run (``images[k]``: concept k's PIL images) with a method that can
    (``Method.joint``): each concept keeps its own token, and every step trains on one concept's batch with its own
    prompt, the concepts in turn (joint training: Custom Diffusion, Kumari et al. 2023, sec. 3.2; the benchmark's
    joint oracle). No checkpoints: an interrupted run starts again. One result per concept, all with the method's
    one new state; each concept's tensors hold what the run trained and its own token."""
    if not type(method).joint:
        raise MuseumError(f"{method.name} cannot learn several concepts at once (see `museum methods`)")
    if len({c.name for c in concepts}) != len(concepts) or len(concepts) != len(images) or not concepts:
        raise MuseumError("learning together needs distinct concepts, each with its own images")
    options = options or TrainOptions()
    options.check(pipe.unet.device)
    t_start = time.time()
    run = _JointRun(pipe, method, concepts, images, state=state, earlier=earlier, cache_dir=cache_dir, variants=8,
                    flip=False, options=options)
    run.install(None)
    run.fix_text()
    try:
        _steps(run, 0, progress, f"learning {', '.join(c.name for c in concepts)} together ({method.name})", None,
               Checkpointer(None))
        tensors, new_state = run.finish_all()
    finally:
        run.teardown()
    seconds = time.time() - t_start
    return [LearnResult(t, new_state, run.cfg.steps, seconds, run.losses, run.term_log) for t in tensors]


class _TrainingRun:
    """One concept's training, in the order the loop needs it: setup (the token, the cached latents, the method's
    parameters, the optimizer) in ``__init__`` and :meth:`install`, :meth:`resume` from a checkpoint, one
    :meth:`step` at a time, :meth:`finish` and :meth:`teardown` (which restores the UNet)."""

    def __init__(self, pipe, method: Method, concept: ConceptInfo, images, *, state, earlier, cache_dir, variants: int,
                 flip: bool, options: TrainOptions):
        self.pipe, self.method, self.concept, self.options = pipe, method, concept, options
        self.cfg = cfg = method.config
        self.accelerator = accelerator = get_accelerator(options.mixed_precision)
        procs, rank = (accelerator.num_processes, accelerator.process_index) if options.data_parallel else (1, 0)
        if cfg.batch_size % procs:
            raise MuseumError(f"the batch ({cfg.batch_size}) is the global batch of {procs} processes and must "
                              f"divide evenly; pass --set batch_size={procs * max(1, cfg.batch_size // procs)}")
        self.procs, self.rank = procs, rank
        self.local = slice(rank * cfg.batch_size // procs, (rank + 1) * cfg.batch_size // procs)  # this process's rows
        self.gen = torch.Generator().manual_seed(cfg.seed)
        unet, vae = pipe.unet, pipe.vae
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.w0 = kv.kv_weights(unet)
        encoders = [encoder for _, encoder in tokens.text_pairs(pipe)]  # two on SDXL
        for module in (unet, vae, *encoders):
            module.requires_grad_(False)
        self.variants, self.flip = variants, flip
        self.token_id, self.row_ids, self.latents, self.prompt = self._concept_data(concept, images)
        self.sdxl = SDXLConditioning(pipe, resolution(pipe)) if len(encoders) == 2 else None
        if self.sdxl is not None:
            self.sdxl.pooled = encode_prompts(pipe, [self.prompt], pooled=True)[1].detach()
        self.embeddings = [encoder.get_input_embeddings() for encoder in encoders]
        self.ctx = TrainContext(pipe=pipe, concept=concept, state=dict(state or {}), earlier=list(earlier or []),
                                accelerator=accelerator, cache_dir=cache_dir, latents=self.latents,
                                prompt=self.prompt, noise_scheduler=self.noise_scheduler, images=list(images))
        self.trains_token = cfg.token_lr > 0
        self.hooks: list = []
        self.fixed_text = None
        self.losses: list[float] = []
        self.term_log: dict[str, list[float]] = {}

    def _concept_data(self, concept: ConceptInfo, images) -> tuple:
        """The concept's token added to the pipeline and its images encoded: (token id, its row in each text
        encoder, latents, training prompt). SDXL: the token goes into both encoders (the first one's draw first: SD
        runs are unchanged)."""
        pipe, cfg = self.pipe, self.cfg
        starts = [tokens.initial_vector(pipe, cfg.token_init, concept.class_word, self.gen, which)
                  for which in range(len(tokens.text_pairs(pipe)))]
        token_id = tokens.add_token(pipe, concept.token, *starts)
        latents = encode_variants(pipe.vae, images, resolution(pipe), variants=self.variants,
                                  flip=self.flip and not concept.is_style, seed=cfg.seed)
        return token_id, tokens.token_ids(pipe, concept.token), latents, concept_prompt(self.method, concept)

    def install(self, echo: Callable[[str], None] | None) -> None:
        """The method's parameters, the frozen teacher it asks for, the token's rows and the optimizer; ``echo``
        receives the data-parallel note and the memory estimate."""
        cfg, method, ctx, unet = self.cfg, self.method, self.ctx, self.pipe.unet
        torch.manual_seed(cfg.seed)  # adapters initialise from the global generator
        groups = method.setup(ctx)
        if method.wants_teacher(ctx):  # the model before this task (taken before a resume reloads its checkpoint)
            ctx.teacher = copy.deepcopy(unet).requires_grad_(False).eval()
        if self.trains_token:
            self.hooks = [tokens.train_only_rows(e, [i]) for e, i in zip(self.embeddings, self.row_ids)]
            groups = groups + [{"params": [e.weight for e in self.embeddings], "lr": cfg.token_lr,
                                "weight_decay": 0.0}]
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise ValueError(f"method {method.name} trains nothing: check its config (lr, token_lr)")
        self.optimizer = self.accelerator.prepare(make_optimizer(groups, self.options.use_8bit_adam))
        if self.options.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if echo is not None:
            self._announce(echo)

    def _announce(self, echo: Callable[[str], None]) -> None:
        cfg, accelerator, procs, options = self.cfg, self.accelerator, self.procs, self.options
        if procs > 1:
            echo(f"data parallel: {procs} processes x {cfg.batch_size // procs} samples = global batch "
                 f"{cfg.batch_size} ({accelerator.distributed_type.value}, backend {accelerator.state.backend})")
        if options.memory_estimate:
            device = self.pipe.unet.device
            if device.type == "cpu" and not torch.cuda.is_available():
                echo("note: no GPU found: training on CPU in "
                     f"{'bf16 autocast' if accelerator.mixed_precision == 'bf16' else 'fp32'}")
            echo(memory.estimate(self.pipe, self.params, cfg.batch_size // procs,
                                 mixed_precision=accelerator.mixed_precision,
                                 checkpointing=options.gradient_checkpointing,
                                 adam_8bit=options.use_8bit_adam).describe(str(device)))

    def resume(self, checkpoints: Checkpointer) -> int:
        """Continue from the latest checkpoint, if there is one; returns the step to start from."""
        latest = checkpoints.latest()
        if latest is None:
            return 0
        checkpoints.check(latest)
        start, trainable = checkpoints.load(latest, self.optimizer, self.params)
        self.method.load_trainable_state(self.ctx, trainable)
        with torch.no_grad():
            for which, (e, i) in enumerate(zip(self.embeddings, self.row_ids)):
                e.weight[i] = trainable["token" + (tokens.SECOND if which else "")].to(e.weight.dtype)
        return start

    def fix_text(self) -> None:
        """Encode the prompt once when the token does not train, and measure the divergence baseline."""
        pipe, cfg = self.pipe, self.cfg
        if not self.trains_token:
            fixed_text, pooled = encode_prompts(pipe, [self.prompt], pooled=True)
            self.fixed_text = fixed_text.detach()
            if self.sdxl is not None:
                self.sdxl.pooled = pooled.detach()
        self.watch = _DivergenceWatch(pipe, self.params, pipe.text_encoder.get_input_embeddings(),
                                      self.token_id if self.trains_token else None, self.method, self.concept)
        self.watch.measure_baseline(pipe, self.latents, self.noise_scheduler, self.prompt, self.fixed_text,
                                    cfg.batch_size, cfg.seed)

    def step(self, step: int) -> float:
        """One optimizer step (0-based ``step``); returns its loss."""
        cfg, method, pipe, unet, procs = self.cfg, self.method, self.pipe, self.pipe.unet, self.procs
        self.gen.manual_seed(cfg.seed * 1_000_003 + step)  # per-step seeding: resume reproduces the run
        # every process draws the same global batch and trains on its own rows (data parallel)
        b = noisy_batch(self.latents, self.noise_scheduler, cfg.batch_size, self.gen, unet.device, unet.dtype)
        x0, mask, noise, t, noisy = (b[k][self.local] for k in ("x0", "mask", "noise", "t", "noisy"))
        # this process's share of the global batch's valid values (None: one process, its own count)
        valid = float(b["mask"].sum()) * x0.shape[1] / procs if procs > 1 else None
        if self.fixed_text is not None:
            text = self.fixed_text
        else:
            text, pooled = encode_prompts(pipe, [self.prompt], pooled=True)
            if self.sdxl is not None:
                self.sdxl.pooled = pooled  # the UNet's pooled conditioning follows the training token too
        text = text.expand(len(x0), -1, -1)
        with self.accelerator.autocast():  # a no-op unless mixed precision was asked for
            pred = unet(noisy, t, text).sample
            loss_diff = denoising_loss(pred, diffusion_target(self.noise_scheduler, x0, noise, t), mask, valid)
            batch = dict(x0=x0, noise=noise, t=t, noisy=noisy, text=text, mask=mask, generator=self.gen, step=step,
                         scheduler=self.noise_scheduler, pred=pred)
            terms = method.loss_terms(self.ctx, batch)
            loss = loss_diff + sum(terms.values())
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"loss became {loss.item()} at step {step + 1} while learning {self.concept.name!r} with "
                f"{method.name}; nothing was saved. Lower the learning rate (lr={cfg.lr}, token_lr={cfg.token_lr}) "
                "and try again")
        self.accelerator.backward(loss)
        if procs > 1:  # the mean gradient over processes: the gradient of the global batch
            for p in self.params:
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(self.ctx, batch)
        self.losses.append(loss.item())
        self.watch.check(step + 1, float(loss_diff.detach()))
        for name, value in terms.items():
            self.term_log.setdefault(name, []).append(float(value.detach()))
        return loss.item()

    def trainable(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the method's trained tensors and the token's rows."""
        trainable = self.method.trainable_state(self.ctx)
        for which, (e, i) in enumerate(zip(self.embeddings, self.row_ids)):
            trainable["token" + (tokens.SECOND if which else "")] = e.weight[i].detach().clone()
        return trainable

    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(The concept's tensors, the token included; the method's new shared state), checked to be finite."""
        concept_tensors, new_state = self.method.finish(self.ctx)
        concept_tensors = {**concept_tensors, **tokens.token_tensors(self.pipe, self.concept.token)}
        self.watch.check_result(concept_tensors, new_state)
        return concept_tensors, new_state

    def teardown(self) -> None:
        """Undo everything the run installed; the token stays (it is the concept's)."""
        unet = self.pipe.unet
        if self.options.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        self.ctx.teacher = None
        self.method.teardown(self.ctx)
        for hook in self.hooks:
            hook.remove()
        for e in self.embeddings:
            e.weight.requires_grad_(False)
        if self.sdxl is not None:
            self.sdxl.remove()
        kv.remove_loras(unet)
        with torch.no_grad():
            for name, module in kv.kv_modules(unet).items():
                module.weight.copy_(self.w0[name])
        unet.requires_grad_(False)


class _JointRun(_TrainingRun):
    """Several concepts in one run (:func:`train_together`): every concept's token is added and trained, and step s
    trains on the batch of concept s mod K with its prompt; the method sees every concept in ``ctx.together``."""

    def __init__(self, pipe, method: Method, concepts: list[ConceptInfo], images: list, **kw):
        super().__init__(pipe, method, concepts[0], images[0], **kw)
        if not self.trains_token:
            raise MuseumError("learning several concepts together trains their tokens: token_lr must be above 0")
        self.parts = [(concepts[0], self.token_id, self.row_ids, self.latents, self.prompt)]
        self.parts += [(c, *self._concept_data(c, ims)) for c, ims in zip(concepts[1:], images[1:])]
        self.ctx.together = list(concepts)
        self.ctx.images = [im for ims in images for im in ims]

    def install(self, echo: Callable[[str], None] | None) -> None:
        super().install(echo)
        for hook in self.hooks:  # every concept's rows train, not only the first's
            hook.remove()
        self.hooks = [tokens.train_only_rows(e, [part[2][which] for part in self.parts])
                      for which, e in enumerate(self.embeddings)]

    def step(self, step: int) -> float:
        concept, self.token_id, self.row_ids, self.latents, self.prompt = self.parts[step % len(self.parts)]
        self.concept = self.ctx.concept = concept
        self.ctx.latents, self.ctx.prompt = self.latents, self.prompt
        return super().step(step)

    def finish_all(self) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """(Each concept's tensors: what the method keeps of the run and the concept's token; the new state.)"""
        shared, new_state = self.method.finish(self.ctx)
        out = [{**shared, **tokens.token_tensors(self.pipe, part[0].token)} for part in self.parts]
        for tensors in out:
            self.watch.check_result(tensors, new_state)
        return out, new_state


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


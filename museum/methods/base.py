"""The interface every customization method implements, and the registry of methods by name.

A method is a small class with a config dataclass. The trainer (``museum.training``) owns
the loop; a method only says

* which parameters it adds and trains (:meth:`Method.setup`),
* how a concept is named in a prompt (:meth:`Method.phrase`),
* which loss terms it adds to the denoising loss (:meth:`Method.loss_terms`), optionally against
  a frozen copy of the model from before the task (:meth:`Method.wants_teacher`),
* what it updates outside the optimizer after each step (:meth:`Method.after_optimizer_step`),
* what it stores per concept and across tasks (:meth:`Method.finish`),
* how its stored tensors change the UNet at generation time (:meth:`Method.kv_deltas`),
* which settings it reads at generation time (:attr:`Method.generation_options`, applied by
  :meth:`Method.generation_settings`; ``museum generate``, ``Museum.generate(options=...)`` and the benchmark read
  them from here), what its export writes besides the token and K/V deltas (:meth:`Method.export_extras`), and
  for AUTOMATIC1111/ComfyUI files why it has no LoRA form (:attr:`Method.lora_export_why`) or what they leave out
  (:meth:`Method.webui_leaves_out`),
* what a concept costs at a given model size (:meth:`Method.cost`; ``scripts/gpu_estimates.py`` applies it to
  Stable Diffusion 1.5's layer shapes for docs/GPU.md, tests/test_real_sd.py checks it against real runs).

Add a method by writing one module in this folder with a ``@register`` class: ``museum.methods`` imports
every module of the folder, so nothing else lists it.
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Iterator

import torch

from museum.errors import MuseumError
from museum.plumbing.kv import applied_deltas

METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method available by ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    import museum.methods  # noqa: F401  (imports every module of the package: each method registers itself)

    return sorted(METHODS)


#: base families whose defaults are the papers' Stable Diffusion settings (``MethodConfig.SD15``)
SD_FAMILIES = ("sd1", "sd2", "sdxl")


def family_of(unet_config: dict) -> str:
    """The base family of a UNet config: "sdxl" (added text/time conditioning, 2048-wide text), "sd2"
    (1024-wide text), "sd1" (768-wide text), else "small" (the embedded model, tiny test models: Museum's
    own defaults)."""
    width = unet_config.get("cross_attention_dim")
    width = max(width) if isinstance(width, (list, tuple)) else width
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl" if width == 2048 else "small"
    return {768: "sd1", 1024: "sd2"}.get(width, "small")


def get_method(name: str, family: str = "small", **overrides) -> "Method":
    """Instantiate a registered method with its defaults for the base ``family`` (``family_of``: the papers'
    SD settings for SD-size bases, Museum's own for small ones) updated by ``overrides``."""
    method_names()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    defaults = dict(cls.config_class.SD15) if family in SD_FAMILIES else {}
    return cls(cls.config_class.from_dict({**defaults, **{k: v for k, v in overrides.items() if v is not None}}))


def methods_with_setting(key: str) -> list[str]:
    """The methods whose config has the setting ``key`` (e.g. ``ip_adapter``: the ones that keep image context)."""
    return [name for name in method_names() if key in {f.name for f in fields(METHODS[name].config_class)}]


def parse_setting(item: str) -> tuple[str, Any]:
    """A ``--set KEY=VALUE`` argument as (key, value), the value a bool, int, float or else the string itself."""
    key, eq, text = item.partition("=")
    key, text = key.strip(), text.strip()
    if not eq or not key:
        raise ValueError(f"--set takes KEY=VALUE, e.g. --set lr=1e-4 (got {item!r})")
    if text.lower() in ("true", "false"):
        return key, text.lower() == "true"
    for kind in (int, float):
        try:
            return key, kind(text)
        except ValueError:
            pass
    return key, text


@dataclass
class MethodConfig:
    """Settings every method has. Defaults are tuned for the embedded model; ``SD15`` holds the papers'
    Stable Diffusion settings, used automatically on SD-1.x/2.x/XL bases (``get_method(family=...)``)."""

    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-3  # learning rate of the method's UNet parameters
    token_lr: float = 5e-3  # learning rate of the concept's token embedding
    token_init: str = "class"  # "class": from the class word (textual inversion, Custom Diffusion); "random"
    class_word_in_prompt: bool = True  # "a <tok> circle" (True) or "a <tok>" (False, C-LoRA)
    seed: int = 0

    SD15: ClassVar[dict] = {}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no setting(s) {unknown}; settings: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GenerationOption:
    """A setting a method reads at generation time, declared on the method class (:attr:`Method.generation_options`):
    ``Museum.generate(options={name: value})`` takes it by ``name``, ``museum generate`` as :attr:`flag`."""

    name: str  # e.g. "gate_bias"
    help: str
    config_key: str = ""  # the concept setting it overrides at generation time, if any (Perfusion's "beta")
    per_concept: bool = False  # values by concept name, {name: value} (the CLI's repeatable NAME=X)
    minimum: float | None = None
    inclusive: bool = True  # the minimum itself is allowed
    swept: bool = False  # the benchmark draws every concept again at each of its ``gate_betas`` (the gate curve)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: float | dict[str, float]) -> None:
        """Refuse a value below the minimum with a clear error."""
        for v in value.values() if isinstance(value, dict) else [value]:
            if self.minimum is not None and (v < self.minimum or (v == self.minimum and not self.inclusive)):
                raise MuseumError(f"{self.flag} must be {'>=' if self.inclusive else '>'} {self.minimum:g} (got {v})")


@contextmanager
def generation_settings(options: dict[str, Any]) -> Iterator[None]:
    """Every registered method's generation settings for ``options`` (option name -> value, None: the method's
    default) applied inside the block; an option no method declares is an error naming those that exist."""
    declared = {o.name: (cls, o) for cls in METHODS.values() for o in cls.generation_options}
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise MuseumError(f"no method has the generation option(s) {', '.join(unknown)}; options: "
                          f"{', '.join(sorted(declared)) or '(none)'}")
    by_method: dict[type[Method], dict[str, Any]] = {}
    for name, value in options.items():
        if value is not None:
            cls, option = declared[name]
            option.check(value)
            by_method.setdefault(cls, {})[name] = value
    with ExitStack() as stack:
        for cls, values in by_method.items():
            stack.enter_context(cls.generation_settings(**values))
        yield


@dataclass
class ConceptCost:
    """What one concept costs at a model size (:meth:`Method.cost`)."""

    concept_values: int  # float32 values stored with each concept (token included)
    state_values: int  # float32 values the museum keeps for the method as a whole (shared LoRA, Fisher)
    trained_values: int  # values the optimizer updates (the token's row counted once, not the table)
    passes_per_step: float  # UNet sample passes (forward + backward of one sample) per training step
    once_forward_passes: float  # UNet forward-only sample passes done once per concept (class images, Fisher)
    added_values: int  # trained values added to the model as new parameters (LoRA factors; not the model's own
    # weights that Custom Diffusion trains in place, nor the token's row of the embedding table)
    batch_samples: int  # samples in a training step's batch, whose activations backward keeps (Custom Diffusion's
    # prior images included; a distillation's extra passes are not counted)


def lora_values(kv: dict[str, tuple[int, int]], rank: int) -> int:
    """Values of a rank-``rank`` LoRA on every K/V projection of ``kv`` (``{module: (out, in)}``)."""
    return sum(rank * (out + inp) for out, inp in kv.values())


@dataclass
class ConceptInfo:
    """What a method knows about the concept being learned or generated."""

    name: str
    token: str
    class_word: str  # the superclass word, or "style"
    is_style: bool
    task_index: int = 0
    method: str = ""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # stored per-concept tensors (generation)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainContext:
    """Handed to a method during training."""

    pipe: Any
    concept: ConceptInfo
    state: dict[str, torch.Tensor]  # the method's shared state before this task (empty on the first task)
    earlier: list[ConceptInfo]  # concepts learned before this one, by any method, with their tokens
    accelerator: Any
    cache_dir: Any  # a folder the method may cache derived data in (class images, covariances)
    # set by the trainer before :meth:`Method.setup`:
    latents: Any = None  # the task's images as cached latents (``museum.training.data.LatentSet``)
    prompt: str = ""  # the training prompt, e.g. "<neon> style"
    noise_scheduler: Any = None  # the DDPM scheduler training noises with
    images: Any = None  # the task's images (PIL), for what a method keeps derived from them (lfs: context embeddings)
    # set by the trainer right after :meth:`Method.setup` when :meth:`Method.wants_teacher` says so:
    teacher: Any = None  # a frozen copy of the UNet as setup left it: the model before this task
    # set by ``museum.training.trainer.train_together``: every concept of a joint run (empty for one concept)
    together: list = field(default_factory=list)


class Method:
    """Base class. Subclasses set ``name``, ``config_class`` and override what they need."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: how ``museum export --format diffusers`` writes this method's concepts:
    #: "textual_inversion", "lora", "custom_diffusion" or "museum" (needs Museum's own loader)
    export_format: ClassVar[str] = "textual_inversion"
    #: why ``museum export --format kohya`` cannot write its concepts' effect as a LoRA ("" where it can: a K/V delta)
    lora_export_why: ClassVar[str] = ""
    #: can one concept be removed without retraining the others?
    removable: ClassVar[bool] = True
    removable_why: ClassVar[str] = ""
    #: does it work on bases with two text encoders (SDXL)?
    two_text_encoders: ClassVar[bool] = True
    #: can it learn several concepts in one run, each with its own token (``train_together``; the benchmark's joint
    #: oracle)? Only where the result is something the method stores: one shared state, or per-concept tensors that
    #: can all hold the run's
    joint: ClassVar[bool] = False
    #: are its concepts independent of one another? A concept's training and its drawing alone (a prompt naming only
    #: it) do not depend on the other concepts in the museum: learned in a sequence it is bit for bit what it is
    #: learned alone from the base model with the same seed (tests/test_method_matrix.py checks it; the benchmark
    #: then reads its upper bound from the sequence instead of learning every concept again)
    independent: ClassVar[bool] = False
    #: settings it reads at generation time, applied by :meth:`generation_settings`
    generation_options: ClassVar[tuple[GenerationOption, ...]] = ()

    def __init__(self, config: MethodConfig | None = None):
        self.config = config or self.config_class()

    @classmethod
    def summary(cls) -> str:
        """What the method is, on one line: the first paragraph of its docstring (or of its module's)."""
        doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
        return " ".join(doc.strip().split("\n\n")[0].split())

    # ---------------------------------------------------------------- prompts
    def phrase(self, concept: ConceptInfo) -> str:
        """How the concept is named in prompts: "<tok> circle", "<tok>" or, for styles, "<tok>"."""
        if concept.is_style or not self.config.class_word_in_prompt:
            return concept.token
        return f"{concept.token} {concept.class_word}"

    # ---------------------------------------------------------------- training
    def setup(self, ctx: TrainContext) -> list[dict]:
        """Install trainable parameters into ``ctx.pipe``; return optimizer param groups (token excluded)."""
        return []

    def wants_teacher(self, ctx: TrainContext) -> bool:
        """Whether this task needs ``ctx.teacher``, a frozen copy of the UNet taken right after
        :meth:`setup` (before any step, and before a resumed run reloads its checkpoint): the model
        before this task, for distillation (LwF, MuseumMaker). The text encoder is not copied: only
        the new token's row trains, so earlier prompts encode the same for teacher and student."""
        return False

    def loss_terms(self, ctx: TrainContext, batch: dict) -> dict[str, torch.Tensor]:
        """Extra weighted loss terms added to the denoising loss (name -> scalar). The trainer logs
        each term's value per step (``LearnResult.terms``); leave a term out when its weight is 0."""
        return {}

    def after_optimizer_step(self, ctx: TrainContext, batch: dict) -> None:
        """Called after every optimizer step with the step's ``batch`` (as :meth:`loss_terms` saw it): for state a
        method updates without gradients (Perfusion's moving average of i*)."""

    def finish(self, ctx: TrainContext) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """After training: (tensors stored with the concept, the method's new shared state).
        The end-of-task hook: the trained parameters are still installed and ``ctx.latents`` holds the
        task's data, so a method may make passes over it here (e.g. EWC's Fisher estimate,
        with ``museum.plumbing.objectives.noisy_batch``).
        Must leave ``ctx.pipe.unet`` as it found it (the trainer checks)."""
        return {}, dict(ctx.state)

    def teardown(self, ctx: TrainContext) -> None:
        """Undo what :meth:`setup` installed besides K/V weights and peft adapters (the trainer
        restores those itself); called even when training fails."""

    def trainable_state(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        """The trained tensors, for checkpoints (resume)."""
        return {}

    def load_trainable_state(self, ctx: TrainContext, tensors: dict[str, torch.Tensor]) -> None:
        pass

    # ---------------------------------------------------------------- cost
    @classmethod
    def cost(cls, kv: dict[str, tuple[int, int]], width: int, config: dict) -> ConceptCost:
        """What a concept costs with ``config`` (``MethodConfig.to_dict()``) on a model whose cross-attention K/V
        projections are ``kv`` (``{module: (out, in)}``) and whose text embeddings are ``width`` wide. The formulas
        follow what :meth:`finish` returns and the museum keeps. The default: the token alone (textual inversion)."""
        b = config.get("batch_size", 1)
        return ConceptCost(width, 0, width, b, 0, added_values=0, batch_samples=b)

    # ---------------------------------------------------------------- generation
    @classmethod
    def generation_settings(cls, **values) -> ContextManager:
        """Apply values of :attr:`generation_options` (by name; absent ones keep their defaults) to everything this
        method draws inside the block."""
        return nullcontext()

    @classmethod
    def swept_option(cls) -> GenerationOption | None:
        """The generation option the benchmark sweeps (its gate curve), if the method has one."""
        return next((o for o in cls.generation_options if o.swept), None)

    def activate(self, pipe, concepts: list[ConceptInfo], active: list[ConceptInfo],
                 state: dict[str, torch.Tensor]) -> ContextManager:
        """Install this method's effect on ``pipe`` for a prompt naming ``active`` of its ``concepts``,
        undone on exit. The default applies :meth:`kv_deltas`; methods that change the attention
        computation itself (e.g. Perfusion's gated edit) override this."""
        return applied_deltas(pipe.unet, self.kv_deltas(concepts, active, state, pipe))

    def kv_deltas(self, concepts: list[ConceptInfo], active: list[ConceptInfo], state: dict[str, torch.Tensor],
                  pipe) -> dict[str, torch.Tensor]:
        """Weight deltas (module name -> dW) this method adds to the UNet when ``active`` of its
        ``concepts`` appear in a prompt. Textual inversion adds none."""
        return {}

    # ---------------------------------------------------------------- export
    @classmethod
    def export_extras(cls, concepts: list[ConceptInfo], folder: Path, out: Path) -> tuple[list[str], dict[str, Any]]:
        """What an export of ``concepts`` (this method's ones, maybe none) needs besides their tokens and K/V deltas:
        files written into ``folder`` (which becomes ``out``); returns the lines that load them (after
        ``pipe = ...``) and the fields they add to museum_export.json."""
        return [], {}

    @classmethod
    def webui_leaves_out(cls, concepts: list[ConceptInfo]) -> str:
        """What the AUTOMATIC1111/ComfyUI files of ``concepts`` (this method's ones; ``museum export --format kohya``:
        a LoRA and the tokens) cannot carry of how Museum draws them, told to the user ("": nothing)."""
        return ""

"""LFS-Diffusion (Song, Yang, Yang and Lin 2024, "Lifelong few-shot customization of text-to-image
diffusion"): data-free knowledge distillation against relevant-concept forgetting.

No public code; Museum's reading of the paper (METHODS.md sec. 6). Every task continues ONE LoRA on
the cross-attention K/V projections (museum state, as ``finetune``) and adds a token initialised
from the class word, trained in the prompt "a <tok> circle". Learning "my circle" this way also
changes what plain "circle" prompts draw (relevant-concept forgetting) and, through the shared
LoRA, what earlier concepts draw. While task t is learned, the frozen model from before task t
(``TrainContext.teacher``) is the teacher, and

    L = L_diff("a <tok_t> circle", task images)
        + distill_weight * E_{c in P_t, (x_t, t) in B} ||eps_theta(x_t, t, c) - eps_theta_{t-1}(x_t, t, c)||^2

(the paper's data-free distillation objective: the new model's noise prediction matched to the
old one's on inputs that need no data). P_t: ``num_prompts`` world captions whose object is the new
concept's class word ("a large red circle on a sand background") and ``num_prompts`` varied prompts
per earlier concept of this method, named by its token ("a <sunburst> circle on a grass background";
tokens are kept, images are not). B: inputs made from noise only, x_T ~ N(0, I) and the x_t the
teacher reaches from it in its first ``teacher_steps`` DDIM steps of an ``inference_steps`` schedule
(``museum.methods.distill.DataFreeDistillation``). No earlier image and no extra real image is read.

ICGen (the paper's in-context generation, ``museum/models/icgen.py``): each concept keeps the image-encoder embeddings
of its training images (``context``, not the images) and is drawn with them as context (``icgen.context_scale``,
``museum generate --context-scale``). The adapter is the embedded model's shipped one, or for a user's Stable
Diffusion model an existing IP-Adapter from a local folder (``ip_adapter``, ``museum learn --ip-adapter DIR``;
its CLIP image encoder makes the embeddings; folder and weight file are recorded in the concept's config and
loaded again with diffusers' ``load_ip_adapter`` to draw it). Without a fitting adapter the concept keeps no
context, and learning says so. With ``learn_with_context`` the token and LoRA are also learned with the context
present (the frozen adapter installed for the task; the distillation runs at context scale 0); off by default,
as measured on the shipped embedded model: learned with the context present, concepts draw far less like themselves
at scale 1 (image alignment sunburst 0.032 against 0.308, smiley 0.018 against 0.288; text alignment lower too;
METHODS.md, docs/icgen-learn-with-context.json).
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from museum.errors import MuseumError
from museum.methods.base import ConceptCost, ConceptInfo, GenerationOption, TrainContext, lora_values, register
from museum.methods.continual import class_prompts, earlier_concepts, encode_fixed, varied_prompts
from museum.methods.distill import DataFreeDistillation
from museum.methods.lora import LoRAConfig, SharedLoRAMethod
from museum.models import icgen
from museum.models.loading import load_evaluator

PROMPT_SEED = 6006  # the scenes the distillation prompts describe
CONTEXT_FILE = "ip_adapter_image_embeds.safetensors"  # an export's image context
#: ICGen context in an export: the adapter, then the embeddings for one prompt with guidance (zeros: unconditional)
CONTEXT_LOADS = """pipe.load_ip_adapter("{folder}", subfolder="", weight_name="{weight}", image_encoder_folder=None)
pipe.set_ip_adapter_scale({scale})
import torch; from safetensors.torch import load_file; context = load_file("{file}")["image_embeds"][None]
ip_adapter_image_embeds = [torch.cat([torch.zeros_like(context), context])]  # one prompt, guidance > 1"""
CONTEXT_CALL = "pipe(prompt, ip_adapter_image_embeds=ip_adapter_image_embeds)"


@dataclass
class LFSConfig(LoRAConfig):
    token_init: str = "class"  # "a <tok> circle", the token starting as "circle"
    class_word_in_prompt: bool = True
    distill_weight: float = 3.0  # lambda of the data-free distillation (0 switches it off)
    distill_batch: int = 2  # noise inputs distilled per step
    num_prompts: int = 16  # class-word prompts, and prompts per earlier concept
    unconditional: bool = True  # also distil the empty prompt, the unconditional branch of classifier-free guidance
    teacher_steps: int = 8  # teacher DDIM steps from pure noise (0: pure noise at the first timestep only)
    inference_steps: int = 10  # the DDIM schedule those steps follow
    context: bool = True  # ICGen: keep the images' image-encoder embeddings and draw with them (a fitting adapter)
    learn_with_context: bool = False  # ICGen: learn the token and LoRA with the context present (measured worse: off)
    ip_adapter: str | None = None  # ICGen on a user's SD model: a local IP-Adapter folder (weights + image_encoder/)
    ip_adapter_weight: str | None = None  # its weight file (default: the only .safetensors file in the folder)

    SD15 = dict(LoRAConfig.SD15, token_init="class", class_word_in_prompt=True, distill_weight=1.0,
                distill_batch=2, unconditional=True, num_prompts=64, teacher_steps=20, inference_steps=25, context=True,
                learn_with_context=False)


@register
class LFS(SharedLoRAMethod):
    name = "lfs"
    config_class = LFSConfig
    generation_options = (
        GenerationOption("context_scale", "ICGen context scale of lfs concepts that keep image context (default 1; 0 "
                         "draws without the context)", minimum=0.0),
    )

    @classmethod
    def generation_settings(cls, context_scale: float = icgen.DEFAULT_SCALE):
        return icgen.context_scale(context_scale)

    @classmethod
    def export_extras(cls, concepts: list[ConceptInfo], folder: Path, out: Path) -> tuple[list[str], dict]:
        """Concepts that keep image context: ``ip_adapter_image_embeds.safetensors`` holds ``image_embeds`` (K, D),
        the one context embedding per such concept Museum draws with (``icgen.image_embeds``), and each concept's
        stored per-image embeddings (``context.{name}``); the lines load the adapter the concept was learned with
        (``pipe.load_ip_adapter``; the folder is referenced, not copied) and build ``ip_adapter_image_embeds`` for
        ``pipe(prompt, ip_adapter_image_embeds=ip_adapter_image_embeds)``."""
        context = drawing_context(concepts)
        if context is None:
            return [], {"ip_adapter": None}
        adapter = str(context.folder or icgen.EMBEDDED_ICGEN)
        save_file({"image_embeds": icgen.image_embeds(context.contexts, context.folder),
                   **{f"context.{n}": c.float().contiguous() for n, c in zip(context.names, context.contexts)}},
                  folder / CONTEXT_FILE)
        loads = CONTEXT_LOADS.format(folder=adapter, weight=context.weight, scale=icgen.DEFAULT_SCALE,
                                     file=out / CONTEXT_FILE)
        return [loads], {"ip_adapter": {"folder": adapter, "weight_name": context.weight, "scale": icgen.DEFAULT_SCALE,
                                        "file": CONTEXT_FILE, "concepts": context.names, "call": CONTEXT_CALL}}

    @classmethod
    def webui_leaves_out(cls, concepts: list[ConceptInfo]) -> str:
        kept = [c.name for c in concepts if "context" in c.tensors]
        if not kept:
            return ""
        return (f"the ICGen image context of {', '.join(kept)} (an IP-Adapter input these tools do not take as stored "
                "embeddings): the LoRA and token draw as `museum generate --context-scale 0` does")

    @classmethod
    def cost(cls, kv, width, config) -> ConceptCost:
        # the shared LoRA (+ N x 128 ICGen context values per concept on the embedded model, not counted: bases
        # without a fitting adapter store none); the distillation adds a student and a teacher pass
        n = config.get("distill_batch", 0) if config.get("distill_weight", 0) else 0
        # the noise bank: teacher DDIM steps for each class prompt (and as many per earlier concept, not counted here)
        once = config.get("num_prompts", 0) * config.get("teacher_steps", 0) if n else 0
        lora, b = lora_values(kv, config.get("rank", 0)), config.get("batch_size", 1)
        return ConceptCost(width, lora, lora + width, b + n * (1 + 1 / 3), once, added_values=lora, batch_samples=b)

    def __init__(self, config: LFSConfig | None = None):
        super().__init__(config)
        cfg = self.config
        if cfg.ip_adapter is not None:  # recorded resolved: the concept is drawn with exactly this adapter file
            folder, cfg.ip_adapter_weight = icgen.ip_adapter(cfg.ip_adapter, cfg.ip_adapter_weight)
            cfg.ip_adapter = str(folder)
        elif cfg.ip_adapter_weight is not None:
            raise MuseumError("--ip-adapter-weight names the weight file of an IP-Adapter folder: pass that folder "
                              "with --ip-adapter DIR too")

    def distillation_prompts(self, ctx: TrainContext) -> list[str]:
        """The prompts whose outputs the task must keep: the new concept's class word, the empty prompt (each with its
        own noise trajectory), earlier concepts' tokens."""
        n = self.config.num_prompts
        prompts = class_prompts(ctx.concept, n, PROMPT_SEED) + ([""] * n if self.config.unconditional else [])
        for concept in earlier_concepts(self, ctx):
            prompts += varied_prompts(self, concept, n, PROMPT_SEED)
        return prompts

    def wants_teacher(self, ctx: TrainContext) -> bool:
        # from the first task on: the class word's prompts are protected against the base model
        return self.config.distill_weight > 0 and self.config.num_prompts > 0

    def setup(self, ctx: TrainContext) -> list[dict]:
        cfg = self.config
        if cfg.context and cfg.ip_adapter is not None and not icgen.compatible(ctx.pipe.unet, cfg.ip_adapter,
                                                                                cfg.ip_adapter_weight):
            raise MuseumError(f"the IP-Adapter {cfg.ip_adapter}/{cfg.ip_adapter_weight} does not fit this base model "
                              "(its image_proj / to_k_ip / to_v_ip shapes or number of cross-attention blocks differ "
                              "from the UNet's, or it is not IP-Adapter's basic layout); pass --ip-adapter DIR with "
                              "an IP-Adapter made for this model's family (e.g. ip-adapter_sd15 for SD-1.x)")
        self.distillation = None
        self.context, self.installed = None, ExitStack()
        if self.wants_teacher(ctx):
            text = encode_fixed(ctx.pipe, self.distillation_prompts(ctx))
            self.distillation = DataFreeDistillation(text, batch=cfg.distill_batch, teacher_steps=cfg.teacher_steps,
                                                     inference_steps=cfg.inference_steps, seed=cfg.seed * 7919 + 6)
        groups = super().setup(ctx)  # the LoRA first: its initialisation does not depend on ICGen
        with torch.random.fork_rng(devices=[]):  # building an image encoder draws from the global generator
            if cfg.context and cfg.ip_adapter is not None:
                self.context = icgen.encoder_embeddings(cfg.ip_adapter, ctx.images)
            elif cfg.context and icgen.compatible(ctx.pipe.unet):
                self.context = icgen.context_embeddings(load_evaluator(), ctx.images)
            elif cfg.context:
                warnings.warn("no IP-Adapter given: this lfs concept keeps no image context (pass --ip-adapter DIR, "
                              "a local IP-Adapter folder for this base model, e.g. one with ip-adapter_sd15.safetensors "
                              "and image_encoder/, to keep it)", stacklevel=2)
        if self.context is not None and cfg.learn_with_context:
            # the training batches (and the teacher, copied after setup) see the context
            self.installed.enter_context(icgen.conditioned_on(ctx.pipe, self.context, cfg.ip_adapter,
                                                              cfg.ip_adapter_weight or icgen.WEIGHT_NAME))
        return groups

    def loss_terms(self, ctx: TrainContext, batch: dict) -> dict[str, torch.Tensor]:
        if self.distillation is None:
            return {}
        # the protected prompts carry no context: distilled with the context scale at 0 (exactly text-only attention)
        with icgen.scaled(ctx.pipe.unet, 0.0), icgen.scaled(ctx.teacher, 0.0):
            loss = self.distillation.loss(ctx.pipe.unet, ctx.teacher, ctx.pipe.scheduler.config, batch["generator"])
        return {"distillation": self.config.distill_weight * loss}

    def finish(self, ctx: TrainContext):
        tensors, state = super().finish(ctx)
        if self.context is not None:
            tensors = {**tensors, "context": self.context}
        return tensors, state

    def teardown(self, ctx: TrainContext) -> None:
        self.installed.close()

    @contextmanager
    def activate(self, pipe, concepts, active, state):
        context = drawing_context(active)
        with super().activate(pipe, concepts, active, state):
            if context is None:
                yield
                return
            with icgen.with_context(pipe, context.contexts, context.folder, context.weight):
                yield


class DrawingContext(NamedTuple):
    """The image context lfs concepts are drawn with."""

    folder: str | None  # the IP-Adapter folder; None: the embedded model's adapter
    weight: str  # its weight file
    names: list[str]  # the concepts that keep context, in prompt order
    contexts: list[torch.Tensor]  # each one's stored (N, D) embeddings


def drawing_context(active) -> DrawingContext | None:
    """The image context ``active`` lfs concepts are drawn with, or None when none keeps context. Concepts
    learned with different adapters, or an adapter no longer where it was, are a clear error."""
    kept = [c for c in active if "context" in c.tensors]
    if not kept:
        return None
    adapters = {(c.config.get("ip_adapter"), c.config.get("ip_adapter_weight") or icgen.WEIGHT_NAME) for c in kept}
    if len(adapters) > 1:
        raise MuseumError(f"lfs concepts {', '.join(c.name for c in kept)} were learned with different image-context "
                          "adapters (IP-Adapters) and cannot be drawn in one prompt; name them in separate prompts")
    folder, weight = adapters.pop()
    if folder is not None and not (Path(folder) / weight).is_file():
        raise MuseumError(f"lfs concept(s) {', '.join(c.name for c in kept)} were learned with the IP-Adapter "
                          f"{Path(folder) / weight}, which is not there any more; put it back there (Museum "
                          "downloads nothing)")
    return DrawingContext(folder, weight, [c.name for c in kept], [c.tensors["context"] for c in kept])

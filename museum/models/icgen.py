"""In-Context Generation (ICGen; LFS-Diffusion, Song et al. 2024, METHODS.md sec. 6): the UNet conditioned on
visual context, a concept's reference images, through extra cross-attention tokens.

Decoupled cross-attention as IP-Adapter (Ye et al. 2023) does it, with diffusers' own pieces: an image encoder
(for the embedded model the evaluator's image tower, frozen: ``museum.models.evaluator``), a projection of
one image embedding to ``NUM_TOKENS`` context tokens (``diffusers.models.embeddings.ImageProjection``), separate
K/V projections for them in every cross-attention block (``IPAdapterAttnProcessor2_0``'s ``to_k_ip`` /
``to_v_ip``) and a scale:

    attn2(x) = softmax(Q K_text^T) V_text + scale * softmax(Q K_ip^T) V_ip,   K_ip = W'_K c, V_ip = W'_V c,
    c = ImageProjection(mean of the context images' normalised embeddings)

The adapter is saved in IP-Adapter's file layout (``image_proj.*``, ``ip_adapter.{1,3,...}.to_{k,v}_ip.weight``),
so plain diffusers loads it: ``pipe.load_ip_adapter(folder, subfolder="", weight_name=WEIGHT_NAME,
image_encoder_folder=None)`` and ``pipe(prompt, ip_adapter_image_embeds=[...])`` (:func:`context_kwargs`).

For a user's Stable Diffusion model the adapter is an existing IP-Adapter in a local folder (:func:`ip_adapter`:
a weight file such as ``ip-adapter_sd15.safetensors`` and its CLIP image encoder in ``image_encoder/``, the layout
``load_ip_adapter`` reads); the context is then the plain mean of the encoder's ``image_embeds``
(:func:`encoder_embeddings`), as diffusers feeds IP-Adapter, not renormalised. Nothing is downloaded.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from diffusers.utils import logging
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from museum.errors import MuseumError
from museum.models.loading import EMBEDDED_DIR

NUM_TOKENS = 4  # the context tokens one embedding becomes (IP-Adapter's; diffusers assumes 4 for this layout)
WEIGHT_NAME = "ip_adapter.safetensors"
EMBEDDED_ICGEN = EMBEDDED_DIR / "icgen"
IMAGE_ENCODER = "image_encoder"  # the image encoder's folder inside an IP-Adapter folder (load_ip_adapter's default)
DEFAULT_SCALE = 1.0
_SCALE: ContextVar[float] = ContextVar("icgen_context_scale", default=DEFAULT_SCALE)


@contextmanager
def context_scale(scale: float) -> Iterator[None]:
    """The ICGen context scale of every generation inside the block (``museum generate --context-scale``);
    0 draws as without context."""
    if scale < 0:
        raise ValueError(f"the context scale must be >= 0, not {scale}")
    reset = _SCALE.set(scale)
    try:
        yield
    finally:
        _SCALE.reset(reset)


def _cross_attention_names(unet) -> list[str]:
    """The cross-attention processors in ``unet.attn_processors`` order (the order IP-Adapter files number)."""
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


def install(unet, image_embed_dim: int, scale: float = 1.0) -> list[torch.nn.Parameter]:
    """Add a fresh image-context adapter to ``unet`` (to_k_ip / to_v_ip initialised from each block's text K/V,
    as IP-Adapter does); returns its parameters."""
    procs = dict(unet.attn_processors)
    params = []
    cross_dim = None
    for name in _cross_attention_names(unet):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        cross_dim = attn.to_k.in_features
        proc = IPAdapterAttnProcessor2_0(hidden_size=attn.to_k.out_features, cross_attention_dim=cross_dim,
                                         num_tokens=(NUM_TOKENS,), scale=scale)
        with torch.no_grad():
            proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
            proc.to_v_ip[0].weight.copy_(attn.to_v.weight)
        procs[name] = proc.to(attn.to_k.weight.device)
        params += list(proc.parameters())
    if cross_dim is None:
        raise ValueError("this UNet has no cross-attention blocks (attn2) to add image context to")
    unet.set_attn_processor(procs)
    projection = ImageProjection(image_embed_dim=image_embed_dim, cross_attention_dim=cross_dim,
                                 num_image_text_embeds=NUM_TOKENS).to(unet.device)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    return params + list(projection.parameters())


def adapter_state(unet) -> dict[str, torch.Tensor]:
    """The installed adapter in IP-Adapter's file layout (what ``load_ip_adapter`` reads)."""
    out = {}
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    for key, value in projection.state_dict().items():  # image_embeds.* -> proj.*, norm.*
        out["image_proj." + key.replace("image_embeds", "proj")] = value
    for i, name in enumerate(_cross_attention_names(unet)):
        proc = unet.attn_processors[name]
        out[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = proc.to_k_ip[0].weight
        out[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = proc.to_v_ip[0].weight
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def save_adapter(unet, folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(unet), folder / WEIGHT_NAME)
    return folder / WEIGHT_NAME


def load_adapter(pipe, folder: str | Path | None = None, scale: float = 1.0, weight: str = WEIGHT_NAME) -> None:
    """Load an image-context adapter into ``pipe`` with diffusers' ``load_ip_adapter``: the shipped one for the
    embedded model (``folder`` None), or the file ``weight`` of an IP-Adapter folder. The image encoder is not
    loaded with it: context embeddings are computed once per concept (:func:`context_embeddings`,
    :func:`encoder_embeddings`)."""
    folder = Path(folder) if folder is not None else EMBEDDED_ICGEN
    if not (folder / weight).is_file():
        raise FileNotFoundError(
            f"no image-context adapter at {folder / weight}: ICGen needs one. The embedded model's is made by "
            f"`python scripts/train_icgen.py`; for a Stable Diffusion model give a local IP-Adapter folder (Museum "
            f"downloads nothing)")

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "image_encoder is not loaded": intended, the embeddings are stored per concept
    try:
        pipe.load_ip_adapter(str(folder), subfolder="", weight_name=weight, image_encoder_folder=None)
    finally:
        logging.set_verbosity(verbosity)
    pipe.set_ip_adapter_scale(scale)


def compatible(unet, folder: str | Path | None = None, weight: str = WEIGHT_NAME) -> bool:
    """Whether the adapter file ``weight`` in ``folder`` (default: the embedded model's) exists, has IP-Adapter's
    basic layout (one image embedding -> ``NUM_TOKENS`` tokens) and fits ``unet``'s cross-attention blocks (same
    count, widths and text width)."""
    path = Path(folder or EMBEDDED_ICGEN) / weight
    if not path.is_file():
        return False
    names = _cross_attention_names(unet)
    if not names:
        return False
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if ({f"ip_adapter.{2 * i + 1}.to_k_ip.weight" for i in range(len(names))}
                | {"image_proj.norm.weight", "image_proj.proj.weight"}) - keys:
            return False
        for i, name in enumerate(names):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            if tuple(f.get_slice(f"ip_adapter.{2 * i + 1}.to_k_ip.weight").get_shape()) != tuple(attn.to_k.weight.shape):
                return False
        if f.get_slice("image_proj.proj.weight").get_shape()[0] != NUM_TOKENS * attn.to_k.in_features:
            return False
        n_layers = sum(1 for k in keys if k.endswith(".to_k_ip.weight"))
    return n_layers == len(names)


def ip_adapter(folder: str | Path, weight: str | None = None) -> tuple[Path, str]:
    """A user's IP-Adapter folder checked for what ``load_ip_adapter(folder, subfolder="", weight_name=weight)`` and
    :func:`encoder_embeddings` read: (the absolute folder, the weight file's name; by default the only
    ``.safetensors`` file in it). Raises a :class:`MuseumError` that says what to pass."""
    folder = Path(folder).expanduser().resolve()
    what = "pass --ip-adapter DIR, a local IP-Adapter folder (Museum downloads nothing)"
    if not folder.is_dir():
        raise MuseumError(f"no IP-Adapter folder at {folder}; {what}")
    if weight is None:
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        if len(found) != 1:
            raise MuseumError(f"{folder} holds {'no .safetensors file' if not found else ', '.join(found)}: an "
                              "IP-Adapter folder needs its weight file (e.g. ip-adapter_sd15.safetensors); name it "
                              "with --ip-adapter-weight NAME")
        weight = found[0]
    if Path(weight).name != weight or not (folder / weight).is_file():
        raise MuseumError(f"no IP-Adapter weight file {weight!r} in {folder}; --ip-adapter-weight names a "
                          f".safetensors file there: {', '.join(sorted(p.name for p in folder.glob('*.safetensors')))}")
    if not (folder / IMAGE_ENCODER / "config.json").is_file():
        raise MuseumError(f"{folder} has no image encoder ({IMAGE_ENCODER}/config.json and model.safetensors, a "
                          "transformers CLIPVisionModelWithProjection, as IP-Adapter ships it): Museum computes the "
                          f"concept's context embeddings with it; {what}")
    try:
        with safe_open(str(folder / weight), framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise MuseumError(f"{folder / weight} is not a valid safetensors file ({err}); {what}") from None
    return folder, weight


@torch.no_grad()
def encoder_embeddings(folder: str | Path, images) -> torch.Tensor:
    """(N, D) ``image_embeds`` of an IP-Adapter's image encoder (``folder/image_encoder``) for ``images``, as
    diffusers' ``pipe.encode_image`` computes them: a ``CLIPImageProcessor`` (the folder's preprocessor config, else
    diffusers' default at the encoder's image size), then ``CLIPVisionModelWithProjection(...).image_embeds``."""
    path = Path(folder) / IMAGE_ENCODER
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True, use_safetensors=True)
        if (path / "preprocessor_config.json").is_file():
            processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        else:
            size = encoder.config.image_size
            processor = CLIPImageProcessor(size=size, crop_size=size)
    except Exception as err:  # transformers and safetensors raise many error types for a broken folder
        raise MuseumError(f"the IP-Adapter image encoder in {path} does not load ({str(err).splitlines()[0]}); it "
                          "must be a transformers CLIPVisionModelWithProjection saved with save_pretrained "
                          "(config.json, model.safetensors)") from None
    pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
    return encoder.eval()(pixels.to(encoder.dtype)).image_embeds.float().cpu()


def mean_context(embeddings: torch.Tensor, renormalise: bool = True) -> torch.Tensor:
    """A concept's one context embedding (D,): the mean of its reference images' embeddings, renormalised for the
    embedded model's adapter (trained on unit-norm evaluator embeddings), plain for an IP-Adapter."""
    mean = embeddings.float().mean(0)
    return torch.nn.functional.normalize(mean, dim=-1) if renormalise else mean


def image_embeds(contexts: list[torch.Tensor], folder: str | Path | None) -> torch.Tensor:
    """(K, D) the one context image per concept that the adapter in ``folder`` is fed: each concept's
    :func:`mean_context`, renormalised for the embedded model's adapter (``folder`` None), plain for an IP-Adapter."""
    return torch.stack([mean_context(c, renormalise=folder is None) for c in contexts])


@contextmanager
def _fed(pipe, contexts: list[torch.Tensor], guided: bool, folder: str | Path | None, scale: float,
         trainable: bool = False, weight: str = WEIGHT_NAME) -> Iterator[None]:
    """The adapter (``weight`` in ``folder``; None: the embedded model's) loaded into ``pipe`` and every UNet call
    inside the block given one context image per entry of ``contexts`` (each a concept's (N, D) embeddings,
    averaged: :func:`mean_context`); with ``guided``, zeros for the unconditional half of a guided pipeline batch.
    Restores the UNet's attention processors and projection on exit."""
    unet = pipe.unet
    processors, projection = dict(unet.attn_processors), unet.encoder_hid_proj
    hid_type = unet.config.encoder_hid_dim_type
    embeds = image_embeds(contexts, folder)

    def feed(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        ctx = embeds[None].expand(sample.shape[0], -1, -1).clone()
        if guided and pipe.do_classifier_free_guidance:  # the pipeline stacks [unconditional, conditional]
            ctx[: sample.shape[0] // 2] = 0
        kwargs["added_cond_kwargs"] = {**(kwargs.get("added_cond_kwargs") or {}),
                                       "image_embeds": [ctx.to(sample.device, sample.dtype)]}
        return args, kwargs

    load_adapter(pipe, folder, scale=scale, weight=weight)
    if not trainable:
        unet.encoder_hid_proj.requires_grad_(False)
        for proc in unet.attn_processors.values():
            if isinstance(proc, torch.nn.Module):
                proc.requires_grad_(False)
    handle = unet.register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        unet.set_attn_processor(processors)
        unet.encoder_hid_proj = projection
        unet.register_to_config(encoder_hid_dim_type=hid_type)


def with_context(pipe, contexts: list[torch.Tensor], folder: str | Path | None = None, weight: str = WEIGHT_NAME):
    """Generation with image context (one context image per concept in ``contexts``) at the scale of
    :func:`context_scale`; zeros for the unconditional branch of guidance."""
    return _fed(pipe, contexts, guided=True, folder=folder, scale=_SCALE.get(), weight=weight)


def conditioned_on(pipe, context: torch.Tensor, folder: str | Path | None = None, weight: str = WEIGHT_NAME):
    """Training with a concept's context present: the frozen adapter installed and every UNet call inside the
    block (training batches, and a teacher copied inside it) given ``context`` for every row, at scale 1."""
    return _fed(pipe, [context], guided=False, folder=folder, scale=DEFAULT_SCALE, weight=weight)


@contextmanager
def scaled(unet, scale: float) -> Iterator[None]:
    """The context scale of ``unet``'s image-context processors set to ``scale`` inside the block (0: every
    attention block computes exactly the text-only attention); a UNet without them is left alone."""
    procs = [p for p in unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
    saved = [p.scale for p in procs]
    for p in procs:
        p.scale = [scale] * len(p.scale)
    try:
        yield
    finally:
        for p, old in zip(procs, saved):
            p.scale = old


@torch.no_grad()
def context_embeddings(evaluator, images) -> torch.Tensor:
    """(N, D) normalised image-encoder embeddings of a concept's reference images (what a concept stores)."""
    return evaluator.embed_images(images).float().cpu()


def context_kwargs(embeddings: torch.Tensor, batch: int, guidance: bool = True, renormalise: bool = True) -> dict:
    """``ip_adapter_image_embeds`` for a pipeline call of ``batch`` prompts: the mean of the context embeddings
    (:func:`mean_context`) as one context image; zeros (no context) for the unconditional branch of guidance."""
    embeds = mean_context(embeddings, renormalise)[None, None].expand(batch, 1, -1)
    if guidance:
        embeds = torch.cat([torch.zeros_like(embeds), embeds])
    return {"ip_adapter_image_embeds": [embeds]}

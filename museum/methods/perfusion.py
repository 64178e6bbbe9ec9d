"""Perfusion (Tewel et al., SIGGRAPH 2023): key-locked, gated rank-1 edits of cross-attention K/V.

For every cross-attention layer and both projections P in {K, V} (weights W, input e, a
text-encoder output vector of width d; on SDXL both encoders' outputs concatenated, d = 2048),
with C the uncentred covariance of text-encoder outputs over a caption corpus and i* the
concept's "target input":

    E = i*^T C^-1 i*,    s(e) = e^T C^-1 i* / E,
    W e  ->  W (e - s(e) i*) + sigmoid((s(e) - beta) / tau) o*_P              (METHODS.md sec. 4)

* Key-locking: o*_K = W_K i_super, the key of the superclass word at the concept's position
  ("a <tok> circle" with <tok>'s embedding set to the class word's), fixed (not trained).
  o*_V is trained, initialised to W_V i_super. The concept word embedding is trained too
  (token_init="class"), by the trainer.
* i* is the text-encoder output at the concept token's position. It starts at the concept's
  initial encoding (= i_super with token_init="class") and follows it as an exponential moving
  average, i* <- ema * i* + (1 - ema) * enc, updated once per step without gradient from the
  encoding the step used (the paper's "input decay"; :meth:`Perfusion.after_optimizer_step`).
* Gate: training beta 0.75, tau 0.1; generation beta 0.7, tau 0.05 (the paper's 0.15 on Stable
  Diffusion bases; ``PerfusionConfig.beta``, ``.tau``; override at generation time with :func:`gate`).
* Several concepts in one prompt (all active ones at once):

      W (e - sum_u u (e^T C^-1 u)) + sum_j sigmoid((s_j(e) - beta) / tau) o*_j

  with {u} a C^-1-orthonormal basis of span{i*_j}: G = I* C^-1 I*^T = L L^T (Cholesky),
  U = L^-1 I* (:func:`orthonormal_basis`). For one concept this is exactly the formula above.
  A ridge of 1e-6 x mean diag(G) is added to G when there are several concepts, so concepts
  with (nearly) collinear i* still give a bounded projection.
* Strength (a generation knob, per concept, default 1): lambda_j scales concept j's gated term
  and its share of the removed component, W(e - sum_j lambda_j c_j i*_j) + sum_j lambda_j g_j o*_j,
  where c are the coefficients of the projection on the i*_j. lambda = 0 for every concept gives
  the base model's K/V exactly; lambda = 1 the paper's edit.

The covariance. C is estimated once per base model from the text-encoder outputs at every
non-padding position (start and end tokens included) of ``cov_captions`` captions (default
2000 captions of the rendered world's base distribution, ``museum.world.render.base_samples``
+ ``caption``; or the lines of ``caption_file``) and cached in the museum's ``cache/perfusion/``
as safetensors (float64). The inverse is regularised: C^-1 := (C + cov_ridge * trace(C)/d * I)^-1,
cov_ridge = 1e-3, because a small caption corpus need not span the text space. Only C^-1 i* is
needed at generation, so each concept stores it and generation never needs the corpus.

Stored per concept (float32, in the concept's tensors; the token embedding is added by the
trainer): ``perfusion.i_star`` (d), ``perfusion.cinv_i_star`` (d, C^-1 i*), and per layer
``perfusion.o_k.{layer}``, ``perfusion.o_v.{layer}`` (out_l each). i* is taken at the text-encoder
output, so it is the same for every layer and stored once. Size, values: 2 * sum_l out_l + 3 d.

* tiny test pipeline (d 16; 4 cross-attn layers, widths 8, 16, 8, 8): 2*40 + 48 = 128 values,
  512 B in fp32 (1712 B as a safetensors file with its header).
* embedded model (d 64; 7 cross-attn layers of width 96; sum 672):
  2*672 + 192 = 1536 values = 6144 B in fp32 (8112 B as a safetensors file with its header, docs/learning.json).
* SD-1.5 (d 768; 16 layers, widths 320 x5, 640 x5, 1280 x6; sum 12480): 2*12480 + 2304 = 27264
  values = 106.5 KiB in fp32 (the paper's "100 KB"), 53.3 KiB in fp16. Storing i_super (d)
  instead of o*_K (recomputable as W_K i_super) would bring fp16 to ~29 KiB; we keep o*_K as the
  paper does.

Generation: :meth:`Perfusion.activate` installs :class:`PerfusionAttnProcessor` on every
``attn2`` (others kept) for the prompt's ACTIVE Perfusion concepts only, and restores the
original processors on exit; a prompt without a Perfusion token is drawn by the untouched base
model. The processor computes ``attn.to_k(e)`` / ``attn.to_v(e)`` through the modules, so K/V
deltas other methods apply to the same prompt (weights, peft LoRA) compose with the edit.

Export: ``export_format = "museum"``; ``museum export`` writes the concept tensors (``--format kohya`` refuses: the
gated edit is no LoRA, ``lora_export_why``), and
:func:`load_into` installs them permanently in a plain ``StableDiffusionPipeline``:

    from diffusers import StableDiffusionPipeline
    from museum.methods.perfusion import load_into
    pipe = StableDiffusionPipeline.from_pretrained(BASE); load_into(pipe, "export-dir")

Deviations from the paper: no gradient accumulation (the paper's batch 4 x 4); the corpus is
2000 world captions rather than 100k LAION captions; the EMA update uses the encoding of the
current step, after its optimizer step (one step of lag); loss masking uses the trainer's
valid-region mask, not an object mask.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from museum.methods.base import ConceptCost, ConceptInfo, GenerationOption, Method, MethodConfig, TrainContext, register
from museum.plumbing import tokens
from museum.plumbing.objectives import concept_prompt, encode_prompts
from museum.store.atomic import atomic_write_bytes
from museum.world.render import base_samples, caption

PREFIX = "perfusion."
GRAM_RIDGE = 1e-6  # relative to mean diag(G), only with several concepts


@dataclass
class PerfusionConfig(MethodConfig):
    steps: int = 300
    batch_size: int = 4
    lr: float = 3e-2  # o*_V (the paper's 0.03; 1e-2 learned less on the embedded model)
    token_lr: float = 2e-3  # the concept word embedding (1e-2 collapsed text alignment on the embedded model)
    token_init: str = "class"
    class_word_in_prompt: bool = True
    ema: float = 0.99  # i* <- ema * i* + (1 - ema) * encoding
    train_beta: float = 0.75
    train_tau: float = 0.1
    beta: float = 0.7  # generation gate bias (override with perfusion.gate(beta=...))
    tau: float = 0.05  # generation gate temperature (0.15 before the 16x16 model; docs/METHODS.md gate sweep)
    cov_captions: int = 2000
    cov_ridge: float = 1e-3  # C^-1 := (C + cov_ridge * trace(C)/d * I)^-1
    caption_file: str = ""  # one caption a line: the corpus for C instead of the world's captions

    SD15 = dict(steps=400, batch_size=4, lr=0.03, token_lr=0.006, tau=0.15)  # the paper's inference gate


# --------------------------------------------------------------------------- gate knobs

@dataclass(frozen=True)
class GateSettings:
    beta: Optional[float] = None
    tau: Optional[float] = None
    strength: Optional[float | dict] = None  # one float for every concept, or {name or token: float}


_GATE: contextvars.ContextVar[GateSettings] = contextvars.ContextVar("perfusion_gate", default=GateSettings())


@contextlib.contextmanager
def gate(beta: float | None = None, tau: float | None = None,
         strength: float | dict[str, float] | None = None) -> Iterator[GateSettings]:
    """Override the generation gate of every Perfusion edit drawn inside the block.

        with perfusion.gate(beta=0.6, tau=0.2, strength={"sunburst": 0.8}):
            museum.generate("a <sunburst> circle")          # or pipe(...) after load_into

    ``beta`` (gate bias) and ``tau`` (temperature) replace each concept's stored values;
    ``strength`` is one float for all concepts or a dict by concept name or token (others 1).
    Unset fields keep the enclosing block's value. Training ignores these overrides.
    """
    if tau is not None and tau <= 0:
        raise ValueError(f"the gate temperature tau must be > 0, not {tau}")
    outer = _GATE.get()
    settings = GateSettings(beta if beta is not None else outer.beta, tau if tau is not None else outer.tau,
                            strength if strength is not None else outer.strength)
    reset = _GATE.set(settings)
    try:
        yield settings
    finally:
        _GATE.reset(reset)


# --------------------------------------------------------------------------- the edit

@dataclass
class ConceptEdit:
    """One concept's rank-1 edit: i*, C^-1 i*, and o*_K / o*_V per layer (layer = attention module name)."""

    name: str
    token: str
    i_star: torch.Tensor
    cinv_i_star: torch.Tensor
    o_k: dict[str, torch.Tensor]
    o_v: dict[str, torch.Tensor]
    beta: float = PerfusionConfig.beta
    tau: float = PerfusionConfig.tau
    strength: float = 1.0
    version: int = 0

    def set_i_star(self, i_star: torch.Tensor, cinv: torch.Tensor) -> None:
        """Replace i* (and C^-1 i*) by new tensors (never in place: earlier autograd graphs keep the old ones)."""
        self.i_star = i_star.detach().float().cpu()
        self.cinv_i_star = (cinv.double() @ i_star.double().cpu()).float()
        self.version += 1

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{PREFIX}i_star": self.i_star.detach().float().cpu().clone(),
               f"{PREFIX}cinv_i_star": self.cinv_i_star.detach().float().cpu().clone()}
        for layer, o in self.o_k.items():
            out[f"{PREFIX}o_k.{layer}"] = o.detach().float().cpu().clone()
        for layer, o in self.o_v.items():
            out[f"{PREFIX}o_v.{layer}"] = o.detach().float().cpu().clone()
        return out

    @classmethod
    def from_tensors(cls, name: str, token: str, tensors: dict[str, torch.Tensor], config: dict | None = None,
                     ) -> "ConceptEdit":
        config = config or {}
        if f"{PREFIX}i_star" not in tensors:
            raise ValueError(f"concept {name!r} has no Perfusion tensors ({PREFIX}i_star missing)")
        o_k = {k.removeprefix(f"{PREFIX}o_k."): v.float() for k, v in tensors.items() if k.startswith(f"{PREFIX}o_k.")}
        o_v = {k.removeprefix(f"{PREFIX}o_v."): v.float() for k, v in tensors.items() if k.startswith(f"{PREFIX}o_v.")}
        defaults = PerfusionConfig()
        return cls(name, token, tensors[f"{PREFIX}i_star"].float(), tensors[f"{PREFIX}cinv_i_star"].float(), o_k, o_v,
                   beta=float(config.get("beta", defaults.beta)), tau=float(config.get("tau", defaults.tau)))


def orthonormal_basis(i_stars: torch.Tensor, cinv_i_stars: torch.Tensor, ridge: float = 0.0,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A C^-1-orthonormal basis of span{i*_j} by Cholesky, from i* (n, d) and C^-1 i* (n, d).

    Returns (U, C^-1 U, L^-1), rows u_m of U with u_m^T C^-1 u_l = delta_ml, where
    G = I* C^-1 I*^T (+ ridge * mean diag(G) * I) = L L^T and U = L^-1 I*. The projection onto the
    span is P e = sum_m u_m (e^T C^-1 u_m); its coefficients on the i*_j are c = k L^-1 (k_m = e^T C^-1 u_m).
    """
    I, A = i_stars.double(), cinv_i_stars.double()
    G = I @ A.T
    G = (G + G.T) / 2
    if ridge > 0:
        G = G + ridge * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype)
    L = torch.linalg.cholesky(G)
    Linv = torch.linalg.solve_triangular(L, torch.eye(len(G), dtype=G.dtype), upper=False)
    return Linv @ I, Linv @ A, Linv


@dataclass
class _Geometry:
    i_stars: torch.Tensor  # (n, d)
    cinv_u: torch.Tensor  # (n, d): rows C^-1 u_m
    linv: torch.Tensor  # (n, n)
    gate_vecs: torch.Tensor  # (n, d): s_j(e) = e . gate_vecs_j = e^T C^-1 i*_j / E_j


class EditSet:
    """The concepts one set of processors applies (shared by every layer), with their geometry cached."""

    def __init__(self, edits: list[ConceptEdit], training: bool = False):
        if not edits:
            raise ValueError("no Perfusion concepts to install")
        self.edits = list(edits)
        self.training = training
        self._cache: dict = {}

    def layers(self) -> set[str]:
        out = set(self.edits[0].o_k)
        for e in self.edits:
            out &= set(e.o_k) & set(e.o_v)
        return out

    def geometry(self, device, dtype) -> _Geometry:
        key = (tuple(e.version for e in self.edits), tuple(id(e.i_star) for e in self.edits), str(device), dtype)
        if key not in self._cache:
            I = torch.stack([e.i_star.float() for e in self.edits]).cpu()
            A = torch.stack([e.cinv_i_star.float() for e in self.edits]).cpu()
            _, cinv_u, linv = orthonormal_basis(I, A, GRAM_RIDGE if len(self.edits) > 1 else 0.0)
            energy = (I.double() * A.double()).sum(1, keepdim=True)
            geo = _Geometry(I, cinv_u, linv, A.double() / energy)
            self._cache = {key: _Geometry(*(t.to(device, dtype) for t in vars(geo).values()))}
        return self._cache[key]

    def knobs(self) -> tuple[list[float], list[float], list[float]]:
        """beta, tau, strength per concept: the gate() overrides (not in training), else each concept's own."""
        g = GateSettings() if self.training else _GATE.get()
        betas = [g.beta if g.beta is not None else e.beta for e in self.edits]
        taus = [g.tau if g.tau is not None else e.tau for e in self.edits]
        strengths = []
        for e in self.edits:
            s = g.strength
            if isinstance(s, dict):
                s = s.get(e.name, s.get(e.token, 1.0))
            strengths.append(float(e.strength if s is None else s))
        return betas, taus, strengths


class PerfusionAttnProcessor(AttnProcessor2_0):
    """diffusers' ``AttnProcessor2_0`` with the gated rank-1 edit applied to K and V (cross-attention only)."""

    def __init__(self, layer: str, edits: EditSet):
        super().__init__()
        self.layer = layer
        self.edits = edits

    def edited(self, proj, e: torch.Tensor, which: str) -> torch.Tensor:
        """proj(e) with the edit: W(e - P e) + sum_j lambda_j sigmoid((s_j - beta)/tau) o*_j."""
        out = proj(e)
        edits = self.edits
        betas, taus, lam = edits.knobs()
        geo = edits.geometry(e.device, torch.float32)
        ef = e.float()
        I = geo.i_stars.to(out.dtype)
        WI = (proj(I) - proj(torch.zeros_like(I[:1]))).float()  # (n, out): W i*_j (affine-safe)
        k = ef @ geo.cinv_u.T  # (B, N, n): e^T C^-1 u_m
        if all(x == lam[0] for x in lam):
            removal = lam[0] * (k @ (geo.linv @ WI))  # lambda W sum_m u_m (e^T C^-1 u_m)
        else:
            lam_t = torch.tensor(lam, device=e.device, dtype=torch.float32)
            removal = ((k @ geo.linv) * lam_t) @ WI  # W sum_j lambda_j c_j i*_j
        s = ef @ geo.gate_vecs.T  # (B, N, n)
        beta = torch.tensor(betas, device=e.device, dtype=torch.float32)
        tau = torch.tensor(taus, device=e.device, dtype=torch.float32)
        weights = torch.sigmoid((s - beta) / tau) * torch.tensor(lam, device=e.device, dtype=torch.float32)
        targets = [(c.o_k if which == "k" else c.o_v)[self.layer] for c in edits.edits]
        O = torch.stack([t.to(e.device, torch.float32) for t in targets])  # (n, out)
        return out + (weights @ O - removal).to(out.dtype)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        # AttnProcessor2_0.__call__ (diffusers 0.42.1), with K/V computed by ``edited``
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:  # self-attention: no text, no edit
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key = self.edited(attn.to_k, encoder_hidden_states, "k")
            value = self.edited(attn.to_v, encoder_hidden_states, "v")
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _cross_attention_layers(unet) -> list[str]:
    return [n.removesuffix(".processor") for n in unet.attn_processors if n.endswith("attn2.processor")]


def install(unet, edits: EditSet) -> dict:
    """Install Perfusion processors on every ``attn2`` (others kept); returns the processors it replaced."""
    saved = dict(unet.attn_processors)
    layers = _cross_attention_layers(unet)
    missing = [layer for layer in layers if layer not in edits.layers()]
    if missing:
        raise ValueError(f"Perfusion concept(s) {[e.name for e in edits.edits]} have no edit for layer {missing[0]} "
                         "of this UNet; they were learned on another base model")
    procs = {name: (PerfusionAttnProcessor(name.removesuffix(".processor"), edits)
                    if name.endswith("attn2.processor") else proc) for name, proc in saved.items()}
    unet.set_attn_processor(procs)
    return saved


@contextlib.contextmanager
def installed(unet, edits: EditSet) -> Iterator[EditSet]:
    saved = install(unet, edits)
    try:
        yield edits
    finally:
        unet.set_attn_processor(saved)


# --------------------------------------------------------------------------- the covariance

_COV_MEMO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def corpus(config: PerfusionConfig) -> list[str]:
    if config.caption_file:
        lines = [ln.strip() for ln in Path(config.caption_file).read_text().splitlines()]
        return [ln for ln in lines if ln][: config.cov_captions or None]

    return [caption(s) for s, _ in base_samples(config.cov_captions, seed=2023)]


@torch.no_grad()
def text_covariance(pipe, captions: list[str], cache_dir: Path | None = None, batch: int = 64) -> torch.Tensor:
    """Uncentred covariance (d, d, float64) of the cross-attention input (the text-encoder outputs; on SDXL
    both encoders' outputs concatenated, d = 2048) at every non-padding position of ``captions``; cached in
    ``cache_dir/perfusion/`` and in memory per text encoder."""
    encoder = pipe.text_encoder
    fingerprint = hashlib.sha256()
    for _, text_encoder in tokens.text_pairs(pipe):
        for name, p in text_encoder.named_parameters():
            if "token_embedding" not in name:  # rows are added per concept; base captions never use them
                fingerprint.update(f"{name}{tuple(p.shape)}{p.detach().double().sum().item():.10e}".encode())
    fingerprint.update(json.dumps(captions).encode())
    key = fingerprint.hexdigest()[:16]
    memo = _COV_MEMO.setdefault(encoder, {})
    if key in memo:
        return memo[key]
    path = Path(cache_dir) / "perfusion" / f"text-covariance-{len(captions)}-{key}.safetensors" \
        if cache_dir is not None else None
    if path is not None and path.is_file():
        memo[key] = load_file(path)["covariance"]
        return memo[key]
    total, count = 0.0, 0
    for i in range(0, len(captions), batch):
        mask = pipe.tokenizer(captions[i:i + batch], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").attention_mask
        hidden = encode_prompts(pipe, captions[i:i + batch]).double().cpu()
        feats = hidden[mask.bool()]
        total += feats.T @ feats
        count += len(feats)
    cov = total / max(count, 1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save_bytes({"covariance": cov.contiguous()}))
    memo[key] = cov
    return cov


def regularised_inverse(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    """(C + ridge * trace(C)/d * I)^-1 in float64."""
    d = cov.shape[0]
    cov = cov.double()
    return torch.linalg.inv(cov + ridge * torch.trace(cov) / d * torch.eye(d, dtype=torch.float64))


# --------------------------------------------------------------------------- the method

def _token_position(pipe, prompt: str, token: str) -> int:
    ids = pipe.tokenizer(prompt, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
    token_id = pipe.tokenizer.convert_tokens_to_ids(token)
    if token_id not in ids:
        raise ValueError(f"the training prompt {prompt!r} does not contain the token {token}")
    return ids.index(token_id)


@torch.no_grad()
def _encoding_at(pipe, prompt: str, position: int) -> torch.Tensor:
    return encode_prompts(pipe, [prompt])[0, position].detach().float().cpu()


@register
class Perfusion(Method):
    """Perfusion (Tewel et al. 2023): key-locked, gated rank-1 edits of cross-attention K/V."""

    name = "perfusion"
    config_class = PerfusionConfig
    export_format = "museum"
    independent = True  # each edit is trained on the base model; a prompt installs only the edits it names
    lora_export_why = (
        "Perfusion's edit is not a weight delta: each text token's K/V change is gated by a sigmoid of that token's "
        "similarity to the concept (Tewel et al. 2023, sec. 4), which no LoRA can express, and the edit without its "
        "gate would change every word of every prompt. Export it with --format diffusers (plain diffusers plus "
        "museum.methods.perfusion.load_into), or learn the concept again with a LoRA-based method (custom-diffusion, "
        "c-lora) for AUTOMATIC1111 and ComfyUI")
    removable = True
    generation_options = (
        GenerationOption("gate_bias", "Perfusion gate bias beta (default: each concept's, 0.7)", config_key="beta",
                         swept=True),
        GenerationOption("gate_temp", "Perfusion gate temperature tau (default: each concept's, 0.05; 0.15 on Stable "
                         "Diffusion)", config_key="tau", minimum=0.0, inclusive=False),
        GenerationOption("strength", "Perfusion per-concept strength, NAME=X (repeatable)", per_concept=True),
    )

    @classmethod
    def generation_settings(cls, gate_bias=None, gate_temp=None, strength=None):
        return gate(beta=gate_bias, tau=gate_temp, strength=strength)

    @classmethod
    def cost(cls, kv, width, config) -> ConceptCost:  # o*_K, o*_V per K/V output + i* and C^-1 i* + the token
        outs, b = sum(out for out, _ in kv.values()), config.get("batch_size", 1)
        return ConceptCost(outs + 3 * width, 0, outs // 2 + width, b, 0, added_values=outs // 2, batch_samples=b)

    # ---------------------------------------------------------------- training
    def setup(self, ctx: TrainContext) -> list[dict]:
        cfg, pipe, concept = self.config, ctx.pipe, ctx.concept
        unet = pipe.unet
        self.cinv = regularised_inverse(text_covariance(pipe, corpus(cfg), ctx.cache_dir), cfg.cov_ridge)
        self.prompt = concept_prompt(self, concept)
        self.position = _token_position(pipe, self.prompt, concept.token)
        i_now = _encoding_at(pipe, self.prompt, self.position)
        # i_super: the superclass word's encoding at the concept position (its row set to the class word's
        # embedding in every text encoder, two on SDXL)
        rows = []
        with torch.no_grad():
            for which, (tokenizer, encoder) in enumerate(tokens.text_pairs(pipe)):
                table, token_id = encoder.get_input_embeddings().weight, tokenizer.convert_tokens_to_ids(concept.token)
                rows.append((table, token_id, table[token_id].detach().clone()))
                table[token_id] = tokens.word_vector(pipe, concept.class_word, which).to(table.dtype)
            self.i_super = _encoding_at(pipe, self.prompt, self.position)
            for table, token_id, row in rows:
                table[token_id] = row
        modules = dict(unet.named_modules())
        o_k, o_v, params = {}, {}, []
        with torch.no_grad():
            for layer in _cross_attention_layers(unet):
                attn = modules[layer]
                x = self.i_super.to(unet.device, unet.dtype)[None]
                zero = torch.zeros_like(x)
                o_k[layer] = (attn.to_k(x) - attn.to_k(zero))[0].detach().float().cpu()  # key-locked: not trained
                o_v[layer] = torch.nn.Parameter((attn.to_v(x) - attn.to_v(zero))[0].detach().float().to(unet.device))
                params.append(o_v[layer])
        cinv_i = (self.cinv @ i_now.double()).float()
        self.edit = ConceptEdit(concept.name, concept.token, i_now, cinv_i, o_k, o_v,
                                beta=cfg.train_beta, tau=cfg.train_tau)
        self.original_processors = install(unet, EditSet([self.edit], training=True))
        return [{"params": params, "lr": cfg.lr, "weight_decay": 0.0}]

    def update_i_star(self, encoding: torch.Tensor) -> None:
        """One EMA step of i* toward the concept's current encoding (no gradient)."""
        ema = self.config.ema
        new = ema * self.edit.i_star + (1 - ema) * encoding.detach().float().cpu()
        self.edit.set_i_star(new, self.cinv)

    def after_optimizer_step(self, ctx: TrainContext, batch: dict) -> None:
        self.update_i_star(batch["text"][0, self.position])

    def trainable_state(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        out = {f"o_v.{layer}": p.detach().clone() for layer, p in self.edit.o_v.items()}
        out["i_star"] = self.edit.i_star.clone()
        return out

    def load_trainable_state(self, ctx: TrainContext, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for layer, p in self.edit.o_v.items():
                p.copy_(tensors[f"o_v.{layer}"])
        self.edit.set_i_star(tensors["i_star"], self.cinv)

    def finish(self, ctx: TrainContext):
        return self.edit.tensors(), {}

    def teardown(self, ctx: TrainContext) -> None:
        if getattr(self, "original_processors", None) is not None:
            ctx.pipe.unet.set_attn_processor(self.original_processors)
            self.original_processors = None

    # ---------------------------------------------------------------- generation
    def activate(self, pipe, concepts: list[ConceptInfo], active: list[ConceptInfo], state):
        if not active:
            return contextlib.nullcontext()
        edits = [ConceptEdit.from_tensors(c.name, c.token, c.tensors, c.config) for c in active]
        return installed(pipe.unet, EditSet(edits))


# --------------------------------------------------------------------------- loading an export

def load_into(pipe, export_dir: str | Path, *, beta: float | None = None, tau: float | None = None,
              strength: float | None = None) -> list[str]:
    """Install the Perfusion concepts of a ``museum export`` in a plain diffusers pipeline, permanently.

    Adds each concept's token (``pipe.load_textual_inversion``) and installs
    :class:`PerfusionAttnProcessor` on every ``attn2`` with all the export's Perfusion concepts
    active (processors already installed by an earlier ``load_into`` keep their concepts).
    ``beta``/``tau``/``strength`` replace the stored gate settings; :func:`gate` still overrides
    them per call. Undo with ``pipe.unet.set_default_attn_processor()``. Returns the tokens added.
    """
    export_dir = Path(export_dir)
    meta = json.loads((export_dir / "museum_export.json").read_text())
    mine = [c for c in meta.get("museum_concepts", []) if c["method"] == Perfusion.name]
    if not mine:
        raise ValueError(f"{export_dir} holds no Perfusion concepts")
    edits, added = [], []
    for c in mine:
        tensors = load_file(export_dir / c["file"])
        token = c["token"]
        if token not in pipe.tokenizer.get_vocab():  # both text encoders on SDXL
            tokens.add_token(pipe, token, tensors[token][0], tensors[token + tokens.SECOND][0]
                             if tokens.is_sdxl(pipe) else None)
            added.append(token)
        edit = ConceptEdit.from_tensors(c["name"], token, tensors, c.get("config"))
        edit.beta = edit.beta if beta is None else float(beta)
        edit.tau = edit.tau if tau is None else float(tau)
        edit.strength = edit.strength if strength is None else float(strength)
        edits.append(edit)
    unet = pipe.unet
    current = [p for n, p in unet.attn_processors.items() if n.endswith("attn2.processor")]
    earlier = current[0].edits.edits if current and isinstance(current[0], PerfusionAttnProcessor) else []
    names = {e.name for e in edits}
    install(unet, EditSet([e for e in earlier if e.name not in names] + edits))
    return added

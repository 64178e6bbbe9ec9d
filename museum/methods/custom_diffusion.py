"""Custom Diffusion (Kumari et al., CVPR 2023): fine-tune cross-attention K/V plus a modifier token.

Training uses diffusers' own ``CustomDiffusionAttnProcessor`` (train_kv=True), which also
detaches the start token's K/V gradients (sec. 3.1). The loss adds prior preservation:

    L = L_diff(concept images, "a <V*> circle") + lambda_prior * L_diff(class images, "a circle")

with class images generated once by the base model and cached in the museum (no retrieval
is available offline; diffusers' DreamBooth does the same). Each concept stores its dense
deltas dW_k, dW_v per layer.

Several Custom Diffusion concepts in one prompt are combined by the paper's closed-form
merge (sec. 3.2, METHODS.md): per layer

    W = W0 + (V^T - W0 C^T) (D C^T)^-1 D,   D = C (C_reg^T C_reg)^-1

with C the text features of the concepts' prompts (duplicate rows removed), V^T their
fine-tuned outputs, C_reg the features of generic captions. A small ridge term keeps both
inverses stable on small models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

from museum.methods.base import ConceptCost, ConceptInfo, Method, MethodConfig, TrainContext, register
from museum.methods.prior import generated_latents, generic_captions
from museum.plumbing import kv
from museum.plumbing.objectives import concept_prompt, denoising_loss, diffusion_target, encode_prompts
from museum.world.render import base_samples, caption

RIDGE = 1e-3


@dataclass
class CustomDiffusionConfig(MethodConfig):
    steps: int = 300
    batch_size: int = 4
    lr: float = 5e-4
    token_lr: float = 1e-3
    token_init: str = "class"
    class_word_in_prompt: bool = True
    prior_weight: float = 1.0
    num_class_images: int = 32

    SD15 = dict(steps=500, batch_size=2, lr=2e-5, token_lr=1e-5 * 2 * 1e3, num_class_images=200)


def _processor_to_module(proc_name: str, which: str) -> str:
    return proc_name.removesuffix(".processor") + f".to_{which}"


@register
class CustomDiffusion(Method):
    name = "custom-diffusion"
    config_class = CustomDiffusionConfig
    export_format = "lora"
    joint = True  # learned together, every concept keeps the run's K/V deltas (and its own token)
    independent = True  # deltas trained from the base K/V with the base model's class images; one concept drawn
    # alone applies only its own deltas (the merge joins several named in one prompt)

    @classmethod
    def cost(cls, kv, width, config) -> ConceptCost:  # dense K/V deltas, trained in place; the prior batch doubles
        b, dense = config.get("batch_size", 1), sum(out * inp for out, inp in kv.values())
        samples = 2 * b if config.get("prior_weight", 1) else b
        classes = config.get("num_class_images", 0) * 25 * 2  # 25 DDIM steps with classifier-free guidance
        return ConceptCost(dense + width, 0, dense + width, samples, classes, added_values=0, batch_samples=samples)

    # ---------------------------------------------------------------- training
    def setup(self, ctx: TrainContext) -> list[dict]:
        unet = ctx.pipe.unet
        self.class_latents, self.class_prompts = self._class_data(ctx)
        self.class_text = encode_prompts(ctx.pipe, self.class_prompts).detach()
        self.original_processors = dict(unet.attn_processors)
        modules = dict(unet.named_modules())
        processors, params = {}, []
        for name, proc in self.original_processors.items():
            if not name.endswith("attn2.processor"):
                processors[name] = proc
                continue
            attn = modules[name.removesuffix(".processor")]
            cd = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False, hidden_size=attn.to_k.out_features,
                                              cross_attention_dim=attn.to_k.in_features)
            cd.to(unet.device, unet.dtype)
            with torch.no_grad():
                cd.to_k_custom_diffusion.weight.copy_(attn.to_k.weight)
                cd.to_v_custom_diffusion.weight.copy_(attn.to_v.weight)
            processors[name] = cd
            params += [cd.to_k_custom_diffusion.weight, cd.to_v_custom_diffusion.weight]
        unet.set_attn_processor(processors)
        for p in params:
            p.requires_grad_(True)
        self.w0 = kv.kv_weights(unet)
        return [{"params": params, "lr": self.config.lr}]

    def _class_data(self, ctx: TrainContext) -> tuple[torch.Tensor, list[str]]:
        """Class images (as latents) from the base model, generated once per (classes, count) and cached; learning
        several concepts together, an equal share of each one's class (the paper's joint training, sec. 3.2)."""
        n, concepts = self.config.num_class_images, ctx.together or [ctx.concept]
        share = max(1, n // len(concepts))
        prompts = [p for c in concepts  # a style's "class" is generic content
                   for p in (generic_captions(share) if c.is_style else [f"a {c.class_word}"] * share)]
        name = "+".join(dict.fromkeys(c.class_word for c in concepts))
        return generated_latents(ctx.pipe, prompts, ctx.cache_dir, f"{name}-{n}"), prompts

    def loss_terms(self, ctx: TrainContext, batch: dict) -> dict[str, torch.Tensor]:
        if self.config.prior_weight == 0:
            return {}
        gen, sched, unet = batch["generator"], batch["scheduler"], ctx.pipe.unet
        idx = torch.randint(0, len(self.class_latents), (len(batch["x0"]),), generator=gen)
        x0 = self.class_latents[idx].to(unet.device, unet.dtype)
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=gen).to(unet.device)
        pred = unet(sched.add_noise(x0, noise, t), t, self.class_text[idx]).sample
        return {"prior": self.config.prior_weight * denoising_loss(pred, diffusion_target(sched, x0, noise, t))}

    def _trained(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        out = {}
        for name, proc in ctx.pipe.unet.attn_processors.items():
            if isinstance(proc, CustomDiffusionAttnProcessor):
                out[_processor_to_module(name, "k")] = proc.to_k_custom_diffusion.weight
                out[_processor_to_module(name, "v")] = proc.to_v_custom_diffusion.weight
        return out

    def trainable_state(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._trained(ctx).items()}

    def load_trainable_state(self, ctx: TrainContext, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, w in self._trained(ctx).items():
                w.copy_(tensors[name])

    def finish(self, ctx: TrainContext):
        deltas = {f"delta.{n}": (w.detach() - self.w0[n]).float().cpu() for n, w in self._trained(ctx).items()}
        return deltas, {}

    def teardown(self, ctx: TrainContext) -> None:
        ctx.pipe.unet.set_attn_processor(self.original_processors)

    # ---------------------------------------------------------------- generation
    def kv_deltas(self, concepts: list[ConceptInfo], active: list[ConceptInfo], state, pipe):
        if not active:
            return {}
        own = [{k.removeprefix("delta."): v for k, v in c.tensors.items() if k.startswith("delta.")} for c in active]
        if len(active) == 1:
            return own[0]
        return self.merge(pipe, active, own)

    def merge(self, pipe, concepts: list[ConceptInfo], deltas: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Closed-form merge of several concepts' K/V (Custom Diffusion eq. 4-5); returns W - W0 per layer."""
        feats = [_token_features(pipe, [concept_prompt(self, c)]) for c in concepts]
        c_reg = _generic_features(pipe)
        w0 = kv.kv_weights(pipe.unet)
        merged = {}
        for name, W0 in w0.items():
            W0 = W0.float()
            C = torch.cat(feats)  # (s, d)
            Vt = torch.cat([(W0 + d[name]) @ f.T for d, f in zip(deltas, feats)], dim=1)  # (out, s)
            C, keep = _unique_rows(C)
            Vt = Vt[:, keep]
            eye = torch.eye(C.shape[1])
            M = c_reg.T @ c_reg + RIDGE * torch.trace(c_reg.T @ c_reg) / C.shape[1] * eye
            D = torch.linalg.solve(M, C.T).T  # C M^-1  (M symmetric)
            DCt = D @ C.T
            DCt = DCt + RIDGE * torch.trace(DCt) / len(DCt) * torch.eye(len(DCt))
            W = W0 + (Vt - W0 @ C.T) @ torch.linalg.solve(DCt, D)
            merged[name] = W - W0
        return merged


@torch.no_grad()
def _token_features(pipe, prompts: list[str]) -> torch.Tensor:
    """Text-encoder outputs at every position up to and including the end token: (sum of lengths, d)."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    hidden = encode_prompts(pipe, prompts).float().cpu()  # what cross-attention reads (both encoders on SDXL)
    lengths = ids.attention_mask.sum(1)
    return torch.cat([hidden[i, :lengths[i]] for i in range(len(prompts))])


def _generic_features(pipe, n: int = 200) -> torch.Tensor:
    """C_reg: features of generic captions (the base world's), cached on the text encoder."""
    encoder = pipe.text_encoder
    if getattr(encoder, "_museum_generic_features", None) is None:
        prompts = [caption(s) for s, _ in base_samples(n, seed=777)]
        encoder._museum_generic_features = _token_features(pipe, prompts)
    return encoder._museum_generic_features


def _unique_rows(x: torch.Tensor, tol: float = 1e-5) -> tuple[torch.Tensor, list[int]]:
    keep: list[int] = []
    for i in range(len(x)):
        if all((x[i] - x[j]).abs().max() > tol for j in keep):
            keep.append(i)
    return x[keep], keep

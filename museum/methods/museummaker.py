"""MuseumMaker (Liu et al., IEEE TIP 2025): a never-ending sequence of styles on one shared LoRA.

No public code; only the abstract and reviews (METHODS.md sec. 5), so this is Museum's reading.
Every task continues ONE LoRA on the cross-attention K/V projections (museum state, as in
``finetune``) and adds a task-wise token ("<s3> style"). The loss of task t is

    L = L_diff("<s_t> style", style images)
        + style_weight   * L_style       style distillation: the style's statistics, not its images' content
        + weight_reg     * L_weight      weight level: the update of task t against earlier tasks' updates
        + feature_weight * L_feature     feature level: data-free distillation on earlier tokens

each term switched off by a weight of 0 (the benchmark's ablations).

**Style distillation** (styles only). Few style images carry their content (the user's "stars")
with the style; trained on them alone, "<s> style" also means "stars", and "a circle, <s> style"
is drawn deformed (measured on the embedded model: lumpy shapes, read as a circle 0-25% of the time,
docs/METHODS.md). Content comes from elsewhere: generic captions of the world ("a blue circle on a
grass background") drawn once by the base model (cached, ``museum.methods.prior``). Each step,
such a content latent c_i is noised to x_t and the model, prompted "caption_i, <s_t> style",
predicts x0_hat (through the eps prediction). Two parts:

* style statistics (Huang and Belongie 2017's AdaIN moments, Gatys et al. 2016's Gram matrix, on
  latents): the per-channel mean mu and the channel covariance G (Gram matrix of the channel-centred
  latent, over positions) of x0_hat are matched to the style images' (mean over the task's
  un-augmented latents), ||mu - mu_s||^2 + alpha_bar_t ||G - G_s||^2. The covariance is weighted by
  alpha_bar_t (x0_hat is a blurred mean at high noise, whose covariance must not be pushed towards a
  sharp image's); the mean is not: global colour is decided at high noise, where the eps loss hardly
  sees it;
* content (the STROTSS self-similarity of Kolkin et al. 2019, on latents): the cosine
  self-similarity matrix of the channel-centred x0_hat over positions (average-pooled to at most
  16 x 16) is matched to that of the frozen BASE model's x0_hat for the same x_t and the caption
  without the style ("caption_i"). Self-similarity does not change under a per-channel shift or a
  channel mixing, so it holds the layout (a circle stays a circle) and leaves the colours to the style.

    L_style = mean_i [ ||mu(x0_hat) - mu_s||^2 + alpha_bar_t ||G(x0_hat) - G_s||^2
                       + content_weight * ||S(x0_hat) - S(x0_base)||^2 ]

The reviewed form (a temperature-softmax KL between x0_hat and the style images' mean latent) pulls
every image towards one average layout, which is itself content; we use statistics plus a content
anchor instead (deviation recorded in docs/METHODS.md).

**Weight-level regularisation.** The update of task t, dW_t = W(theta) - W(theta at task start)
per K/V layer, is pushed away from the direction of each earlier task's update dW_j (stored with
concept j as rank-2r factors, ``update/{module}.lora_A|B``):

    L_weight = mean_layers sum_{j<t} cos^2(vec dW_t, vec dW_j)

scale-free (each cos^2 in [0, 1]), so the weight is comparable across models.

**Feature-level data-free distillation.** The frozen model before the task (``TrainContext.teacher``,
W0 + the shared LoRA as task t-1 left it) is the teacher; the inputs are the content latents noised
at any timestep, the prompts name an earlier concept j of this method ("caption_i, <s_j> style");
the outputs of every cross-attention block are matched (no earlier image is stored: earlier
concepts contribute only their tokens):

    L_feature = mean_layers ||attn2_student(x_t, c_j) - attn2_teacher(x_t, c_j)||^2

Cost. The noised content x_t is a bank drawn once per task (``num_content_images`` x ``bank_draws``
noise/timestep draws; the content latents themselves are cached in the museum), and the base
model's content of each bank entry is computed then, while the UNet is still the base model. Each
step then adds one forward-backward pass over ``distill_batch`` style and ``distill_batch`` feature
samples together, and from task 2 on one teacher forward pass. For an object concept the style
distillation is skipped (there is no style to separate) and the other two terms apply as above.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from museum.methods.base import ConceptCost, ConceptInfo, TrainContext, lora_values, register
from museum.methods.continual import earlier_concepts, encode_fixed, varied_prompts
from museum.methods.distill import cross_attention_outputs
from museum.methods.lora import LoRAConfig, LoRAMethod, SharedLoRAMethod
from museum.methods.prior import GENERIC_SEED, generated_latents, generic_captions
from museum.plumbing import kv
from museum.plumbing.objectives import encode_prompts, predicted_x0

UPDATE = "update/"
MAX_CONTENT_SIDE = 16


@dataclass
class MuseumMakerConfig(LoRAConfig):
    style_weight: float = 1.0  # style distillation (styles only; 0 switches it off)
    content_weight: float = 1.0  # the content part of the style distillation, relative to its statistics
    weight_reg: float = 0.1  # weight-level regularisation (0 switches it off)
    feature_weight: float = 10.0  # feature-level data-free distillation (0 switches it off)
    distill_batch: int = 2  # samples per step for each distillation term (both share one forward pass)
    num_content_images: int = 32  # generic content drawn once by the base model (cached in the museum)
    bank_draws: int = 4  # noise/timestep draws per content image, fixed for the task (see _content_bank)

    SD15 = dict(LoRAConfig.SD15, style_weight=1.0, content_weight=1.0, weight_reg=0.1, feature_weight=10.0,
                distill_batch=2, num_content_images=200, bank_draws=4)


# ----------------------------------------------------------------------------- statistics of latents


def style_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image channel means (N, C) and channel covariances (N, C, C) over positions."""
    flat = x.float().flatten(2)
    mu = flat.mean(-1)
    centred = flat - mu[..., None]
    return mu, centred @ centred.transpose(1, 2) / flat.shape[-1]


def self_similarity(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between positions of the channel-centred latent (N, P, P), P <= 16 x 16."""
    x = x.float()
    if max(x.shape[-2:]) > MAX_CONTENT_SIDE:
        x = F.adaptive_avg_pool2d(x, MAX_CONTENT_SIDE)
    flat = x.flatten(2)
    flat = F.normalize(flat - flat.mean(-1, keepdim=True), dim=1)  # unit vector per position
    return flat.transpose(1, 2) @ flat


def update_factors(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank-2r factors of a task's update, B' A' = B_end A_end - B_start A_start."""
    out = {}
    for key in end:
        if key.endswith(".lora_A"):
            out[UPDATE + key] = torch.cat([end[key], start[key]]).float().cpu()
        else:
            out[UPDATE + key] = torch.cat([end[key], -start[key]], dim=1).float().cpu()
    return out


def task_update(concept: ConceptInfo) -> dict[str, torch.Tensor]:
    """Dense update dW_j of an earlier MuseumMaker task, per K/V module."""
    factors = {k.removeprefix(UPDATE): v for k, v in concept.tensors.items() if k.startswith(UPDATE)}
    return kv.factor_deltas(factors, LoRAMethod.concept_scale(concept))


@register
class MuseumMaker(SharedLoRAMethod):
    name = "museummaker"
    config_class = MuseumMakerConfig

    @classmethod
    def cost(cls, kv, width, config) -> ConceptCost:  # its rank-2r task update per concept
        shared, n = super().cost(kv, width, config), config.get("distill_batch", 0)
        return replace(shared, concept_values=width + lora_values(kv, 2 * config.get("rank", 0)),
                       passes_per_step=config.get("batch_size", 1) + 2 * n + n / 3)

    def _style_on(self, ctx: TrainContext) -> bool:
        return ctx.concept.is_style and self.config.style_weight > 0

    def _feature_on(self, ctx: TrainContext) -> bool:
        return self.config.feature_weight > 0 and bool(earlier_concepts(self, ctx))

    def wants_teacher(self, ctx: TrainContext) -> bool:
        return self._feature_on(ctx)

    # ---------------------------------------------------------------- training
    def setup(self, ctx: TrainContext) -> list[dict]:
        cfg, pipe = self.config, ctx.pipe
        earlier = earlier_concepts(self, ctx)
        n = cfg.num_content_images
        self.styled_prompts = self.earlier_text = None
        if self._style_on(ctx) or self._feature_on(ctx):
            self._content_bank(ctx)
        if self._style_on(ctx):
            self.styled_prompts = [f"{c}, {self.phrase(ctx.concept)} style" for c in generic_captions(n)]
            clean = ctx.latents.mask.flatten(1).amin(1) > 0.5  # un-augmented variants (whole image valid)
            mu, gram = style_statistics(ctx.latents.mean[clean])
            self.style_mu, self.style_gram = mu.mean(0), gram.mean(0)
        if self._feature_on(ctx):  # prompt i names the scene of content latent i
            self.earlier_text = torch.stack([encode_fixed(pipe, varied_prompts(self, c, n, GENERIC_SEED))
                                             for c in earlier])  # (J, n, L, D)
        self.earlier_updates = []
        if cfg.weight_reg > 0:
            for c in earlier:
                units = {}
                for name, d in task_update(c).items():
                    norm = d.norm()
                    if norm > 0:
                        units[name] = d / norm
                self.earlier_updates.append(units)
        groups = super().setup(ctx)
        self.start_dense = self.start_deltas()
        return groups

    @torch.no_grad()
    def _content_bank(self, ctx: TrainContext) -> None:
        """Noised generic content x_t (``bank_draws`` noise/timestep draws per content latent) and, for the
        style distillation, the base model's content (self-similarity of its x0_hat) for each. Runs before
        the LoRA is installed, so the UNet is the base model."""
        cfg, pipe, unet, sched = self.config, ctx.pipe, ctx.pipe.unet, ctx.noise_scheduler
        n, k = cfg.num_content_images, cfg.bank_draws
        captions = generic_captions(n)
        content = generated_latents(pipe, captions, ctx.cache_dir, f"style-{n}")  # shared with Custom Diffusion
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + 2)
        self.bank_scene = torch.arange(n).repeat(k)
        c = content[self.bank_scene]
        self.bank_t = torch.randint(0, sched.config.num_train_timesteps, (len(c),), generator=gen)
        self.bank_noisy = sched.add_noise(c, torch.randn(c.shape, generator=gen), self.bank_t)
        self.bank_content = None
        if self._style_on(ctx):
            text = encode_fixed(pipe, captions)
            out = []
            for i in range(0, len(c), 32):
                noisy = self.bank_noisy[i:i + 32].to(unet.device, unet.dtype)
                t = self.bank_t[i:i + 32].to(unet.device)
                pred = unet(noisy, t, text[self.bank_scene[i:i + 32]]).sample
                out.append(self_similarity(predicted_x0(sched, noisy, pred, t)).cpu())
            self.bank_content = torch.cat(out)

    def loss_terms(self, ctx: TrainContext, batch: dict) -> dict[str, torch.Tensor]:
        terms = {}
        if self.styled_prompts is not None or self.earlier_text is not None:
            terms.update(self.distillation(ctx, batch))
        if any(self.earlier_updates):  # some earlier update is non-zero
            terms["weight_regularisation"] = self.config.weight_reg * self.weight_regularisation(ctx)
        return terms

    def distillation(self, ctx: TrainContext, batch: dict) -> dict[str, torch.Tensor]:
        """The style and the feature distillation, from one student forward pass over both their samples."""
        unet, sched, gen = ctx.pipe.unet, batch["scheduler"], batch["generator"]
        k = self.config.distill_batch
        style_on, feature_on = self.styled_prompts is not None, self.earlier_text is not None
        pick_s = torch.randint(0, len(self.bank_t), (k if style_on else 0,), generator=gen)
        pick_f = torch.randint(0, len(self.bank_t), (k if feature_on else 0,), generator=gen)
        texts = []
        if style_on:  # names the new token: encoded each step, with gradient to the token
            texts.append(encode_prompts(ctx.pipe, [self.styled_prompts[i] for i in self.bank_scene[pick_s].tolist()]))
        if feature_on:  # an earlier concept per sample, in the sample's scene
            j = torch.randint(0, len(self.earlier_text), (k,), generator=gen)
            texts.append(self.earlier_text[j, self.bank_scene[pick_f]].to(batch["text"]))
        pick = torch.cat([pick_s, pick_f])
        noisy = self.bank_noisy[pick].to(unet.device, unet.dtype)
        t = self.bank_t[pick].to(unet.device)
        text = torch.cat(texts)
        with cross_attention_outputs(unet) as feats:
            pred = unet(noisy, t, text).sample
        terms = {}
        ks = len(pick_s)
        if style_on:
            x0_hat = predicted_x0(sched, noisy[:ks], pred[:ks], t[:ks])
            mu, gram = style_statistics(x0_hat)
            signal = sched.alphas_cumprod.to(t.device)[t[:ks]].float()
            stats = (((mu - self.style_mu.to(mu)) ** 2).mean(-1)
                     + signal * ((gram - self.style_gram.to(gram)) ** 2).mean((-2, -1)))
            content = ((self_similarity(x0_hat) - self.bank_content[pick_s].to(x0_hat)) ** 2).mean((-2, -1))
            loss = (stats + self.config.content_weight * content).mean()
            terms["style_distillation"] = self.config.style_weight * loss
        if feature_on:
            with torch.no_grad(), cross_attention_outputs(ctx.teacher) as target:
                ctx.teacher(noisy[ks:], t[ks:], text[ks:])
            loss = torch.stack([F.mse_loss(f[ks:].float(), g.float()) for f, g in zip(feats, target)]).mean()
            terms["feature_distillation"] = self.config.feature_weight * loss
        return terms

    def weight_regularisation(self, ctx: TrainContext) -> torch.Tensor:
        live = kv.live_lora_deltas(ctx.pipe.unet, self.adapter)
        per_layer = []
        for name, w in live.items():
            units = [u[name] for u in self.earlier_updates if name in u]
            if units:
                d = w.float() - self.start_dense[name].to(w.device)
                sq_norm = (d * d).sum() + 1e-20
                per_layer.append(torch.stack([(d * u.to(d)).sum() ** 2 for u in units]).sum() / sq_norm)
        return torch.stack(per_layer).mean()

    def finish(self, ctx: TrainContext):
        _, state = super().finish(ctx)
        return update_factors(self.start, self.factors(ctx)), state

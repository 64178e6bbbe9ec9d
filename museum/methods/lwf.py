"""Learning without Forgetting (Li and Hoiem, ECCV 2016 / TPAMI 2017) on the shared K/V LoRA.

The same parameterisation as ``finetune`` (one LoRA on cross-attention K/V that every task
continues, a new token per concept). While task t is learned, the model before the task (a
frozen copy, ``TrainContext.teacher``) is distilled on the CURRENT task's images with the
EARLIER concepts' prompts, so what the earlier prompts produce is kept without their images:

    L = L_diff + lambda_o * E ||eps_theta(x_t, t, c_j) - eps_theta*(x_t, t, c_j)||^2      (eq. 2 of the
                                                                                          TPAMI paper)

x_t are the step's noised training latents (the first ``distill_batch`` of the batch), c_j the
training prompt of an earlier concept j of this method drawn at random per sample ("<s1> style",
"a <v2>"). The paper's distillation is a temperature-softened cross-entropy between class
outputs; for a denoiser the output is a regression target and the squared error is its analogue
(as in the continual-diffusion baselines of CIDM and C-LoRA's comparisons). No earlier image is
read or stored: earlier concepts contribute only their tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from museum.methods.base import ConceptCost, TrainContext, register
from museum.methods.continual import earlier_concepts, encode_fixed
from museum.methods.distill import output_distillation
from museum.methods.lora import LoRAConfig, SharedLoRAMethod
from museum.plumbing.objectives import concept_prompt


@dataclass
class LwFConfig(LoRAConfig):
    lwf_weight: float = 1.0  # lambda_o (0 switches the distillation off)
    distill_batch: int = 2  # how many of the step's noised images are distilled with earlier prompts

    SD15 = dict(LoRAConfig.SD15, lwf_weight=1.0, distill_batch=2)


@register
class LwF(SharedLoRAMethod):
    name = "lwf"
    config_class = LwFConfig

    @classmethod
    def cost(cls, kv, width, config) -> ConceptCost:  # the distillation adds a student and a teacher pass
        shared, n = super().cost(kv, width, config), config.get("distill_batch", 0)
        return replace(shared, passes_per_step=config.get("batch_size", 1) + n * (1 + 1 / 3))

    def wants_teacher(self, ctx: TrainContext) -> bool:
        return self.config.lwf_weight > 0 and bool(earlier_concepts(self, ctx))

    def setup(self, ctx: TrainContext) -> list[dict]:
        earlier = earlier_concepts(self, ctx)
        self.earlier_text = encode_fixed(ctx.pipe, [concept_prompt(self, c) for c in earlier]) if earlier else None
        return super().setup(ctx)

    def loss_terms(self, ctx: TrainContext, batch: dict) -> dict[str, torch.Tensor]:
        if self.earlier_text is None or self.config.lwf_weight == 0:
            return {}
        n = min(self.config.distill_batch, len(batch["noisy"]))
        pick = torch.randint(0, len(self.earlier_text), (n,), generator=batch["generator"])
        text = self.earlier_text[pick].to(batch["text"])
        loss = output_distillation(ctx.pipe.unet, ctx.teacher, batch["noisy"][:n], batch["t"][:n], text)
        return {"lwf": self.config.lwf_weight * loss}

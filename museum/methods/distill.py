"""Distillation against the frozen model from before a task (``TrainContext.teacher``), in one place.

* :func:`output_distillation`: ||eps_student(x_t, t, c) - eps_teacher(x_t, t, c)||^2 for given inputs
  (LwF uses it on the task's own noised images; :class:`DataFreeDistillation` on inputs made from noise);
* :func:`cross_attention_outputs`: the outputs of every cross-attention block, for feature-level
  distillation (MuseumMaker);
* :class:`DataFreeDistillation`: LFS-Diffusion's data-free knowledge distillation (Song et al. 2024,
  METHODS.md sec. 6), a loss term any method with a teacher can add. No image is read: the inputs are

    x_T ~ N(0, I) at the first timestep of a DDIM schedule, and the x_t the TEACHER's own DDIM steps reach
    from it (1 .. ``teacher_steps`` steps, conditioned on the sample's prompt, no guidance),

  and the prompts are given as text conditioning (a concept's class word, earlier concepts' tokens), so

    L_kd = E_{c in P, (x_t, t) in B} ||eps_theta(x_t, t, c) - eps_theta*(x_t, t, c)||^2

  with B the bank of noise inputs, drawn once per task from the teacher (deterministic by ``seed``, so
  a resumed run draws the same bank) and sampled ``batch`` entries per step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler


def output_distillation(unet, teacher, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """||eps_student(x_t, t, c) - eps_teacher(x_t, t, c)||^2 (mean over elements)."""
    with torch.no_grad():
        target = teacher(noisy, t, text).sample
    return F.mse_loss(unet(noisy, t, text).sample.float(), target.float())


@contextmanager
def cross_attention_outputs(unet) -> Iterator[list[torch.Tensor]]:
    """Collect the output of every cross-attention block (``attn2``) of the forward passes run inside."""
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _in, out: outputs.append(out))
               for name, m in unet.named_modules() if name.endswith("attn2")]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def noise_bank(teacher, scheduler_config, text: torch.Tensor, *, teacher_steps: int, inference_steps: int,
               seed: int, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs made from noise alone, one trajectory per prompt (``text``: (P, L, D)).

    Returns (x_t, t, prompt index), each of length P * (teacher_steps + 1): pure noise at the first timestep
    of an ``inference_steps`` DDIM schedule, then the x_t after each of the teacher's first ``teacher_steps``
    deterministic DDIM steps (eta 0) on the sample's own prompt."""
    if not 0 <= teacher_steps < inference_steps:
        raise ValueError(f"teacher_steps must be in [0, inference_steps) = [0, {inference_steps}), got {teacher_steps}")
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(inference_steps)
    cfg = teacher.config
    shape = (len(text), cfg.in_channels, cfg.sample_size, cfg.sample_size)
    param = next(teacher.parameters())
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * sched.init_noise_sigma).to(param.device, param.dtype)
    text = text.to(param.device, param.dtype)
    xs, ts = [], []
    for i, t in enumerate(sched.timesteps[:teacher_steps + 1]):
        xs.append(x.cpu())
        ts.append(torch.full((len(x),), int(t), dtype=torch.long))
        if i == teacher_steps:
            break
        pred = torch.cat([teacher(x[j:j + chunk], t, text[j:j + chunk]).sample for j in range(0, len(x), chunk)])
        x = sched.step(pred, t, x).prev_sample
    index = torch.arange(len(text)).repeat(len(xs))
    return torch.cat(xs), torch.cat(ts), index


class DataFreeDistillation:
    """LFS-Diffusion's data-free distillation term for one task (see the module docstring).

    ``text``: the fixed text conditioning of the prompts to protect (P, L, D), encoded once (they hold no
    token being trained). Build it in :meth:`Method.setup` and call :meth:`loss` from
    :meth:`Method.loss_terms`; the method's :meth:`Method.wants_teacher` must be true for the task."""

    def __init__(self, text: torch.Tensor, *, batch: int, teacher_steps: int, inference_steps: int, seed: int):
        if batch < 1:
            raise ValueError(f"the distillation batch must be at least 1, got {batch}")
        self.text = text.detach()
        self.batch, self.teacher_steps, self.inference_steps, self.seed = batch, teacher_steps, inference_steps, seed
        self.bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def loss(self, unet, teacher, scheduler_config, generator: torch.Generator) -> torch.Tensor:
        if teacher is None:
            raise RuntimeError("data-free distillation needs the frozen model from before the task (ctx.teacher): "
                               "the method's wants_teacher() must be true for this task")
        if self.bank is None:  # the teacher exists only after setup; drawn once, from the model before the task
            self.bank = noise_bank(teacher, scheduler_config, self.text, teacher_steps=self.teacher_steps,
                                   inference_steps=self.inference_steps, seed=self.seed)
        noisy, t, index = self.bank
        pick = torch.randint(0, len(noisy), (self.batch,), generator=generator)
        param = next(unet.parameters())
        return output_distillation(unet, teacher, noisy[pick].to(param.device, param.dtype), t[pick].to(param.device),
                                   self.text[index[pick]].to(param.device, param.dtype))

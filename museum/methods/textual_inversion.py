"""Textual inversion (Gal et al. 2022): one new token embedding v*, everything else frozen.

    v* = argmin_v E ||eps - eps_theta(x_t, t, c_theta("a <v> circle"))||^2      (eq. 2)

Forgets nothing by construction (each concept is its own embedding row); fidelity is
limited by what one word can express. Exports as ``learned_embeds.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass

from museum.methods.base import Method, MethodConfig, register


@dataclass
class TextualInversionConfig(MethodConfig):
    steps: int = 400
    batch_size: int = 4
    lr: float = 0.0  # no UNet parameters
    token_lr: float = 1e-2
    token_init: str = "class"
    class_word_in_prompt: bool = True

    SD15 = dict(steps=3000, batch_size=4, token_lr=5e-3)


@register
class TextualInversion(Method):
    name = "textual-inversion"
    config_class = TextualInversionConfig
    export_format = "textual_inversion"
    independent = True  # only its own token's row trains, and a prompt reads only the rows it names

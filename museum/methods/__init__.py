"""Customization methods, one module each, registered by name (see ``base.py``)."""

from museum.methods import c_lora, custom_diffusion, ewc, finetune, lfs, lwf, museummaker, perfusion, textual_inversion  # noqa: F401  (registers them)
from museum.methods.base import METHODS, Method, MethodConfig, get_method, method_names, register

__all__ = ["METHODS", "Method", "MethodConfig", "get_method", "method_names", "register"]

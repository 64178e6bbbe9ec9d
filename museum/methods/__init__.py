"""Customization methods, one module each (see ``base.py``). Every module of this package is imported here, so
a method module's ``@register`` class is found without a hand-kept list."""

import importlib
import pkgutil

from museum.methods.base import METHODS, Method, MethodConfig, get_method, method_names, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "MethodConfig", "get_method", "method_names", "register"]

"""Whether stored tensors fit a pipeline: a concept's token embedding as wide as each text encoder, and every
tensor that names a cross-attention K/V layer (LoRA factors, dense deltas, per-layer vectors) shaped for that
layer. A concept made for another base model is refused with an error that says what to do, before any of it
is applied."""

from __future__ import annotations

import torch

from museum.errors import MuseumError
from museum.plumbing import kv, tokens

ANOTHER_BASE = "it was made for another base model (restore it from a backup, or `museum remove` the concept)"


def model_shapes(pipe) -> dict:
    """What a concept's tensors must fit: text width and the (out, in) of every cross-attention K/V projection."""
    widths = [encoder.get_input_embeddings().weight.shape[1] for _, encoder in tokens.text_pairs(pipe)]
    return {"width": widths[0], "width_2": widths[1] if len(widths) > 1 else None,
            "kv": {name: tuple(mod.weight.shape) for name, mod in kv.kv_modules(pipe.unet).items()}}


def check_tensors(tensors: dict[str, torch.Tensor], shapes: dict, what: str, token: str | None = None) -> None:
    """Every tensor finite and, where it names a K/V layer or is ``token``'s embedding, shaped for ``shapes``
    (:func:`model_shapes`); LoRA factor pairs of one rank."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise MuseumError(f"{what}: tensor {key} has NaN/Inf values; restore it from a backup, or "
                              "`museum remove` the concept")
        if token is not None and key in (token, token + tokens.SECOND):
            _check_embedding(key, t, shapes, what, second=key != token)
        else:
            _check_layer_tensor(key, t, shapes["kv"], what)
    for key, t in tensors.items():  # LoRA factor pairs must agree on their rank
        if key.endswith(".lora_A") and f"{key[:-7]}.lora_B" in tensors:
            b = tensors[f"{key[:-7]}.lora_B"]
            if b.dim() == 2 and t.dim() == 2 and b.shape[1] != t.shape[0]:
                raise _wrong_shape(what, f"{key[:-7]}.lora_B", b, f"({b.shape[0]}, {t.shape[0]}) to match its lora_A")


def _wrong_shape(what: str, key: str, tensor: torch.Tensor, expected: str) -> MuseumError:
    return MuseumError(f"{what}: tensor {key} has shape {tuple(tensor.shape)}, but this base model needs "
                       f"{expected}; {ANOTHER_BASE}")


def _check_embedding(key: str, t: torch.Tensor, shapes: dict, what: str, *, second: bool) -> None:
    """The token's embedding in the first text encoder, or (``second``) in the second one of SDXL."""
    if not second:
        width = shapes["width"]
        if t.dim() != 2 or t.shape[0] != 1 or t.shape[1] != width:
            raise MuseumError(f"{what}: its token embedding has shape {tuple(t.shape)}, the base model's text "
                              f"encoder needs (1, {width}); {ANOTHER_BASE}")
        return
    width_2 = shapes.get("width_2")
    if width_2 is None or t.dim() != 2 or t.shape[0] != 1 or t.shape[1] != width_2:
        raise MuseumError(f"{what}: its second-encoder token embedding has shape {tuple(t.shape)}, but this "
                          f"base model {'has one text encoder' if width_2 is None else f'needs (1, {width_2})'}"
                          f"; {ANOTHER_BASE}")


def _check_layer_tensor(key: str, t: torch.Tensor, kv_shapes: dict, what: str) -> None:
    """A tensor named after a K/V projection (LoRA factor, dense delta) or an attention layer (a per-layer vector,
    e.g. Perfusion's o*_K / o*_V) has that layer's shape; one that names a layer the model lacks is refused."""
    module = next((n for n in sorted(kv_shapes, key=len, reverse=True) if f"{n}." in f"{key}." or key.endswith(n)),
                  None)
    if module is not None:
        out_f, in_f = kv_shapes[module]
        if key.endswith(".lora_A") and (t.dim() != 2 or t.shape[1] != in_f):
            raise _wrong_shape(what, key, t, f"(rank, {in_f})")
        if key.endswith(".lora_B") and (t.dim() != 2 or t.shape[0] != out_f):
            raise _wrong_shape(what, key, t, f"({out_f}, rank)")
        if key.startswith("delta.") and tuple(t.shape) != (out_f, in_f):
            raise _wrong_shape(what, key, t, f"({out_f}, {in_f})")
        return
    layers = {name.rsplit(".", 1)[0]: name for name in kv_shapes}  # ...attn2 -> ...attn2.to_k
    layer = next((n for n in sorted(layers, key=len, reverse=True) if key.endswith(f".{n}")), None)
    if layer is not None:
        which = "to_k" if ".o_k." in key else "to_v" if ".o_v." in key else None
        if which is not None and (t.dim() != 1 or t.shape[0] != kv_shapes[f"{layer}.{which}"][0]):
            raise _wrong_shape(what, key, t, f"({kv_shapes[f'{layer}.{which}'][0]},)")
        return
    if "attn2" in key:
        raise MuseumError(f"{what}: tensor {key} names a layer this base model does not have; {ANOTHER_BASE}")


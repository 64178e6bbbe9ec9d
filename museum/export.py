"""Export concepts in the formats plain diffusers, AUTOMATIC1111 and ComfyUI load (``museum export --format``).

``diffusers`` (the default) writes

* ``learned_embeds.safetensors``: its token, ``{token: (1, D)}``, for ``pipe.load_textual_inversion``
  (SDXL: ``{"clip_l": (1, D1), "clip_g": (1, D2)}``, loaded into each text encoder);
* ``pytorch_lora_weights.safetensors`` (methods that change K/V): the K/V deltas the museum applies for a
  prompt naming the concept(s), written as one LoRA with its adapter metadata (``unet_lora_adapter_metadata``:
  without it diffusers does not know the LoRA's alpha when it reloads it, and its scale is lost), for
  ``pipe.load_lora_weights``. Every delta is factored by SVD (:func:`deltas_to_lora`): exactly (every singular
  value above 1e-6 of the largest) unless ``rank`` caps it, and the relative error of each layer is recorded;
* ``museum-{name}.safetensors`` (methods with ``export_format = "museum"``, e.g. Perfusion, whose
  effect is not a weight delta): the concept's stored tensors, token included, read by the
  method module's ``load_into(pipe, export_dir)``; ``museum_export.json`` then says
  ``needs_museum: true`` and names the loader;
* what a method's concepts need besides (``Method.export_extras``: e.g. ``lfs`` concepts that keep image
  context write ``ip_adapter_image_embeds.safetensors`` and the lines that load their IP-Adapter);
* ``museum_export.json``: what was exported and the lines that load it.

``kohya`` writes the same LoRA as ``lora/NAME.safetensors`` with kohya/webui keys and alpha (diffusers'
``convert_state_dict_to_kohya``), the file AUTOMATIC1111 (``<lora:NAME:1>``) and ComfyUI (a LoRA loader) read,
and each concept's token as an embedding, as ``a1111`` does. Concepts whose effect is no weight delta are
refused (``Method.lora_export_why``).

``a1111`` writes each concept's token as ``embeddings/NAME.safetensors``, one tensor ``emb_params`` (SDXL:
``clip_l`` and ``clip_g``): those tools trigger an embedding by its file name, so ``NAME`` is the word to type
in place of ``<NAME>``.

Both webui formats also write ``README.txt`` (which folder each file goes in, what to type) and
``museum_export.json`` with the same. Loading an export (diffusers' ``load_lora_weights`` reads kohya keys)
gives the image Museum gives (tests/test_method_matrix.py, tests/test_export_formats.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from safetensors.torch import save_file

from museum.errors import MuseumError
from museum.methods.base import METHODS, ConceptInfo, family_of, get_method
from museum.models.loading import resolve_base
from museum.plumbing.kv import KV_PATTERN
from museum.plumbing.tokens import SECOND, is_sdxl
from museum.store.atomic import atomic_dir
from museum.store.faults import fault_point

#: ``--format`` -> what it writes
FORMATS = {
    "diffusers": "token embeddings + one LoRA for plain diffusers (load_textual_inversion, load_lora_weights)",
    "kohya": "one LoRA with kohya/webui keys + each token as an embedding, for AUTOMATIC1111 and ComfyUI",
    "a1111": "each concept's token as an AUTOMATIC1111/ComfyUI embedding (embeddings/NAME.safetensors)",
}
EXPORT_FILE = "museum_export.json"
LOAD_SNIPPET = """from diffusers import {cls}
pipe = {cls}.from_pretrained("{base}")
{loads}"""
#: an SDXL token: one file with both encoders' rows, loaded into each encoder (diffusers' SDXL layout)
SDXL_TOKEN_LOADS = """from safetensors.torch import load_file; emb = load_file("{file}")
pipe.load_textual_inversion(emb["clip_l"], token="{token}", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
pipe.load_textual_inversion(emb["clip_g"], token="{token}", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"""


@dataclass
class LowRank:
    """A LoRA that factors dense deltas, and how far it is from them."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # per layer (B (out, r), A (r, in)), r by layer
    errors: dict[str, float]  # relative Frobenius error ||dW - B A|| / ||dW|| per layer

    @property
    def rank(self) -> int:
        return max(a.shape[0] for _, a in self.factors.values())

    def state(self, pad: bool) -> dict[str, torch.Tensor]:
        """peft's keys, ``{module}.lora_A.weight`` and ``.lora_B.weight``; ``pad``: every layer zero-padded to
        :attr:`rank` (one peft ``r``, as diffusers' adapter metadata has it; kohya files keep each layer's own)."""
        state = {}
        for name, (b, a) in self.factors.items():
            extra = self.rank - a.shape[0] if pad else 0
            state[f"{name}.lora_A.weight"] = torch.cat([a, a.new_zeros(extra, a.shape[1])]).contiguous()
            state[f"{name}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1).contiguous()
        return state

    def record(self, cap: int | None) -> dict[str, Any]:
        """The rank and errors as museum_export.json keeps them."""
        values = list(self.errors.values())
        return {"rank": self.rank, "rank_cap": cap, "relative_frobenius_error": {
            "max": max(values), "mean": sum(values) / len(values), "per_layer": self.errors}}


def deltas_to_lora(deltas: dict[str, torch.Tensor], max_rank: int | None = None, rel_tol: float = 1e-6) -> LowRank:
    """Low-rank factors of dense deltas by SVD, which gives the closest rank-r matrix in Frobenius norm
    (Eckart-Young): every singular value above ``rel_tol`` of the largest, at most ``max_rank`` of them."""
    factors, errors = {}, {}
    for name, delta in deltas.items():
        u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
        kept = int((s > s[0] * rel_tol).sum()) if s.numel() and s[0] > 0 else 1
        r = max(1, min(kept, max_rank or kept))
        factors[name] = (u[:, :r] * s[:r].sqrt(), s[:r].sqrt()[:, None] * vh[:r])
        total = s.square().sum()
        errors[name] = float((s[r:].square().sum() / total).sqrt()) if total > 0 else 0.0
    return LowRank(factors, errors)


class Job(NamedTuple):
    """One export being written: what each format's writer reads."""

    museum: Any
    entries: list  # the concepts' manifest entries
    infos: list[ConceptInfo]
    deltas: dict[str, torch.Tensor]  # the K/V deltas Museum applies for a prompt naming them all
    rank: int | None  # the LoRA's rank cap
    tmp: Path  # the folder being written
    out: Path  # where it will be

    @property
    def pipe(self):
        return self.museum.pipe


def export_concepts(museum, names: list[str], out: Path, format: str = "diffusers", rank: int | None = None) -> Path:
    """Export one concept, or several composed (their deltas as the museum combines them), to ``out`` in ``format``
    (:data:`FORMATS`); ``rank`` caps the LoRA's rank. Bad requests are refused before anything is written."""
    if format not in FORMATS:
        raise MuseumError(f"unknown export format {format!r}; formats: "
                          + "; ".join(f"{k} ({v})" for k, v in FORMATS.items()))
    if rank is not None and (format == "a1111" or rank < 1):
        raise MuseumError(f"--rank caps the LoRA of --format diffusers or kohya and must be at least 1 "
                          f"(got {rank} with --format {format})")
    entries = [museum.manifest.concept(n) for n in names]
    deltas = museum.deltas_for(entries)  # loads and verifies every concept
    if format == "kohya":
        _check_lora_exportable(entries)
    if format == "kohya" and not deltas:
        raise MuseumError(f"{', '.join(names)} change(s) no UNet weights (a textual-inversion concept is its token "
                          "alone), so there is no LoRA to write: export with --format a1111")
    infos = [museum.concept_info(e) for e in entries]
    fault_point("export.begin")
    with atomic_dir(out) as tmp:
        job = Job(museum, entries, infos, deltas, rank, tmp, out)
        base = str(resolve_base(museum.manifest.base_path))
        record = {"format": format, "concepts": [{"name": e.name, "token": e.token, "method": e.method,
                                                  "phrase": museum.concept(e.name).phrase} for e in entries],
                  "base": base, "base_hash": museum.manifest.base_hash, **WRITERS[format](job, base)}
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2))
    return out


def _check_lora_exportable(entries) -> None:
    """Refuse concepts whose method says they are no LoRA (``Method.lora_export_why``), naming them and why."""
    for method in dict.fromkeys(e.method for e in entries):
        why = METHODS[method].lora_export_why
        if why:
            names = ", ".join(e.name for e in entries if e.method == method)
            raise MuseumError(f"cannot write {names} ({method}) as a LoRA for --format kohya: {why}")


def _token_tensors(job: Job, entry, info: ConceptInfo, key: str) -> dict[str, torch.Tensor]:
    """A token's embedding file: ``{key: (1, D)}``, or on SDXL one row per text encoder (``clip_l``, ``clip_g``)."""
    rows = info.tensors
    if is_sdxl(job.pipe):
        return {"clip_l": rows[entry.token].contiguous(), "clip_g": rows[entry.token + SECOND].contiguous()}
    return {key: rows[entry.token].contiguous()}


# ---------------------------------------------------------------------------------------------------- diffusers

def _write_diffusers(job: Job, base: str) -> dict[str, Any]:
    sdxl, out = is_sdxl(job.pipe), job.out
    loads, museum_concepts, loaders = [], [], {}
    for e, info in zip(job.entries, job.infos):
        file = "learned_embeds.safetensors" if len(job.entries) == 1 else f"learned_embeds-{e.name}.safetensors"
        save_file(_token_tensors(job, e, info, e.token), job.tmp / file)
        method = get_method(e.method)
        if method.export_format == "museum":  # the method's own loader adds the token too
            own = f"museum-{e.name}.safetensors"
            save_file({k: v.contiguous() for k, v in info.tensors.items()}, job.tmp / own)
            loader = f"{type(method).__module__}:load_into"
            museum_concepts.append({"name": e.name, "token": e.token, "method": e.method, "file": own,
                                    "config": info.config, "loader": loader})
            loaders[loader] = None
        elif sdxl:
            loads.append(SDXL_TOKEN_LOADS.format(file=out / file, token=e.token))
        else:
            loads.append(f'pipe.load_textual_inversion("{out / file}", token="{e.token}")')
    fault_point("export.partial")
    approximation = None
    if job.deltas:
        low = deltas_to_lora(job.deltas, job.rank)
        config = LoraConfig(r=low.rank, lora_alpha=low.rank, target_modules=KV_PATTERN)
        type(job.pipe).save_lora_weights(job.tmp, unet_lora_layers=low.state(pad=True),
                                         unet_lora_adapter_metadata=config.to_dict())
        loads.append(f'pipe.load_lora_weights("{out}")')
        approximation = low.record(job.rank)
    for loader in loaders:
        module, func = loader.split(":")
        loads.append(f'from {module} import {func}; {func}(pipe, "{out}")')
    extras = {}
    for name, cls in sorted(METHODS.items()):
        lines, fields = cls.export_extras([i for e, i in zip(job.entries, job.infos) if e.method == name], job.tmp, out)
        loads += lines
        extras.update(fields)
    snippet = LOAD_SNIPPET.format(cls=type(job.pipe).__name__, base=base, loads="\n".join(loads))
    return {"lora_rank": approximation["rank"] if approximation else None, "lora_approximation": approximation,
            "needs_museum": bool(museum_concepts), "museum_concepts": museum_concepts, **extras,
            "load_with_diffusers": snippet}


# ------------------------------------------------------------------------------------- AUTOMATIC1111 and ComfyUI

def _write_embeddings(job: Job) -> list[dict[str, Any]]:
    """Each token as ``embeddings/NAME.safetensors``; per concept, the word and phrase to type and what is missing."""
    (job.tmp / "embeddings").mkdir()
    concepts = []
    for e, info in zip(job.entries, job.infos):
        file = f"embeddings/{e.name}.safetensors"
        save_file(_token_tensors(job, e, info, "emb_params"), job.tmp / file)
        phrase = job.museum.concept(e.name).phrase
        concepts.append({"name": e.name, "embedding": file, "word": e.name, "phrase": phrase.replace(e.token, e.name),
                         "comfyui_phrase": phrase.replace(e.token, f"embedding:{e.name}")})
    return concepts


def _token_only_note(method: str) -> str:
    """What an embedding alone misses of a concept learned with ``method`` (--format a1111)."""
    kind = METHODS[method].export_format
    if kind == "textual_inversion":
        return ""
    needs = "its LoRA (museum export --format kohya)" if kind == "lora" else "Museum's loader (--format diffusers)"
    return f"the token alone does not draw it: it also needs {needs}"


def _write_a1111(job: Job, base: str) -> dict[str, Any]:
    concepts = _write_embeddings(job)
    for c, e in zip(concepts, job.entries):
        c["missing"] = _token_only_note(e.method)
    return _webui_record(job, base, concepts, lora=None)


def _write_kohya(job: Job, base: str) -> dict[str, Any]:
    concepts = _write_embeddings(job)
    for c, e, info in zip(concepts, job.entries, job.infos):
        c["missing"] = METHODS[e.method].webui_leaves_out([info])
    fault_point("export.partial")
    low = deltas_to_lora(job.deltas, job.rank)
    name = "+".join(e.name for e in job.entries)
    mixin = type(job.pipe)  # diffusers' LoRA loader mixin: "unet." before each key, as its own files have
    kohya = convert_state_dict_to_kohya(mixin.pack_weights(low.state(pad=False), mixin.unet_name))
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(low.rank),
                "ss_network_alpha": str(low.rank), "ss_output_name": name, **_base_version(job.pipe)}
    (job.tmp / "lora").mkdir()
    save_file(kohya, job.tmp / "lora" / f"{name}.safetensors", metadata=metadata)
    return _webui_record(job, base, concepts, lora={"file": f"lora/{name}.safetensors", "name": name,
                                                      "approximation": low.record(job.rank)})


def _base_version(pipe) -> dict[str, str]:
    """The metadata (kohya sd-scripts' keys) by which AUTOMATIC1111 tells SD-2 and SDXL LoRAs from SD-1 ones."""
    if is_sdxl(pipe):
        return {"ss_base_model_version": "sdxl_base_v1-0"}
    return {"ss_v2": "True"} if family_of(pipe.unet.config) == "sd2" else {}


def _webui_record(job: Job, base: str, concepts: list[dict], lora: dict | None) -> dict[str, Any]:
    """The webui formats' fields of museum_export.json (concepts, lora, prompts, how to use), and README.txt."""
    tag = f"<lora:{lora['name']}:1> " if lora else ""  # AUTOMATIC1111's extra-network syntax, strength 1
    prompts = {"automatic1111": tag + ", ".join(c["phrase"] for c in concepts),
               "comfyui": ", ".join(c["comfyui_phrase"] for c in concepts)}
    use = _how_to_use(concepts, lora, prompts, base)
    (job.tmp / "README.txt").write_text("\n".join(use) + "\n")
    return {"webui_concepts": concepts, "lora": lora, "prompt": prompts, "how_to_use": use}


def _how_to_use(concepts: list[dict], lora: dict | None, prompts: dict[str, str], base: str) -> list[str]:
    embeddings = " ".join(c["embedding"] for c in concepts)
    lines = [f"Learned by Museum on the base model {base}: use these files with that model (or the checkpoint it "
             "was converted from).",
             "AUTOMATIC1111 (and Forge, SD.Next): copy " + (f"{lora['file']} into models/Lora/ and " if lora else "")
             + f"{embeddings} into embeddings/; type in the prompt:", f"    {prompts['automatic1111']}",
             "ComfyUI: copy " + (f"{lora['file']} into models/loras/ (load it with a \"Load LoRA\" node, model "
                                 "strength 1) and " if lora else "")
             + f"{embeddings} into models/embeddings/; type in the prompt:", f"    {prompts['comfyui']}",
             "An embedding's word is its file name: rename the file to type another word."]
    if lora:
        lines.append(_error_line(lora["approximation"]) + ".")
    lines += [f"{c['name']}: {c['missing']}." for c in concepts if c["missing"]]
    return lines


def _error_line(approximation: dict[str, Any]) -> str:
    error = approximation["relative_frobenius_error"]
    return (f"The LoRA has rank {approximation['rank']}; relative Frobenius error against Museum's K/V deltas: "
            f"max {error['max']:.2g}, mean {error['mean']:.2g} over {len(error['per_layer'])} layers")


WRITERS = {"diffusers": _write_diffusers, "kohya": _write_kohya, "a1111": _write_a1111}


def summary(out: Path) -> list[str]:
    """What ``museum export`` prints about the export in ``out``: where it is, the LoRA's error, how to use it."""
    record = json.loads((Path(out) / EXPORT_FILE).read_text())
    names = ", ".join(c["name"] for c in record["concepts"])
    lines = [f"exported {names} to {out} (--format {record['format']})"]
    if record["format"] != "diffusers":
        return lines + record["how_to_use"]
    if record["lora_approximation"]:
        lines.append(_error_line(record["lora_approximation"]))
    return lines + [f"see {Path(out) / EXPORT_FILE} for the lines that load it"]

"""Hostile input (issue 9): image folders that are not what they claim, hand-edited manifests, concept tensors
that do not fit the base model, names that try to escape the museum, prompts past the tokenizer's limit, a
museum opened on another base model, and base models whose loading would run code (refused)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import museum_snapshot
from museum.errors import BaseModelError, ImageFolderError, MuseumError
from museum.models.loading import base_hash
from museum.museum import Museum
from museum.store.manifest import sha256_file
from reliability_support import FAST, cli_captured, error_lines, fork, fork_cli, prompt_for, time_limit
from tiny_models import build_tiny_pipeline

pytestmark = pytest.mark.usefixtures("warm_imports")  # forked children start at once

# ----------------------------------------------------------------------------- hostile input

def png_header(width: int, height: int) -> bytes:
    """A tiny PNG file that claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_folder(tmp_path: Path, name: str, extra: dict[str, bytes] | None = None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    Image.new("RGB", (32, 32), "red").save(folder / "00.png")
    for fname, data in (extra or {}).items():
        (folder / fname).write_bytes(data)
    return folder


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def webp_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(buf, "WEBP")
    return buf.getvalue()


@pytest.mark.parametrize("case, message", [
    ("truncated-jpeg", "not a readable image"),
    ("corrupt-webp", "not a readable image"),
    ("empty-file", "not a readable image"),
    ("bomb-81-megapixels", "too large"),       # above Museum's limit, below PIL's own warning
    ("bomb-400-megapixels", "not a readable image .*DecompressionBomb"),  # PIL refuses it outright
    ("symlink-loop", "link loop"),
    ("link-to-device", "not a regular file"),
    ("fifo", "not a regular file"),
])
def test_hostile_image_folders(one_concept_museum, tmp_path, case, message):
    """Each: a clear error before anything is read into memory or written, and the museum unchanged."""
    if case == "truncated-jpeg":
        folder = image_folder(tmp_path, case, {"cut.jpg": jpeg_bytes()[:400]})
    elif case == "corrupt-webp":
        data = bytearray(webp_bytes())
        data[30:] = b"\xff" * (len(data) - 30)
        folder = image_folder(tmp_path, case, {"bad.webp": bytes(data)})
    elif case == "empty-file":
        folder = image_folder(tmp_path, case, {"zero.png": b""})
    elif case == "bomb-81-megapixels":
        folder = image_folder(tmp_path, case, {"bomb.png": png_header(9000, 9000)})
    elif case == "bomb-400-megapixels":
        folder = image_folder(tmp_path, case, {"bomb.png": png_header(20000, 20000)})
    elif case == "symlink-loop":
        folder = image_folder(tmp_path, case)
        os.symlink("b.png", folder / "a.png")
        os.symlink("a.png", folder / "b.png")
        os.symlink(".", folder / "sub")  # a looping folder link is skipped, not walked
    elif case == "link-to-device":
        folder = image_folder(tmp_path, case)
        os.symlink("/dev/zero", folder / "zero.png")
    else:
        folder = image_folder(tmp_path, case)
        os.mkfifo(folder / "pipe.png")
    before = museum_snapshot(one_concept_museum.folder)
    with time_limit(60), pytest.raises(ImageFolderError, match=message):  # an opened FIFO or /dev/zero would hang
        one_concept_museum.learn("newthing", folder, method="textual-inversion", class_word="circle", **FAST)
    assert museum_snapshot(one_concept_museum.folder) == before


def test_hostile_image_folder_on_the_command_line(one_concept_museum, tmp_path):
    folder = image_folder(tmp_path, "cut", {"cut.jpg": jpeg_bytes()[:400]})
    log = tmp_path / "log"
    before = museum_snapshot(one_concept_museum.folder)
    assert fork_cli("learn", one_concept_museum.folder, "newthing", "--images", folder, "--class-word", "circle",
                    log=log) == 2
    lines = error_lines(log)
    assert len(lines) == 1 and "cut.jpg: not a readable image" in lines[0]
    assert museum_snapshot(one_concept_museum.folder) == before


def edit_manifest(folder: Path, change) -> None:
    data = json.loads((folder / "museum.json").read_text())
    change(data)
    (folder / "museum.json").write_text(json.dumps(data))


def set_concept(**fields):
    def change(data):
        data["concepts"][0].update(fields)
    return change


@pytest.mark.parametrize("case, change, message", [
    ("invalid-json", None, "is not valid JSON"),
    ("future-schema", lambda d: d.update(schema=99), "schema version 99, newer than this museum's .*upgrade museum"),
    ("schema-string", lambda d: d.update(schema="1"), "invalid schema version '1'"),
    ("not-a-manifest", lambda d: d.update(format="zip"), "is not a museum manifest"),
    ("missing-field", lambda d: d.pop("base"), "missing field 'base'"),
    ("concepts-not-a-list", lambda d: d.update(concepts="x"), "wrong type"),
    ("folder-escapes", set_concept(folder="../../elsewhere"), "has folder '../../elsewhere'"),
    ("name-with-dots", set_concept(name="../x", token="<../x>"), "invalid concept name '../x'"),
    ("file-escapes", set_concept(files={"../../../etc/passwd": "0" * 64}), "lists file '../../../etc/passwd'"),
    ("pickle-file", set_concept(files={"tensors.pt": "0" * 64}), "lists file 'tensors.pt'.*only safetensors"),
    ("bad-checksum-field", set_concept(files={"tensors.safetensors": "abc"}), "no valid sha256"),
    ("duplicate-concept", lambda d: d["concepts"].append(dict(d["concepts"][0])), "listed twice"),
    ("state-escapes", lambda d: d.update(state={"finetune": {"file": "../x.safetensors", "sha256": "0" * 64}}),
     "state files are state/NAME.safetensors"),
    ("state-pickle", lambda d: d.update(state={"finetune": {"file": "state/x.pt", "sha256": "0" * 64}}),
     "state files are state/NAME.safetensors"),
])
def test_hand_edited_manifest(one_concept_museum, tmp_path, case, change, message):
    """Every command refuses a manifest it cannot trust, with one clear line, and writes nothing."""
    folder = one_concept_museum.folder
    if change is None:
        (folder / "museum.json").write_text((folder / "museum.json").read_text()[:-20] + "}}")
    else:
        edit_manifest(folder, change)
    before = museum_snapshot(folder)
    with pytest.raises(MuseumError, match=message):
        Museum.open(folder)
    commands = (["list", folder], ["generate", folder, "a <sunburst> circle", "--out", tmp_path / "x.png"],
                ["learn", folder, "checker", "--images", tmp_path, "--class-word", "square"])
    for args in [commands[sum(map(ord, case)) % 3]]:  # one command line per case (each a fork): time
        log = tmp_path / "log"
        assert fork_cli(*args, log=log) == 2
        lines = error_lines(log)
        assert len(lines) == 1 and "museum.json" in lines[0], lines
    assert museum_snapshot(folder) == before
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "x.png").exists()



def rewrite_tensors(folder: Path, name: str, change) -> None:
    """Replace a concept's tensors and record the new checksum, as a careful forger would."""
    entry = next(c for c in json.loads((folder / "museum.json").read_text())["concepts"] if c["name"] == name)
    path = folder / entry["folder"] / "tensors.safetensors"
    tensors = load_file(path)
    new = change(tensors)
    if isinstance(new, bytes):
        path.write_bytes(new)
    else:
        save_file(new, path)
    edit_manifest(folder, lambda d: next(c for c in d["concepts"] if c["name"] == name)["files"].update(
        {"tensors.safetensors": sha256_file(path)}))


def _wrong_lora(tensors):
    key = next(k for k in tensors if k.endswith(".lora_A"))
    return {**tensors, key: torch_zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)}


def _wrong_rank(tensors):
    key = next(k for k in tensors if k.endswith(".lora_B"))
    return {**tensors, key: torch_zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)}


def _wrong_token(tensors):
    return {**tensors, "<checker>": torch_zeros(1, 24)}


def _foreign_layer(tensors):
    return {**tensors, "mid_block.attentions.7.transformer_blocks.0.attn2.to_k.lora_A": torch_zeros(4, 16)}


def _nan(tensors):
    key = next(k for k in tensors if k.endswith(".lora_B"))
    bad = tensors[key].clone()
    bad[0, 0] = float("nan")
    return {**tensors, key: bad}


def torch_zeros(*shape):
    return torch.zeros(*shape)


@pytest.mark.parametrize("case, change, message", [
    ("lora-width", _wrong_lora, r"lora_A has shape \(\d+, 19\), but this base model needs \(rank, 16\)"),
    ("lora-rank", _wrong_rank, "to match its lora_A"),
    ("token-width", _wrong_token, r"token embedding has shape \(1, 24\).*needs \(1, 16\)"),
    ("foreign-layer", _foreign_layer, "names a layer this base model does not have"),
    ("nan-values", _nan, "NaN/Inf values"),
    ("not-safetensors", lambda t: b"\x80\x04K\x01." * 10, "not a valid safetensors file"),
])
def test_concept_tensors_that_do_not_fit_the_base_model(two_concept_museum, tmp_path, case, change, message):
    m, _ = two_concept_museum
    rewrite_tensors(m.folder, "checker", change)
    before = museum_snapshot(m.folder)
    with pytest.raises(MuseumError, match=message):
        Museum.open(m.folder).generate("a <sunburst> circle", n=1, steps=2)
    log = tmp_path / "log"
    assert fork_cli("generate", m.folder, "a <checker>", "--out", tmp_path / "x.png", log=log) == 2
    lines = error_lines(log)
    assert len(lines) == 1 and lines[0].startswith("error: concept 'checker'") and "museum remove" in lines[0]
    assert museum_snapshot(m.folder) == before


@pytest.mark.parametrize("case", ["missing", "tampered", "missing-concept-json", "corrupt-concept-json"])
def test_damaged_concept_is_named_and_can_be_removed(two_concept_museum, concept_images, tmp_path, case):
    m, images = two_concept_museum
    concept_dir = m.concept("checker").path
    if case == "missing":
        (concept_dir / "tensors.safetensors").unlink()
    elif case == "tampered":
        data = bytearray((concept_dir / "tensors.safetensors").read_bytes())
        data[-1] ^= 0x01  # one bit of one weight
        (concept_dir / "tensors.safetensors").write_bytes(bytes(data))
    elif case == "missing-concept-json":
        (concept_dir / "concept.json").unlink()
    else:
        (concept_dir / "concept.json").write_text("{ not json")
    message = "is missing" if case.startswith("missing") else "does not match its checksum"
    before = museum_snapshot(m.folder)
    with pytest.raises(MuseumError, match=f"concept 'checker': file .* {message}.*museum remove"):
        Museum.open(m.folder).generate("a <sunburst> circle", n=1, steps=2)
    with pytest.raises(MuseumError, match=message):  # learning refuses too: it would build on a damaged museum
        Museum.open(m.folder).learn("neon", concept_images["neon"][0], method="textual-inversion", style=True, **FAST)
    assert museum_snapshot(m.folder) == before

    def listing():
        code, out, err = cli_captured("list", m.folder)
        (tmp_path / "list.json").write_text(json.dumps([code, out, err]))

    assert fork(listing)[0] == 0
    code, out, err = json.loads((tmp_path / "list.json").read_text())
    assert code == 0 and "checker" in out and "sunburst" in out  # listing still works, and names the damage
    assert "warning: concept 'checker'" in err and message in err
    assert fork_cli("remove", m.folder, "checker") == 0
    again = Museum.open(m.folder)
    assert np.array_equal(np.asarray(again.generate(prompt_for("sunburst"), n=1, steps=2)[0]), images["sunburst"])


def test_unknown_method_on_the_command_line(one_concept_museum, concept_images, tmp_path):
    log = tmp_path / "log"
    assert fork_cli("learn", one_concept_museum.folder, "checker", "--images", concept_images["checker"][0],
                    "--class-word", "square", "--method", "dreambooth-xl", log=log) == 2
    lines = error_lines(log)
    assert len(lines) == 1 and "unknown method 'dreambooth-xl'; available methods: c-lora" in lines[0]


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "/abs", "a\\b", "Ünïcode"])
def test_concept_names_cannot_escape(one_concept_museum, concept_images, tmp_path, name):
    before = museum_snapshot(one_concept_museum.folder)
    log = tmp_path / "log"
    assert fork_cli("learn", one_concept_museum.folder, name, "--images", concept_images["checker"][0], "--class-word",
                    "square", "--steps", 2, log=log) == 2
    lines = error_lines(log)
    assert len(lines) == 1 and "error: invalid concept name" in lines[0]
    assert museum_snapshot(one_concept_museum.folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "museum"]  # nothing written beside the museum
    assert fork_cli("remove", one_concept_museum.folder, name, log=log) == 2


def test_prompt_longer_than_the_tokenizer_limit(two_concept_museum, tmp_path):
    m, _ = two_concept_museum
    limit = m.pipe.tokenizer.model_max_length
    long_prompt = "a <sunburst> circle on a sand background, " + "large red star, " * 60 + "<checker>"
    with pytest.warns(UserWarning, match=fr"more than the model's {limit}; it is truncated.*<checker> fall\(s\) after"):
        long_images = m.generate(long_prompt, n=1, steps=2)
    with warnings.catch_warnings(record=True) as caught:  # a prompt within the limit draws without a warning
        warnings.simplefilter("always")
        m.generate(prompt_for("sunburst"), n=1, steps=2)
    assert not [w for w in caught if "truncated" in str(w.message)]
    log = tmp_path / "log"
    assert fork_cli("generate", m.folder, long_prompt, "--n", 1, "--steps", 2, "--out", tmp_path / "x.png",
                    log=log) == 0
    text = log.read_text()
    warning_lines = [ln for ln in text.splitlines() if ln.startswith("warning: prompt has")]
    assert len(warning_lines) == 1 and "truncated" in warning_lines[0] and "Traceback" not in text
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png").convert("RGB"))[::4, ::4],
                          np.asarray(long_images[0]))


def test_museum_for_another_base_model(two_concept_museum, concept_images, tmp_path):
    m, images = two_concept_museum
    manifest = (m.folder / "museum.json").read_text()
    before = museum_snapshot(m.folder)
    # the base model moved away
    edit_manifest(m.folder, lambda d: d["base"].update(path=str(tmp_path / "gone")))
    with pytest.raises(MuseumError, match="base model is unavailable: .*if it moved, set base.path in"):
        Museum.open(m.folder).generate("a <sunburst> circle", n=1, steps=2)
    # another model at the recorded path (different weights, same architecture)
    other = tmp_path / "other"

    build_tiny_pipeline(other, seed=1)
    edit_manifest(m.folder, lambda d: d["base"].update(path=str(other)))
    log = tmp_path / "log"
    assert fork_cli("generate", m.folder, "a <sunburst> circle", "--out", tmp_path / "x.png", log=log) == 2
    lines = error_lines(log)
    assert len(lines) == 1 and "was made for base model" in lines[0] and "cannot load on another base model" in lines[0]
    with pytest.raises(MuseumError, match="made for base model"):
        Museum.open(m.folder).learn("neon", concept_images["neon"][0], method="textual-inversion", style=True, **FAST)
    (m.folder / "museum.json").write_text(manifest)
    assert museum_snapshot(m.folder) == before
    again = Museum.open(m.folder)
    assert np.array_equal(np.asarray(again.generate(prompt_for("checker"), n=1, steps=2)[0]), images["checker"])


# ----------------------------------------------------------------------------- loading never runs code

EVIL = """
import os
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {sentinel}",))
"""


def pickle_base(tiny_base: Path, tmp_path: Path, *, evil: bool) -> Path:
    """A copy of the tiny pipeline whose UNet weights are a pickle file (.bin) instead of safetensors."""
    base = tmp_path / ("evil-base" if evil else "bin-base")
    shutil.copytree(tiny_base, base)
    unet_dir = base / "unet"
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    if evil:
        namespace = {}
        exec(EVIL.format(sentinel=tmp_path / "PWNED"), namespace)
        (unet_dir / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(namespace["Payload"]()))
    else:
        unet = UNet2DConditionModel.from_pretrained(tiny_base / "unet")
        torch.save(unet.state_dict(), unet_dir / "diffusion_pytorch_model.bin")
    return base


def test_pickle_weights_are_refused(tiny_base, tmp_path):
    evil = pickle_base(tiny_base, tmp_path, evil=True)
    with pytest.raises(BaseModelError, match=r"unet has weights only in a pickle format .*--allow-pickle"):
        Museum.init(tmp_path / "m1", base=evil)
    assert not (tmp_path / "m1").exists()
    log = tmp_path / "log"
    assert fork_cli("init", tmp_path / "m2", "--base", evil, log=log) == 2
    lines = error_lines(log)
    assert len(lines) == 1 and lines[0].startswith("error: base model") and "--allow-pickle" in lines[0]
    assert fork_cli("generate", "a red star", "--base", evil, "--out", tmp_path / "x.png", log=log) == 2
    # a museum whose base model was swapped for pickle weights after it was made

    folder = tmp_path / "m3"
    Museum.init(folder, base=tiny_base)
    edit_manifest(folder, lambda d: d["base"].update(path=str(evil), hash=base_hash(evil)))  # hashing reads bytes
    with pytest.raises(BaseModelError, match="pickle format"):
        Museum.open(folder).generate("a red star", n=1, steps=1)
    assert not (tmp_path / "PWNED").exists()  # nothing was unpickled


def test_pickle_weights_load_with_the_explicit_flag(tiny_base, tmp_path):
    base = pickle_base(tiny_base, tmp_path, evil=False)
    m = Museum.init(tmp_path / "m", base=base, allow_pickle=True)
    with pytest.raises(BaseModelError, match="pickle"):
        Museum.open(m.folder).generate("a red star", n=1, steps=1)
    image = Museum.open(m.folder, allow_pickle=True).generate("a red star", n=1, steps=1)[0]
    reference = Museum.init(tmp_path / "ref", base=tiny_base).generate("a red star", n=1, steps=1)[0]
    assert np.array_equal(np.asarray(image), np.asarray(reference))  # the same weights, read from the pickle
    log = tmp_path / "log"
    assert fork_cli("generate", m.folder, "a red star", "--n", 1, "--steps", 1, "--allow-pickle", "--out",
                    tmp_path / "x.png", log=log) == 0, log.read_text()


@pytest.mark.parametrize("case", ["python-file", "foreign-library"])
def test_code_in_a_base_model_is_refused_even_with_the_flag(tiny_base, tmp_path, case):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    if case == "python-file":
        (base / "unet" / "modeling.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w')\n")
        message = "contains Python code"
    else:
        index = json.loads((base / "model_index.json").read_text())
        index["unet"] = ["evil_models", "UNet"]
        (base / "model_index.json").write_text(json.dumps(index))
        message = "comes from 'evil_models'"
    for allow in (False, True):
        with pytest.raises(BaseModelError, match=message):
            Museum.init(tmp_path / f"m-{allow}", base=base, allow_pickle=allow)
    assert not (tmp_path / "PWNED").exists()

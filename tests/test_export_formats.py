"""``museum export --format kohya`` and ``--format a1111``: the files AUTOMATIC1111 and ComfyUI load.

No webui runs here; diffusers stands in for them, loading the files as they do: the LoRA from its kohya keys
(``load_lora_weights`` converts them, as the webuis map them onto their UNet) and each embedding under its file
name as the prompt word (``load_textual_inversion(file, token=stem)``). Loaded so into a fresh pipeline, every
LoRA-based method's export draws Museum's image (tiny SD-1 and SDXL models; the embedded model in the ``slow``
tests). A rank cap's reported error is the error of the file written; what cannot be written (Perfusion's gated
edit, a textual-inversion concept as a LoRA, an unknown format) is refused with nothing written."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import museum_snapshot, needs_embedded, run_cli
from museum.errors import MuseumError
from museum.generation.sampling import generate_images
from museum.methods import METHODS, method_names
from museum.models.loading import load_pipeline
from museum.museum import Museum
from museum.plumbing.tokens import is_sdxl

# large learning rates so that four steps visibly change a random tiny model (as tests/test_method_matrix.py)
FAST = dict(steps=4, lr=2e-2, token_lr=0.5)
EXTRA = {"custom-diffusion": dict(num_class_images=4)}
LORA_METHODS = [m for m in method_names() if METHODS[m].export_format == "lora"]


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def webui_prompt(m: Museum, prompt: str) -> str:
    """The prompt a webui user types for a Museum prompt: each concept's token replaced by its embedding's word."""
    for c in m.concepts:
        prompt = prompt.replace(c.token, c.name)
    return prompt


def load_like_a_webui(base, out: Path):
    """A fresh plain-diffusers pipeline with the export's files loaded as the webuis read them: every LoRA file of
    ``lora/`` by its kohya keys, every embedding of ``embeddings/`` under its file name (SDXL: both rows)."""
    pipe = load_pipeline(base)
    for lora in sorted((out / "lora").glob("*.safetensors")) if (out / "lora").is_dir() else []:
        pipe.load_lora_weights(lora.parent, weight_name=lora.name)
    for file in sorted((out / "embeddings").glob("*.safetensors")):
        if is_sdxl(pipe):
            rows = load_file(file)
            pipe.load_textual_inversion(rows["clip_l"], token=file.stem, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(rows["clip_g"], token=file.stem, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(file, token=file.stem)
    return pipe


def assert_draws_like_museum(m: Museum, out: Path, prompt: str, steps: int = 4) -> None:
    """The export, loaded as a webui loads it, draws Museum's image of ``prompt`` (to float rounding: the LoRA runs
    unfused, as peft layers); without the LoRA it does not (so the LoRA carries the concept's K/V change)."""
    ours = m.generate(prompt, n=1, steps=steps)[0]
    pipe = load_like_a_webui(m.manifest.base_path, out)
    theirs = generate_images(pipe, [webui_prompt(m, prompt)], seeds=[0], steps=steps)[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 2
    pipe.unload_lora_weights()
    without = generate_images(pipe, [webui_prompt(m, prompt)], seeds=[0], steps=steps)[0]
    assert np.abs(pixels(ours) - pixels(without)).max() > 2


def assert_kohya_file(out: Path, name: str, rank: int) -> None:
    """``lora/NAME.safetensors`` holds kohya keys only (lora_unet_..., lora_down/lora_up, and alpha = the layer's
    rank: scale 1), ranks up to ``rank``."""
    tensors = load_file(out / "lora" / f"{name}.safetensors")
    assert tensors and all(k.startswith("lora_unet_") and k.count(".") in (1, 2) for k in tensors)
    ranks = {k: tensors[k].shape[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert ranks and max(ranks.values()) == rank
    assert all(tensors[k.replace("lora_down.weight", "alpha")].item() == r for k, r in ranks.items())
    with safe_open(out / "lora" / f"{name}.safetensors", "pt") as f:
        assert f.metadata()["ss_network_dim"] == str(rank)


@pytest.fixture(scope="module", params=LORA_METHODS)
def lora_museum(request, tiny_base, concept_images, tmp_path_factory):
    """A museum on the tiny SD-1 model with one concept of a LoRA-based method."""
    method = request.param
    m = Museum.init(tmp_path_factory.mktemp(method) / "museum", base=tiny_base)
    m.learn("sunburst", concept_images["sunburst"][0], method=method, class_word="circle", progress=False,
            **FAST, **EXTRA.get(method, {}))
    return method, m


def test_kohya_export_draws_museums_image(lora_museum, tmp_path):
    method, m = lora_museum
    out = m.export("sunburst", tmp_path / "export", format="kohya")
    info = json.loads((out / "museum_export.json").read_text())
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.txt", "embeddings/sunburst.safetensors", "lora/sunburst.safetensors", "museum_export.json"]
    assert_kohya_file(out, "sunburst", info["lora"]["approximation"]["rank"])
    assert info["lora"]["approximation"]["relative_frobenius_error"]["max"] < 1e-5  # exact without a rank cap
    phrase = m.concept("sunburst").phrase
    assert info["prompt"]["automatic1111"] == f"<lora:sunburst:1> {phrase.replace('<sunburst>', 'sunburst')}"
    assert info["prompt"]["comfyui"] == phrase.replace("<sunburst>", "embedding:sunburst")
    readme = (out / "README.txt").read_text()
    assert "models/Lora/" in readme and info["prompt"]["automatic1111"] in readme and "models/loras/" in readme
    assert_draws_like_museum(m, out, f"a {phrase} on a grass background")


@pytest.fixture(scope="module")
def mixed_museum(tiny_base, concept_images, tmp_path_factory):
    """A museum on the tiny SD-1 model with a textual-inversion concept (sunburst) and a C-LoRA one (checker)."""
    m = Museum.init(tmp_path_factory.mktemp("mixed") / "museum", base=tiny_base)
    m.learn("sunburst", concept_images["sunburst"][0], method="textual-inversion", class_word="circle",
            progress=False, **FAST)
    m.learn("checker", concept_images["checker"][0], method="c-lora", class_word="square", progress=False, **FAST)
    return m


def test_a1111_embeddings_hold_every_methods_token(mixed_museum, tmp_path):
    """A textual-inversion concept drawn from its embedding alone is Museum's image; a C-LoRA concept's embedding is
    its token's row, and its entry says it also needs its LoRA."""
    m = mixed_museum
    out = m.export(["sunburst", "checker"], tmp_path / "export", format="a1111")
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == ["checker.safetensors", "sunburst.safetensors"]
    assert not (out / "lora").exists()
    for name in ("sunburst", "checker"):
        rows = load_file(out / "embeddings" / f"{name}.safetensors")
        entry = m.manifest.concept(name)
        assert list(rows) == ["emb_params"]
        assert torch.equal(rows["emb_params"], m.concept_info(entry).tensors[entry.token])
    missing = {c["name"]: c["missing"] for c in json.loads((out / "museum_export.json").read_text())["webui_concepts"]}
    assert missing["sunburst"] == "" and "--format kohya" in missing["checker"]
    ours = m.generate("a <sunburst> circle on a sand background", n=1, steps=4)[0]
    pipe = load_like_a_webui(m.manifest.base_path, out)
    theirs = generate_images(pipe, ["a sunburst circle on a sand background"], seeds=[0], steps=4)[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 2


def test_kohya_export_of_two_concepts_composes_as_museum_does(mixed_museum, tmp_path):
    m = mixed_museum
    out = m.export(["sunburst", "checker"], tmp_path / "export", format="kohya")
    assert [p.name for p in (out / "lora").iterdir()] == ["sunburst+checker.safetensors"]
    info = json.loads((out / "museum_export.json").read_text())
    assert info["prompt"]["automatic1111"].startswith("<lora:sunburst+checker:1> ")
    assert_draws_like_museum(m, out, "a <sunburst> circle and a <checker> on a sand background")


def test_sdxl_kohya_export_draws_museums_image(tiny_family, concept_images, tmp_path):
    """On SDXL each embedding holds both encoders' rows (clip_l, clip_g); the LoRA's metadata says SDXL."""
    m = Museum.init(tmp_path / "museum", base=tiny_family("sdxl"))
    m.learn("sunburst", concept_images["sunburst"][0], method="c-lora", class_word="circle", progress=False, **FAST)
    out = m.export("sunburst", tmp_path / "export", format="kohya")
    assert sorted(load_file(out / "embeddings" / "sunburst.safetensors")) == ["clip_g", "clip_l"]
    with safe_open(out / "lora" / "sunburst.safetensors", "pt") as f:
        assert f.metadata()["ss_base_model_version"].startswith("sdxl_")
    assert_draws_like_museum(m, out, "a <sunburst> on a grass background")


def test_kohya_export_says_lfs_image_context_is_left_out(tiny_base, concept_images, tmp_path):
    """An lfs concept that keeps ICGen image context (an IP-Adapter input): its webui files say so, and draw the
    image Museum draws at context scale 0."""
    from tiny_models import build_tiny_ip_adapter

    adapter = build_tiny_ip_adapter(tiny_base, tmp_path / "adapter")
    m = Museum.init(tmp_path / "museum", base=tiny_base)
    m.learn("sunburst", concept_images["sunburst"][0], method="lfs", class_word="circle", progress=False,
            ip_adapter=adapter, **FAST)
    out = m.export("sunburst", tmp_path / "export", format="kohya")
    missing = json.loads((out / "museum_export.json").read_text())["webui_concepts"][0]["missing"]
    assert "ICGen image context" in missing and "--context-scale 0" in missing
    assert missing in (out / "README.txt").read_text()
    prompt = "a <sunburst> circle on a grass background"
    without_context = m.generate(prompt, n=1, steps=4, options={"context_scale": 0.0})[0]
    theirs = generate_images(load_like_a_webui(tiny_base, out), [webui_prompt(m, prompt)], seeds=[0], steps=4)[0]
    assert np.abs(pixels(without_context) - pixels(theirs)).max() <= 2
    assert np.abs(pixels(m.generate(prompt, n=1, steps=4)[0]) - pixels(theirs)).max() > 2


# ----------------------------------------------------------------------------------------- a rank cap and its error


@pytest.fixture(scope="module")
def custom_diffusion_museum(tiny_base, concept_images, tmp_path_factory):
    m = Museum.init(tmp_path_factory.mktemp("cd") / "museum", base=tiny_base)
    m.learn("sunburst", concept_images["sunburst"][0], method="custom-diffusion", class_word="circle", progress=False,
            **FAST, **EXTRA["custom-diffusion"])
    return m


def test_rank_cap_reports_the_error_of_the_file_written(custom_diffusion_museum, tmp_path):
    """Custom Diffusion's dense deltas capped at rank 2: the file holds rank-2 factors, and the recorded error of
    each layer is ||dW - up @ down|| / ||dW|| of those factors against the deltas Museum applies."""
    m = custom_diffusion_museum
    out = m.export("sunburst", tmp_path / "export", format="kohya", rank=2)
    assert_kohya_file(out, "sunburst", 2)
    assert {v.shape[0] for k, v in load_file(out / "lora" / "sunburst.safetensors").items()
            if k.endswith("lora_down.weight")} == {2}
    record = json.loads((out / "museum_export.json").read_text())["lora"]["approximation"]
    errors = record["relative_frobenius_error"]
    assert record["rank_cap"] == 2 and errors["max"] == max(errors["per_layer"].values()) > 0.01
    assert errors["mean"] == pytest.approx(np.mean(list(errors["per_layer"].values())))
    tensors = load_file(out / "lora" / "sunburst.safetensors")
    for layer, delta in m.deltas_for([m.manifest.concept("sunburst")]).items():
        key = "lora_unet_" + layer.replace(".", "_")
        factored = tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"]
        measured = float((delta - factored).norm() / delta.norm())
        assert errors["per_layer"][layer] == pytest.approx(measured, rel=1e-3, abs=1e-6)
    # the diffusers format takes the same cap and records the same errors
    diffusers_record = json.loads((m.export("sunburst", tmp_path / "d", rank=2) / "museum_export.json").read_text())
    assert diffusers_record["lora_approximation"] == record


def test_cli_prints_the_error_and_what_to_type(custom_diffusion_museum, tmp_path):
    done = run_cli("export", str(custom_diffusion_museum.folder), "sunburst", "--out", str(tmp_path / "e"),
                   "--format", "kohya", "--rank", "2")
    assert done.returncode == 0, done.stderr
    errors = json.loads((tmp_path / "e" / "museum_export.json").read_text())["lora"]["approximation"]
    assert f"max {errors['relative_frobenius_error']['max']:.2g}" in done.stdout
    assert "<lora:sunburst:1> sunburst circle" in done.stdout and "models/Lora/" in done.stdout


# ----------------------------------------------------------------------------------------------------- refusals


def assert_refused(m: Museum, out: Path, match: str, names="sunburst", **kwargs) -> None:
    before, beside = museum_snapshot(m.folder), set(out.parent.iterdir())
    with pytest.raises(MuseumError, match=match):
        m.export(names, out, **kwargs)
    assert set(out.parent.iterdir()) == beside  # no export, no temporary folder
    assert museum_snapshot(m.folder) == before


def test_unknown_format_and_bad_rank_are_refused(custom_diffusion_museum, tmp_path):
    m = custom_diffusion_museum
    assert_refused(m, tmp_path / "a", "unknown export format 'ckpt'; formats: diffusers", format="ckpt")
    assert_refused(m, tmp_path / "b", "must be at least 1", format="kohya", rank=0)
    assert_refused(m, tmp_path / "c", "--rank caps the LoRA of --format diffusers or kohya", format="a1111", rank=4)
    refused = run_cli("export", str(m.folder), "sunburst", "--out", str(tmp_path / "d"), "--format", "ckpt")
    assert refused.returncode == 2 and "error: unknown export format 'ckpt'" in refused.stderr
    assert not (tmp_path / "d").exists()


def test_what_is_no_lora_is_refused_for_kohya(mixed_museum, concept_images, tmp_path):
    """A textual-inversion concept has no LoRA to write (use a1111); Perfusion's gated edit is no weight delta
    (its class says why and what to use instead), and one such concept refuses the whole export."""
    m = mixed_museum
    assert_refused(m, tmp_path / "ti", r"no UNet weights .* --format a1111", format="kohya")
    shutil.copytree(m.folder, tmp_path / "museum")
    m = Museum.open(tmp_path / "museum")
    m.learn("neon", concept_images["neon"][0], method="perfusion", style=True, progress=False, steps=2)
    why = METHODS["perfusion"].lora_export_why
    assert "--format diffusers" in why and "load_into" in why
    assert_refused(m, tmp_path / "p", r"cannot write neon \(perfusion\) as a LoRA for --format kohya: Perfusion's",
                   names=["checker", "neon"], format="kohya")


# ------------------------------------------------------------------------------------------------ embedded model


#: on the shipped model: lfs without ICGen context (left out of webui files, tested above) and a small noise bank
EMBEDDED_EXTRA = {"custom-diffusion": dict(num_class_images=2), "lfs": dict(context=False, num_prompts=2)}


@pytest.mark.slow
@needs_embedded
@pytest.mark.parametrize("method", LORA_METHODS)
def test_embedded_model_kohya_export_draws_museums_image(method, concept_images, tmp_path):
    m = Museum.init(tmp_path / "museum")
    m.learn("sunburst", concept_images["sunburst"][0], method=method, class_word="circle", progress=False, **FAST,
            **EMBEDDED_EXTRA.get(method, {}))
    out = m.export("sunburst", tmp_path / "export", format="kohya")
    rank = json.loads((out / "museum_export.json").read_text())["lora"]["approximation"]["rank"]
    assert_kohya_file(out, "sunburst", rank)
    assert_draws_like_museum(m, out, f"a {m.concept('sunburst').phrase} on a sand background", steps=10)


@pytest.mark.slow
@needs_embedded
def test_embedded_model_composed_kohya_and_a1111_exports(concept_images, tmp_path):
    """On the shipped model: a Custom Diffusion and a C-LoRA concept exported together as one kohya LoRA draw
    Museum's image; an a1111 embedding alone carries a textual-inversion concept."""
    m = Museum.init(tmp_path / "museum")
    for name, method, word in (("sunburst", "custom-diffusion", "circle"), ("checker", "c-lora", "square"),
                               ("neon", "textual-inversion", "style")):
        m.learn(name, concept_images[name][0], method=method, class_word=word, progress=False, **FAST,
                **EMBEDDED_EXTRA.get(method, {}))
    out = m.export(["sunburst", "checker"], tmp_path / "kohya", format="kohya")
    assert_draws_like_museum(m, out, "a <sunburst> circle and a <checker> on a sand background", steps=10)
    out = m.export("neon", tmp_path / "a1111", format="a1111")
    ours = m.generate("a red star, <neon> style", n=1, steps=10)[0]
    theirs = generate_images(load_like_a_webui(m.manifest.base_path, out), ["a red star, neon style"], seeds=[0],
                             steps=10)[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 2

"""The shared matrix every registered method passes through, on tiny random pipelines of each base
family (SD-1.x with epsilon prediction, SD-2.x with v-prediction, SDXL with two text encoders;
``tests/tiny_models.py``): learn a few steps, save, reload, generate, compose with a second concept,
export and load the export with plain diffusers (running the export's own load snippet), remove.
Methods that do not support two text encoders are refused on SDXL with a clear error (tested).

Adding a method is one module in ``museum/methods/`` plus its row here: ``ValueDelta`` below is the smallest
method, written as that one file would be, registered while this module's tests run and passed through the
whole matrix like the shipped ones."""

import json
import shutil

import numpy as np
import pytest
import torch
import typer.main
from PIL import Image
from diffusers import StableDiffusionPipeline

from museum.cli import app
from museum.errors import MuseumError
from museum.generation.sampling import generate_images, image_grid
from museum.methods import METHODS, method_names
from museum.methods.base import ConceptCost, ConceptInfo, Method, TrainContext, register
from museum.models.loading import load_pipeline
from museum.museum import Museum
from museum.plumbing.kv import kv_modules
from museum.plumbing.objectives import OBJECT_TEMPLATE
from museum.plumbing.tokens import text_pairs
from tiny_models import FAMILIES

# large learning rates so that four steps visibly change a random tiny model
FAST = dict(steps=4, lr=2e-2, token_lr=0.5)
EXTRA = {"custom-diffusion": dict(num_class_images=4)}


def pixels(image):
    return np.asarray(image, dtype=np.int16)


class ValueDelta(Method):
    """A toy method: each concept trains its own dense delta of every cross-attention V projection."""

    name = "toy-value-delta"
    export_format = "lora"

    @classmethod
    def cost(cls, kv, width, config) -> ConceptCost:
        values = sum(out * inp for name, (out, inp) in kv.items() if name.endswith("to_v")) + width
        b = config["batch_size"]  # the V weights train in place: nothing is added to the model
        return ConceptCost(values, 0, values, b, 0, added_values=0, batch_samples=b)

    def setup(self, ctx: TrainContext) -> list[dict]:
        self.values = {n: m for n, m in kv_modules(ctx.pipe.unet).items() if n.endswith("to_v")}
        self.start = {n: m.weight.detach().clone() for n, m in self.values.items()}
        return [{"params": [m.weight.requires_grad_(True) for m in self.values.values()], "lr": self.config.lr}]

    def finish(self, ctx: TrainContext):  # the trainer restores the K/V weights after this
        return {f"delta.{n}": (m.weight - self.start[n]).detach().clone() for n, m in self.values.items()}, {}

    def kv_deltas(self, concepts: list[ConceptInfo], active: list[ConceptInfo], state, pipe):
        deltas = {}
        for concept in active:
            for key, delta in concept.tensors.items():
                if key.startswith("delta."):
                    name = key.removeprefix("delta.")
                    deltas[name] = deltas.get(name, 0) + delta
        return deltas


COMBINATIONS = [(f, m) for f in FAMILIES for m in [*method_names(), ValueDelta.name]
                if m == ValueDelta.name or f != "sdxl" or METHODS[m].two_text_encoders]


@pytest.fixture(scope="module")
def toy_registered():
    """``ValueDelta`` registered as any method module registers itself, for this module's tests only."""
    register(ValueDelta)
    yield
    METHODS.pop(ValueDelta.name)


@pytest.fixture(scope="module", params=COMBINATIONS, ids=lambda p: f"{p[0]}-{p[1]}")
def learned(request, toy_registered, tiny_family, concept_images, tmp_path_factory):
    family, method = request.param
    folder = tmp_path_factory.mktemp(f"{family}-{method}") / "museum"
    m = Museum.init(folder, base=tiny_family(family))
    kw = dict(FAST, **EXTRA.get(method, {}))
    m.learn("sunburst", concept_images["sunburst"][0], method=method, class_word="circle", progress=False, **kw)
    m.learn("neon", concept_images["neon"][0], method=method, style=True, progress=False, **kw)
    return method, folder, m


@pytest.mark.parametrize("family", FAMILIES)
def test_families_differ_as_their_checkpoints_do(tiny_family, family):
    """SD-2.x is v-prediction with linear projections; SD-1.x epsilon with convolutions; SDXL has two text
    encoders whose states the UNet attends to together, and pooled text + time ids as added conditioning."""
    pipe = load_pipeline(tiny_family(family))
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert pipe.unet.config.use_linear_projection == (family != "sd1")
    block = next(b for b in pipe.unet.down_blocks if hasattr(b, "attentions"))
    assert isinstance(block.attentions[0].proj_in, torch.nn.Linear) == (family != "sd1")
    if family == "sdxl":
        assert type(pipe).__name__ == "StableDiffusionXLPipeline"
        assert pipe.unet.config.addition_embed_type == "text_time"
        assert pipe.unet.config.cross_attention_dim == (pipe.text_encoder.config.hidden_size
                                                         + pipe.text_encoder_2.config.hidden_size)
    else:
        assert type(pipe) is StableDiffusionPipeline


def test_methods_without_sdxl_support_are_refused_clearly(tiny_family, concept_images, tmp_path, monkeypatch):
    """Every registered method supports SDXL today; a method that declares it does not is refused before training."""
    method = "textual-inversion"
    monkeypatch.setattr(METHODS[method], "two_text_encoders", False)
    m = Museum.init(tmp_path / "museum", base=tiny_family("sdxl"))
    with pytest.raises(MuseumError, match=rf"{method} does not support bases with two text encoders \(SDXL\)"):
        m.learn("sunburst", concept_images["sunburst"][0], method=method, class_word="circle", progress=False, **FAST)
    assert Museum.open(tmp_path / "museum").concepts == []


@pytest.mark.parametrize("method", ["finetune", "lfs"])
def test_a_first_concepts_sample_is_drawn_with_its_methods_new_state(method, tiny_base, concept_images, tmp_path):
    """Methods that keep one shared state (finetune, EWC, LwF, MuseumMaker, lfs) draw a concept's commit sample
    with the state it was learned into, also the first concept's, whose state the manifest did not yet hold."""
    m = Museum.init(tmp_path / "museum", base=tiny_base)
    m.learn("sunburst", concept_images["sunburst"][0], method=method, class_word="circle", progress=False,
            **dict(FAST, **EXTRA.get(method, {})))
    assert m.manifest.state.get(method)
    sample = np.asarray(Image.open(m.concept("sunburst").path / "sample.png").convert("RGB"), np.int16)
    drawn = np.asarray(image_grid(Museum.open(tmp_path / "museum").generate(
        OBJECT_TEMPLATE.format(m.concept("sunburst").phrase), n=4, seed=0), cols=4, scale=2), np.int16)
    assert np.abs(sample - drawn).max() <= 1  # one level: a reloaded pipeline may round differently


def learned_after_and_alone(method: str, base, concept_images, folder) -> list[tuple[dict, np.ndarray]]:
    """"checker" learned after "sunburst" in one museum and alone in another, same seed and class word (so Custom
    Diffusion's second concept reads the class images its first one cached): (its tensors, an image of a prompt
    naming only it) from each."""
    out = []
    for where, names in (("after", ["sunburst", "checker"]), ("alone", ["checker"])):
        m = Museum.init(folder / where, base=base)
        for name in names:
            m.learn(name, concept_images[name][0], method=method, class_word="circle", progress=False, seed=3,
                    **dict(FAST, **EXTRA.get(method, {})))
        image = m.generate(f"a {m.concept('checker').phrase} on a sand background", n=1, steps=3)[0]
        out.append((m.concept_info(m.manifest.concepts[-1]).tensors, pixels(image)))
    return out


@pytest.mark.parametrize("method", [m for m in method_names() if METHODS[m].independent])
def test_an_independent_method_learns_a_concept_after_another_as_alone(method, tiny_base, concept_images, tmp_path):
    """``Method.independent`` promises bit for bit the concept learned alone: its tensors, and its image."""
    (after, image_after), (alone, image_alone) = learned_after_and_alone(method, tiny_base, concept_images, tmp_path)
    assert after.keys() == alone.keys() and all(torch.equal(after[k], alone[k]) for k in after)
    assert np.array_equal(image_after, image_alone)


def test_a_method_that_does_not_declare_independence_need_not_have_it(tiny_base, concept_images, tmp_path):
    """C-LoRA's regulariser reads the earlier concepts' LoRAs: the same concept learned after another differs, and
    the method does not declare ``independent``, so nothing (the benchmark's upper bound) takes it for granted."""
    assert not METHODS["c-lora"].independent
    (after, _), (alone, _) = learned_after_and_alone("c-lora", tiny_base, concept_images, tmp_path)
    assert not all(torch.equal(after[k], alone[k]) for k in after)


def test_learn_save_reload_generate(learned):
    method, folder, m = learned
    assert [c.name for c in m.concepts] == ["sunburst", "neon"]
    assert (m.concept("sunburst").path / "sample.png").is_file()
    prompt = f"a {m.concept('sunburst').phrase} on a sand background"
    before = m.generate(prompt, n=2, steps=3)
    fresh = Museum.open(folder)  # a new object reads everything from disk
    after = fresh.generate(prompt, n=2, steps=3)
    # the reloaded museum rebuilds its layers (peft LoRA, processors) in a new process state, so float sums may
    # round differently: at most one level of 255 in a pixel (seen on AVX-512 hosts); a wrong or missing tensor
    # changes the image far more (test_concept_changes_the_image)
    assert max(np.abs(pixels(a).astype(int) - pixels(b).astype(int)).max() for a, b in zip(before, after)) <= 1
    assert [c.method for c in fresh.concepts] == [method, method]


def test_concept_changes_the_image(learned):
    _, _, m = learned
    phrase = m.concept("sunburst").phrase
    with_concept = m.generate(f"a {phrase} on a sand background", n=1, steps=3)[0]
    base = generate_images(m.pipe, ["a circle on a sand background"], seeds=[0], steps=3)[0]
    assert not np.array_equal(pixels(with_concept), pixels(base))


def test_compose_two_concepts(learned):
    _, _, m = learned
    obj, style = m.concept("sunburst").phrase, m.concept("neon").phrase
    both = f"a {obj} on a night background, {style} style"
    assert [e.name for e in m.parse_prompt(both)] == ["sunburst", "neon"]
    composed = m.generate(both, n=1, steps=3)[0]
    only_object = m.generate(f"a {obj} on a night background", n=1, steps=3)[0]
    assert not np.array_equal(pixels(composed), pixels(only_object))


def test_cost_model_counts_what_is_stored(learned):
    """``Method.cost`` (scripts/gpu_estimates.py applies it to Stable Diffusion 1.5 for docs/GPU.md) counts exactly
    the values a run stores, per concept and in the method's museum state."""
    method, _, m = learned
    kv = {n: tuple(mod.weight.shape) for n, mod in kv_modules(m.pipe.unet).items()}
    width = sum(encoder.get_input_embeddings().weight.shape[1] for _, encoder in text_pairs(m.pipe))  # SDXL: both
    for entry in m.manifest.concepts:
        info = m.concept_info(entry)
        cost = METHODS[method].cost(kv, width, info.config)
        assert cost.concept_values == sum(t.numel() for t in info.tensors.values()), entry.name
        assert cost.state_values == sum(t.numel() for t in m.method_state(method).values())


def test_unknown_token_lists_concepts(learned):
    _, _, m = learned
    with pytest.raises(MuseumError, match=r"<mug>.*<sunburst>, <neon>"):
        m.generate("a <mug> on a table", n=1, steps=2)


def test_export_loads_in_plain_diffusers(learned, tmp_path):
    method, _, m = learned
    out = m.export("sunburst", tmp_path / "export")
    prompt = f"a {m.concept('sunburst').phrase} on a grass background"
    ours = m.generate(prompt, n=1, steps=4)[0]
    info = json.loads((out / "museum_export.json").read_text())
    needs_museum = METHODS[method].export_format == "museum"
    assert info["needs_museum"] == needs_museum
    has_lora = (out / "pytorch_lora_weights.safetensors").is_file()
    assert has_lora == (METHODS[method].export_format == "lora")
    # the lines the export says load it, run as they are: plain diffusers (plus the method's loader where
    # needs_museum: it adds the token and installs the method's effect)
    snippet = info["load_with_diffusers"]
    assert snippet.count("\n") <= 5 and ("load_lora_weights" in snippet) == has_lora
    assert (info["museum_concepts"][0]["loader"].split(":")[0] in snippet) if needs_museum else True
    scope = {}
    exec(snippet, scope)
    pipe = scope["pipe"]
    pipe.set_progress_bar_config(disable=True)
    theirs = generate_images(pipe, [prompt], seeds=[0], steps=4)[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 2


def test_remove(learned, tmp_path):
    method, folder, _ = learned
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    m = Museum.open(copy)
    if METHODS[method].removable:
        m.remove("sunburst")
        assert [c.name for c in Museum.open(copy).concepts] == ["neon"]
        assert not any(p.name.endswith("-sunburst") for p in (copy / "concepts").iterdir())
        with pytest.raises(MuseumError, match="does not have"):
            m.generate("a <sunburst> circle", n=1, steps=2)
        assert len(m.generate("a red star, <neon> style", n=1, steps=2)) == 1
    else:
        before = (copy / "museum.json").read_bytes()
        with pytest.raises(MuseumError, match="cannot remove"):
            m.remove("sunburst")
        assert (copy / "museum.json").read_bytes() == before


def test_generation_options_reach_the_cli_and_the_api(tiny_base, tmp_path):
    """Every generation option a method declares is a ``museum generate`` flag, passed on by name; the API refuses
    an option no method declares, naming those that exist, and a value below an option's minimum."""
    command = typer.main.get_command(app).commands["generate"]
    flags = {flag for param in command.params for flag in param.opts}
    declared = {o.flag for cls in METHODS.values() for o in cls.generation_options}
    assert "--gate-bias" in declared and declared <= flags
    m = Museum.init(tmp_path / "museum", base=tiny_base)
    with pytest.raises(MuseumError, match=r"gate_bias_typo.*options: context_scale, gate_bias"):
        m.generate("a circle", n=1, steps=1, options={"gate_bias_typo": 0.5})
    with pytest.raises(MuseumError, match=r"--gate-temp must be > 0 \(got 0.0\)"):
        m.generate("a circle", n=1, steps=1, options={"gate_temp": 0.0})

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
import transformers

import museum.learning as learning
from museum.generation.sampling import generate_images
from museum.models.icgen import EMBEDDED_ICGEN, WEIGHT_NAME
from museum.models.loading import (
    EMBEDDED_EVALUATOR, EMBEDDED_MODELS, EMBEDDED_PIPELINE, EMBEDDED_TWO_OBJECTS, load_pipeline,
)
from museum.museum import Museum
from museum.plumbing import kv
from museum.world.concepts import build_concept
from tiny_models import build_tiny_pipeline, build_tiny_v2_pipeline, tiny_v2_evaluator

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N (pyproject's addopts): N workers share the machine's cores, so each worker and the
    # CLI processes it starts use one thread (two 1-thread workers do ~1.4x the work of one 2-thread
    # process on a 2-core machine).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# skip markers for tests that need a shipped model (museum/embedded/), which a fresh checkout may not have built
needs_embedded = pytest.mark.skipif(not (EMBEDDED_PIPELINE / "model_index.json").is_file(),
                                    reason="embedded model not built")
needs_evaluator = pytest.mark.skipif(not (EMBEDDED_EVALUATOR / "config.json").is_file(), reason="evaluator not built")
needs_two_object_model = pytest.mark.skipif(not (EMBEDDED_MODELS[EMBEDDED_TWO_OBJECTS] / "model_index.json").is_file(),
                                            reason="two-object model not shipped")
needs_icgen = pytest.mark.skipif(not (EMBEDDED_PIPELINE / "model_index.json").is_file()
                                 or not (EMBEDDED_ICGEN / WEIGHT_NAME).is_file(), reason="embedded model not built")


def stop_at(step: int):
    """An ``on_step`` callback for ``train_concept`` that interrupts training (KeyboardInterrupt, as Ctrl-C does)
    once ``step`` steps are done."""
    def on_step(done, _loss):
        if done == step:
            raise KeyboardInterrupt

    return on_step


@contextmanager
def interrupted_learning(step: int):
    """Inside the block, ``Museum.learn`` stops with KeyboardInterrupt (as Ctrl-C) once ``step`` training steps are
    done."""
    train_concept = learning.train_concept

    def stopping(*args, on_step=None, **kwargs):  # in place of the session's own callback (None in these tests)
        return train_concept(*args, on_step=stop_at(step), **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(learning, "train_concept", stopping)
        yield


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first, so that ``--dist loadscope`` starts the long ones early."""
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow_modules)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion pipeline folder (built offline, saved with save_pretrained)."""
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline")


@pytest.fixture(scope="session")
def tiny_v2_base(tmp_path_factory) -> Path:
    """A tiny random World v2 pipeline folder (64x64 images, eight latent channels, the v2 vocabulary)."""
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    return build_tiny_v2_pipeline(tmp_path_factory.mktemp("tiny-v2") / "pipeline")


@pytest.fixture(scope="session")
def v2_evaluator(tmp_path_factory):
    """A tiny random evaluator of 64x64 images with the v2 vocabulary."""
    return tiny_v2_evaluator(tmp_path_factory.mktemp("v2-evaluator"))


@pytest.fixture(scope="session")
def tiny_family(tiny_base, tmp_path_factory):
    """``tiny_family(name)``: a tiny random pipeline folder of a base family (``FAMILIES`` in tests/tiny_models.py),
    built offline once per session; "sd1" is ``tiny_base``."""
    built = {"sd1": tiny_base}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{family}") / "pipeline", family=family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def concept_images(tmp_path_factory):
    """Training-image folders of three benchmark concepts, with the concepts: {name: (folder, Concept)}."""
    root = tmp_path_factory.mktemp("images")
    out = {}
    for name in ("sunburst", "checker", "neon"):
        c = build_concept(name, n_train=3)
        c.save(root / name)
        out[name] = (root / name, c)
    return out


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([sys.executable, "-m", "museum", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def museum_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a museum except the lock and caches: to check an error left it unchanged."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != ".lock" and "cache" not in p.parts}


@pytest.fixture
def record_task(monkeypatch):
    """``opened, seen = record_task(MethodClass)``: from then on every image file opened is appended to
    ``opened``, and each training step of that method appends its loss terms to ``seen["terms"]``;
    ``seen["teacher"]`` holds the teacher's LoRA factors at the first step (for data-free methods:
    the earlier images must never be read, and the teacher must be the model before the task)."""
    def install(method_class):
        opened, seen = [], {}
        original_open, original_terms = PIL.Image.open, method_class.loss_terms

        def open_spy(fp, *args, **kwargs):
            opened.append(str(fp))
            return original_open(fp, *args, **kwargs)

        def terms_spy(self, ctx, batch):
            if "teacher" not in seen:
                seen["teacher"] = kv.lora_factors(ctx.teacher, self.adapter)
            out = original_terms(self, ctx, batch)
            seen.setdefault("terms", []).append({k: float(v.detach()) for k, v in out.items()})
            return out

        monkeypatch.setattr(PIL.Image, "open", open_spy)
        monkeypatch.setattr(method_class, "loss_terms", terms_spy)
        return opened, seen

    return install


@pytest.fixture(scope="module")
def warm_imports(tiny_base):
    """Import everything a command imports lazily once, so forked children (``reliability_support.fork``) start at
    once; one torch thread (the same as the children, so images compare bit for bit, and far faster on a busy
    2-core machine). Modules that fork use it: ``pytestmark = pytest.mark.usefixtures("warm_imports")``."""
    import rich.console  # noqa: F401  (for `museum list`)
    import rich.table  # noqa: F401

    import museum.cli  # noqa: F401
    from museum.export import export_concepts  # noqa: F401

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generate_images(load_pipeline(tiny_base), ["a red star"], seeds=[0], steps=1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_concept_template(tiny_base, concept_images, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("template") / "museum"
    m = Museum.init(folder, base=tiny_base)
    m.learn("sunburst", concept_images["sunburst"][0], method="textual-inversion", class_word="circle", steps=2,
            progress=False)
    return folder


@pytest.fixture()
def one_concept_museum(one_concept_template, tmp_path):
    """A museum with one concept (a copy of a module-wide one: learning it for every test would be slow)."""
    shutil.copytree(one_concept_template, tmp_path / "museum")
    return Museum.open(tmp_path / "museum")


@pytest.fixture(scope="module")
def two_concept_template(one_concept_template, concept_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("template2") / "museum"
    shutil.copytree(one_concept_template, folder)
    Museum.open(folder).learn("checker", concept_images["checker"][0], method="c-lora", class_word="square", steps=2,
                              progress=False)
    m = Museum.open(folder)
    return folder, {n: np.asarray(m.generate(f"a <{n}> on a sand background", n=1, steps=2)[0])
                    for n in ("sunburst", "checker")}


@pytest.fixture()
def two_concept_museum(two_concept_template, tmp_path):
    """A museum with a textual-inversion and a C-LoRA concept, and the image each draws."""
    folder, images = two_concept_template
    shutil.copytree(folder, tmp_path / "museum")
    return Museum.open(tmp_path / "museum"), images

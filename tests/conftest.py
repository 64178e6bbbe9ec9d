import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N (pyproject's addopts): N workers share the machine's cores, so each worker and the
    # CLI processes it starts use one thread (two 1-thread workers do ~1.4x the work of one 2-thread
    # process on a 2-core machine).
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first, so that ``--dist loadscope`` starts the long ones early."""
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow_modules)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion pipeline folder (built offline, saved with save_pretrained)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    from museum.base.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline")


@pytest.fixture(scope="session")
def tiny_family(tiny_base, tmp_path_factory):
    """``tiny_family(name)``: a tiny random pipeline folder of a base family (``museum.base.tiny.FAMILIES``),
    built offline once per session; "sd1" is ``tiny_base``."""
    from museum.base.tiny import build_tiny_pipeline

    built = {"sd1": tiny_base}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{family}") / "pipeline", family=family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def concept_images(tmp_path_factory):
    """Training-image folders of two benchmark concepts."""
    from museum.world.concepts import build_concept

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
    import PIL.Image

    from museum.methods import kv

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

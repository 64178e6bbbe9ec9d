"""The benchmark report (and the museum gallery) rendered in a real browser: headless Chromium,
driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``, no extra package).

A small benchmark (textual inversion and Perfusion, 3 tasks, upper bound, base row, gate curve)
on the tiny random pipeline is written as ``museum report`` writes it; the page is loaded in
Chromium, which must decode every image (naturalWidth > 0) and show every table with the
expected rows. A full-page screenshot and the page are kept in ``test-artifacts/report-browser/``
(git-ignored; ``MUSEUM_TEST_ARTIFACTS`` moves it). Skipped where no Chromium is installed
(Debian: ``apt-get install chromium``; .ci/run installs it)."""

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from museum import cli
from museum.evaluation.benchmark import run_benchmark
from museum.evaluation.benchmark import v2 as world_v2
from museum.methods.base import get_method
from museum.models.evaluator import Evaluator
from museum.models.tokenizer import write_clip_tokenizer
from museum.museum import Museum
from museum.report.gallery import write_gallery
from museum.report.html import img_tag, write_page
from museum.world.concepts import build_concept
from museum.world.render import base_vocabulary, held_out_vocabulary

CHROMIUM = os.environ.get("MUSEUM_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium to render the report in (Debian: apt-get install chromium; "
                             "or set MUSEUM_CHROMIUM to a Chrome/Chromium binary)")

ARTIFACTS = Path(os.environ.get("MUSEUM_TEST_ARTIFACTS") or Path(__file__).resolve().parent.parent / "test-artifacts")
METHODS = ["textual-inversion", "perfusion"]
CONCEPTS = ["sunburst", "neon", "checker"]
GATE_BETAS = (0.5, 0.7, 0.9)
FAST = dict(lr=2e-2, token_lr=0.5)
RUN = dict(steps=2, n_prompts=1, n_seeds=4, gen_steps=2, progress=False, method_overrides={m: FAST for m in METHODS},
           upper_bound=True, gate_betas=GATE_BETAS)
#: World v2: two methods, two training seeds, three tasks (two objects read side by side, a style)
V2_METHODS = ["textual-inversion", "finetune"]
V2_CONCEPTS = ["sunburst", "gem", "glowline"]
V2_RUN = dict(steps=2, n_prompts=1, n_seeds=4, gen_steps=2, n_ref=4, generality_prompts=4, n_pairs=1, progress=False,
              method_overrides={m: FAST for m in V2_METHODS}, seeds=2)


# ----------------------------------------------------------------------------- a DevTools client on a pipe


class Chromium:
    """Headless Chromium with the DevTools protocol on fds 3 (commands in) and 4 (replies out),
    messages separated by NUL bytes: the transport Puppeteer and Playwright use."""

    def __init__(self, binary: str, profile: Path, timeout: float = 120.0):
        self.timeout = timeout
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def fds():  # runs in the child before exec: put the pipe ends where Chromium looks for them
            os.dup2(to_browser_r, 1000)
            os.dup2(from_browser_w, 1001)
            os.dup2(1000, 3)
            os.dup2(1001, 4)

        profile.mkdir(parents=True, exist_ok=True)
        self.stderr = profile.parent / "chromium-stderr.log"
        with self.stderr.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary, "--headless", "--remote-debugging-pipe", f"--user-data-dir={profile}", "--no-sandbox",
                 "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
                 "--disable-extensions", "--hide-scrollbars", "--mute-audio", "about:blank"],
                pass_fds=(3, 4), preexec_fn=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._id = 0
        self.session = None

    def send(self, method: str, params: dict | None = None, *, session: bool = True) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:  # skip events until the reply to this command
            while b"\0" not in self._buffer:
                ready, _, _ = select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise TimeoutError(f"Chromium did not answer {method} in {self.timeout:.0f} s")
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited: {self.stderr.read_text(errors='replace')[-2000:]}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str, width: int = 1280, height: int = 900) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.navigate", {"url": url})
        deadline = time.monotonic() + self.timeout
        while self.evaluate("document.readyState") != "complete":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading")
            time.sleep(0.1)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        shot = self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


# what a page shows, as Chromium has it: every image decoded (or not), every table's rows
PAGE_STATE = """
(async () => {
  const images = Array.from(document.images);
  const decoded = await Promise.all(images.map(i => i.decode().then(() => true, () => false)));
  return {
    title: document.title,
    images: images.map((i, k) => ({alt: i.alt, decoded: decoded[k], complete: i.complete,
                                   width: i.naturalWidth, height: i.naturalHeight,
                                   shown: i.getBoundingClientRect().width})),
    tables: Object.fromEntries(Array.from(document.querySelectorAll('table')).map((t, k) => [
      t.id || ('table-' + k),
      {header: Array.from(t.tHead.rows[0].cells).map(c => c.textContent),
       rows: Array.from(t.tBodies[0].rows).map(r => ({first: r.cells[0].textContent,
                                                     cells: r.cells.length,
                                                     images: r.querySelectorAll('img').length}))}])),
    headings: Array.from(document.querySelectorAll('h2, h3')).map(h => h.id || h.textContent),
  };
})()
"""


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on 2 busy cores
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench(tiny_base, tmp_path_factory):
    tokenizer = write_clip_tokenizer(base_vocabulary() + held_out_vocabulary(), tmp_path_factory.mktemp("evaluator"))
    torch.manual_seed(0)
    evaluator = Evaluator.create(tokenizer).eval().requires_grad_(False)
    out = tmp_path_factory.mktemp("bench") / "out"
    return out, run_benchmark(METHODS, CONCEPTS, out, base=tiny_base, evaluator=evaluator, **RUN)


@pytest.fixture(scope="module")
def bench_v2(tiny_v2_base, v2_evaluator, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-v2") / "out"
    return out, world_v2.run_benchmark(V2_METHODS, V2_CONCEPTS, out, base=tiny_v2_base, evaluator=v2_evaluator, **V2_RUN)


@pytest.fixture(scope="module")
def artifacts():
    folder = ARTIFACTS / "report-browser"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def browser(tmp_path):
    chromium = Chromium(CHROMIUM, tmp_path / "profile")
    yield chromium
    chromium.close()


def render(browser, page: Path, artifacts: Path, name: str, record_property) -> dict:
    """Load ``page`` in the browser, keep a screenshot and the page as artifacts, return what it shows."""
    shutil.copy(page, artifacts / f"{name}.html")
    browser.open(page.resolve().as_uri())
    state = browser.evaluate(PAGE_STATE)
    shot = browser.screenshot(artifacts / f"{name}.png")
    record_property(f"{name}_screenshot", str(shot))
    print(f"\nscreenshot of {page.name} in Chromium: {shot}")
    with Image.open(shot) as im:  # the screenshot shows the page, not a blank or an error page
        assert im.width >= 1000 and im.height > 900
        assert im.convert("L").getextrema()[0] < 100
    return state


def assert_images_loaded(state: dict) -> None:
    bad = [i for i in state["images"] if not (i["decoded"] and i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert not bad, f"images the browser could not show: {bad[:5]}"
    assert all(i["shown"] > 0 for i in state["images"]), "an image is laid out with no width"


# ----------------------------------------------------------------------------- tests


def test_report_in_chromium(bench, browser, artifacts, record_property, monkeypatch, capsys):
    out, results = bench
    monkeypatch.setattr(sys, "argv", ["museum", "report", str(out)])
    cli.main()  # as a person would write it
    page = out / "report.html"
    assert str(page) in capsys.readouterr().out
    state = render(browser, page, artifacts, "report", record_property)

    assert state["title"] == "Museum continual benchmark"
    assert_images_loaded(state)
    alts = [i["alt"] for i in state["images"]]
    assert alts.count("average and forgetting over tasks") == 1
    for method in METHODS:
        assert alts.count(f"{method} heatmaps") == 1
        # 3 base + (1 + 2 + 3) after the tasks + 3 alone
        assert sum(a.startswith((f"{method} after task", f"{method} alone:")) for a in alts) == 6 + 3
    assert sum(a.startswith("base model:") for a in alts) == 3 * len(METHODS)
    assert alts.count("perfusion gate curve") == 1 and "textual-inversion gate curve" not in alts
    assert len(alts) == 1 + len(METHODS) * (1 + 12) + 1

    tables = state["tables"]
    assert [r["first"] for r in tables["results"]["rows"]] == [
        *METHODS, "base model (no training)", *(f"upper bound: {m} (each concept alone)" for m in METHODS)]
    assert all(r["cells"] == len(tables["results"]["header"]) == 9 for r in tables["results"]["rows"])
    for method in METHODS:
        assert [r["first"] for r in tables[f"final-{method}"]["rows"]] == CONCEPTS
        samples = tables[f"samples-{method}"]
        assert samples["header"] == ["", *CONCEPTS]
        assert [r["first"] for r in samples["rows"]] == [
            "base model (class prompt)", *(f"after task {t + 1} ({c})" for t, c in enumerate(CONCEPTS)),
            "each concept alone (upper bound)"]
        assert [r["images"] for r in samples["rows"]] == [3, 1, 2, 3, 3]
        assert all(r["cells"] == 1 + len(CONCEPTS) for r in samples["rows"])
    assert [r["first"] for r in tables["gate-perfusion"]["rows"]] == [f"{b:g}" for b in GATE_BETAS]
    assert "gate-textual-inversion" not in tables
    assert state["headings"][:2] == ["Results", "Over the tasks"]
    assert {"method-textual-inversion", "method-perfusion", "gate-curve-perfusion"} <= set(state["headings"])


def test_world_v2_report_in_chromium(bench_v2, browser, artifacts, record_property, monkeypatch, capsys):
    """The World v2 report: intervals over two seeds, the per-concept matrices, the generality curve, the pairs, and
    per concept its samples (base model, renders, after its own task, after the last, alone)."""
    out, results = bench_v2
    monkeypatch.setattr(sys, "argv", ["museum", "report", str(out)])
    cli.main()
    state = render(browser, out / "report.html", artifacts, "report-v2", record_property)
    assert state["title"] == "Museum continual benchmark (World v2)"
    assert_images_loaded(state)
    alts = [i["alt"] for i in state["images"]]
    for alt in ("summary with intervals", "average and forgetting over tasks", "generality over tasks",
                "per-concept matrix, gap_evaluator", "per-concept matrix, gap_independent"):
        assert alts.count(alt) == 1, alt
    for method in V2_METHODS:
        assert alts.count(f"{method} heatmaps") == 1
        per_concept = 2 if get_method(method).independent else 3  # an independent method alone is its own task
        assert sum(a.startswith((f"{method} after own task", f"{method} after last task", f"{method} alone:"))
                   for a in alts) == per_concept * len(V2_CONCEPTS)
    assert sum(a.startswith(("base model:", "rendered:")) for a in alts) == 2 * len(V2_CONCEPTS) * len(V2_METHODS)
    tables = state["tables"]
    assert [r["first"] for r in tables["results"]["rows"]] == [*V2_METHODS, *(f"alone: {m}" for m in V2_METHODS),
                                                               "joint: finetune", "base model (class prompt)"]
    assert all(r["cells"] == len(tables["beyond"]["header"]) for r in tables["beyond"]["rows"])
    for method in V2_METHODS:
        samples = tables[f"samples-{method}"]
        images = 4 if get_method(method).independent else 5  # the alone cell of an independent method is text
        assert [r["first"] for r in samples["rows"]] == V2_CONCEPTS and all(r["images"] == images for r in samples["rows"])
    assert [r["first"] for r in tables["generality"]["rows"]] == [
        "base model (before the first task)", *(f"{m} (after the last task)" for m in V2_METHODS)]
    assert [r["first"] for r in tables["composition"]["rows"]] == V2_METHODS
    assert state["headings"][:5] == ["Results", "Over the tasks", "Per concept", "Retained generality",
                                     "Two concepts side by side"]


def test_gallery_in_chromium(bench, browser, artifacts, record_property, tmp_path):
    out, results = bench
    m = Museum.open(out / "perfusion" / "museum")
    training = {c: build_concept(c, n_train=3).train_images for c in CONCEPTS}
    scores = results["methods"]["perfusion"]["R"]
    metrics = {c: {"CLIP-I": scores["image_alignment"][-1][j]} for j, c in enumerate(CONCEPTS)}
    page = write_gallery(m, tmp_path / "gallery.html", training_images=training, metrics=metrics)
    state = render(browser, page, artifacts, "gallery", record_property)
    assert_images_loaded(state)
    assert len(state["images"]) == len(CONCEPTS) * (3 + 1)  # 3 training images and the sample per concept
    rows = state["tables"]["concepts"]["rows"]
    assert [r["cells"] for r in rows] == [8] * 3
    assert [r["first"] for r in rows] == ["0", "1", "2"]


def test_broken_image_is_caught(browser, tmp_path):
    """The check itself can fail: a page with an image Chromium cannot decode."""
    page = write_page(tmp_path / "bad.html", "bad", [img_tag(Image.new("RGB", (4, 4), "red"), alt="good"),
                                                     '<img src="data:image/png;base64,AAAA" alt="broken">'])
    browser.open(page.resolve().as_uri())
    state = browser.evaluate(PAGE_STATE)
    assert [(i["alt"], i["width"] > 0) for i in state["images"]] == [("good", True), ("broken", False)]
    with pytest.raises(AssertionError, match="could not show"):
        assert_images_loaded(state)

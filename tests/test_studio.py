"""The web studio (``museum serve``, museum/studio/): what it does without the page (bad uploads refused with their
message and the museum unchanged, cancel, the generation knobs read from the methods), and the page itself driven in
a real headless Chromium with Playwright: upload, learn on the tiny test model while the progress bar moves, see the
concept listed, export it, draw with its phrase, open a benchmark report; and two tabs learning into one museum at
once, the second waiting for the first. Screenshots are kept in ``test-artifacts/studio/`` (git-ignored;
``MUSEUM_TEST_ARTIFACTS`` moves it). The browser tests are skipped where Playwright or Chromium is missing
(``pip install -e ".[test]"``; Debian: ``apt-get install chromium``, which .ci/run does)."""

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from reliability_support import leftovers, manifest_names
from studio_page import (
    CHROMIUM, chromium, click_learn, fill_generate, fill_kept, fill_learn, finished, free_port, generated, open_studio,
    show_tab,
)

from conftest import museum_snapshot
from museum.errors import MuseumUserError
from museum.museum import Museum
from museum.store.lock import writer_lock

pytest.importorskip("gradio", reason="the studio needs Gradio: pip install -e \".[studio]\"")
from museum.studio.app import is_loopback, start  # noqa: E402
from museum.studio.core import LearnJob, LearnRequest, Studio, knob_options, knobs  # noqa: E402

ARTIFACTS = Path(os.environ.get("MUSEUM_TEST_ARTIFACTS") or Path(__file__).resolve().parent.parent / "test-artifacts")
STEP_DELAY = 0.4  # seconds added to each training step in the browser tests, so that the page can watch them


def run(studio: Studio, name: str, files, *, steps: int = 2, session: str = "s", **kw):
    """Learn through the studio as the page does; the job's statuses, the last one final."""
    request = LearnRequest(name, [str(f) for f in files], "c-lora", steps, **kw)
    return list(studio.learn(session, request).statuses())


def images_of(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def studio(tiny_base, concept_images, tmp_path_factory):
    """A studio on a museum (tiny model) that has one concept, "sunburst"."""
    folder = tmp_path_factory.mktemp("studio") / "museum"
    Museum.init(folder, base=tiny_base).learn("sunburst", concept_images["sunburst"][0], class_word="circle",
                                              steps=2, progress=False)
    s = Studio(folder)
    yield s
    s.close()


def _bad(tmp: Path, good: list[Path], case: str) -> tuple[list[Path], str]:
    """Upload files for a bad-upload ``case`` and the name to learn them under."""
    if case == "wrong type":
        (tmp / "notes.txt").write_text("not a picture")
        return [*good, tmp / "notes.txt"], "mug"
    if case == "unreadable":
        (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
        return [*good, tmp / "broken.png"], "mug"
    if case == "too few":
        return good[:2], "mug"
    if case == "too many":
        return good * 4, "mug"
    return good, {"duplicate name": "sunburst", "invalid name": "My Dog", "too large": "mug"}[case]


@pytest.mark.parametrize("case, message", [
    ("wrong type", "notes.txt: not an image file"),
    ("unreadable", "broken.png: not a readable image"),
    ("too few", "2 file(s) given: a concept is learned from 3-10 images"),
    ("too many", "12 file(s) given: a concept is learned from 3-10 images"),
    ("too large", "is too large for a concept image"),
    ("duplicate name", "the museum already has a concept 'sunburst'"),
    ("invalid name", "invalid concept name 'My Dog'"),
])
def test_a_bad_upload_gets_its_message_and_leaves_the_museum_unchanged(studio, concept_images, tmp_path, monkeypatch,
                                                                       case, message):
    if case == "too large":
        monkeypatch.setattr("museum.training.data.MAX_FILE_BYTES", 100)
    files, name = _bad(tmp_path, images_of(concept_images["checker"][0]), case)
    before = museum_snapshot(studio.folder)
    statuses = run(studio, name, files, class_word="square")
    assert statuses[-1].state == "failed" and message in statuses[-1].message, statuses[-1].message
    assert str(studio.scratch) not in statuses[-1].message  # the upload's own file names, not where they were copied
    assert museum_snapshot(studio.folder) == before


def test_cancel_stops_learning_and_commits_nothing(studio, concept_images):
    before = museum_snapshot(studio.folder)
    job = studio.learn("c", LearnRequest("checker", images_of(concept_images["checker"][0]), "c-lora", 500,
                                         class_word="square"))
    states = []
    for status in job.statuses():
        states.append(status.state)
        if status.state == "training":
            assert studio.cancel("c") is job
    assert states[-1] == "cancelled" and "training" in states
    assert museum_snapshot(studio.folder) == before
    with writer_lock(studio.folder):  # released
        pass


def test_generation_knobs_come_from_the_methods_of_the_museums_concepts():
    concepts = [{"name": "a", "method": "perfusion"}, {"name": "b", "method": "perfusion"},
                {"name": "c", "method": "lfs"}, {"name": "d", "method": "c-lora"}]
    found = knobs(concepts)
    assert [k.label for k in found] == ["gate_bias (perfusion)", "gate_temp (perfusion)", "strength of a",
                                        "strength of b", "context_scale (lfs)"]
    values = ["0.6", "", "1.5", None, " 0 "]  # what the page's fields hold; empty: the method's default
    assert knob_options(found, values) == {"gate_bias": 0.6, "strength": {"a": 1.5}, "context_scale": 0.0}
    with pytest.raises(MuseumUserError, match="strength of b: 'lots' is not a number"):
        knob_options(found, ["", "", "", "lots", ""])
    assert knobs(concepts[3:]) == []


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("0.0.0.0", False), ("192.168.1.20", False), ("studio.example", False)])
def test_only_loopback_hosts_count_as_local(host, loopback):
    assert is_loopback(host) is loopback


def test_museum_serve_makes_the_museum_and_warns_when_it_listens_beyond_this_machine(tiny_base, tmp_path):
    port = free_port()
    folder = tmp_path / "new-museum"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "museum", "serve", str(folder), "--base", str(tiny_base),
                                   "--host", "0.0.0.0", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as reply:
                    config = json.load(reply)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert config["title"] == "Museum studio: new-museum"
    assert manifest_names(folder) == []  # made on --base
    text = log.read_text()
    assert f"created museum {folder}" in text, text
    assert "warning: --host 0.0.0.0: the studio is reachable from other machines" in text, text


# ----------------------------------------------------------------------------- in a browser

@pytest.fixture
def served(tmp_path, tiny_base, monkeypatch):
    """``served(museum_folder)``: the studio on it at a free port; its URL. Training steps are slowed by
    ``STEP_DELAY`` so that the page can see them."""
    slow = LearnJob._on_step

    def on_step(self, step, loss):
        time.sleep(STEP_DELAY)
        slow(self, step, loss)

    monkeypatch.setattr(LearnJob, "_on_step", on_step)
    running = []

    def serve(folder: Path) -> str:
        studio, port = Studio(folder), free_port()
        running.append((start(studio, port=port, block=False), studio))
        return f"http://127.0.0.1:{port}/"

    yield serve
    for page, studio in running:
        page.close()
        studio.close()


@pytest.fixture
def browser():
    pytest.importorskip("playwright.sync_api", reason="Playwright drives the browser: pip install playwright")
    if CHROMIUM is None:
        pytest.skip("no Chromium to drive (Debian: apt-get install chromium; or set MUSEUM_CHROMIUM to a "
                    "Chrome/Chromium binary)")
    with chromium() as b:
        yield b


@pytest.fixture
def artifacts(request):
    folder = ARTIFACTS / "studio" / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"\nscreenshots of {request.node.name}: {folder}")
    return folder


def test_studio_in_a_browser(browser, served, tiny_base, concept_images, tmp_path, artifacts, monkeypatch):
    drawn = []  # the generation options each drawing got
    draw = Studio.generate
    monkeypatch.setattr(Studio, "generate", lambda self, prompt, **kw: drawn.append(kw["options"]) or draw(self, prompt,
                                                                                                          **kw))
    folder = tmp_path / "museum"
    Museum.init(folder, base=tiny_base)
    page = open_studio(browser, served(folder))
    good = images_of(concept_images["sunburst"][0])

    # an invalid upload: its message in the page, the museum unchanged
    (tmp_path / "notes.txt").write_text("not a picture")
    before = museum_snapshot(folder)
    fill_learn(page, [*good, tmp_path / "notes.txt"], "mug", 4, class_word="circle")
    click_learn(page)
    assert finished(page, "mug") == "failed"
    assert "notes.txt: not an image file" in page.inner_text("#learn-status")
    page.screenshot(path=artifacts / "learn-invalid-upload.png", full_page=True)
    assert museum_snapshot(folder) == before

    # cancel: training stops, nothing is committed
    page.locator("#learn-files button[aria-label=Clear]").first.click()
    fill_learn(page, good, "cup", 50, class_word="circle")
    click_learn(page)
    page.wait_for_selector("#learn-status [data-state=training]")
    page.click("#learn-cancel")
    assert finished(page, "cup") == "cancelled"
    assert "nothing was learned, the museum is as it was" in page.inner_text("#learn-status")
    assert museum_snapshot(folder) == before

    # learn: the progress bar moves step by step, with the loss and the time left
    page.locator("#learn-files button[aria-label=Clear]").first.click()
    fill_learn(page, good, "smiley", 4, class_word="circle", method="perfusion")
    click_learn(page)
    page.wait_for_selector("#learn-status [data-state=training]")
    page.screenshot(path=artifacts / "learn-training.png", full_page=True)
    assert finished(page, "smiley") == "done", page.inner_text("#learn-status")
    page.locator("#learn-sample img").wait_for()
    page.screenshot(path=artifacts / "learn-done.png", full_page=True)
    training = [s for s in page.evaluate("window.seen") if s[0] == "training"]
    steps = [s[1] for s in training]
    assert len(set(steps)) >= 2 and steps == sorted(steps) and set(steps) <= {1, 2, 3, 4}, steps
    assert [s[2] for s in training] == steps  # the bar's value is the step
    assert all("loss " in s[3] for s in training) and any(" left" in s[3] for s in training), training
    assert manifest_names(folder) == ["smiley"]

    # listed in the Museum tab, with its sample; exported as a zip the page downloads
    show_tab(page, "Museum")
    page.wait_for_selector("#museum-table td:text-is('smiley')")
    assert page.locator("#museum-table img").evaluate("im => im.naturalWidth") > 0
    page.click("#museum-export")
    link = page.wait_for_selector("#museum-download a[download]")
    page.screenshot(path=artifacts / "museum.png", full_page=True)
    files = zipfile.ZipFile(io.BytesIO(page.request.get(link.get_attribute("href")).body())).namelist()
    assert "learned_embeds.safetensors" in files and "museum_export.json" in files
    page.fill("#museum-format input", "a1111")  # the files AUTOMATIC1111 and ComfyUI load
    page.keyboard.press("Enter")
    page.click("#museum-export")
    page.wait_for_selector("#museum-status:has-text('(a1111)')")
    link = page.wait_for_selector("#museum-download a[download]")
    files = zipfile.ZipFile(io.BytesIO(page.request.get(link.get_attribute("href")).body())).namelist()
    assert "embeddings/smiley.safetensors" in files and "README.txt" in files

    # draw with its phrase, inserted by its button, and its method's knobs (Perfusion's gate bias and strength)
    show_tab(page, "Generate")
    page.locator("button.phrase", has_text="<smiley> circle").click()
    page.wait_for_function("document.querySelector('#gen-prompt textarea').value === '<smiley> circle'")
    prompt = "a <smiley> circle on a sand background"
    fill_generate(page, prompt, n=2, steps=2, seed=7,
                  knobs={"gate_bias (perfusion)": "0.6", "strength of smiley": "1.5"})
    generated(page, 2)
    assert page.locator("#gen-gallery img").count() == 2
    text = page.inner_text("#gen-gallery")
    assert f"seed 7: {prompt}" in text and f"seed 8: {prompt}" in text, text
    assert drawn == [{"gate_bias": 0.6, "strength": {"smiley": 1.5}}]
    page.screenshot(path=artifacts / "generate.png", full_page=True)


def test_benchmark_tab_opens_a_bench_folders_report(browser, served, tiny_base, tmp_path, artifacts):
    from museum.evaluation.benchmark import run_benchmark

    run_benchmark(["textual-inversion"], ["sunburst"], tmp_path / "bench", base=tiny_base, steps=2, n_prompts=1,
                  n_seeds=2, gen_steps=2, progress=False, base_row=False, n_train=3, n_ref=4)
    Museum.init(tmp_path / "museum", base=tiny_base)
    page = open_studio(browser, served(tmp_path / "museum"))
    show_tab(page, "Benchmark")
    fill_kept(page, "#bench-folder textarea", str(tmp_path / "nothing"))
    page.click("#bench-open")
    page.wait_for_selector("#bench-status .studio-error")
    assert "no benchmark results at" in page.inner_text("#bench-status")
    fill_kept(page, "#bench-folder textarea", str(tmp_path / "bench"))
    page.click("#bench-open")
    frame = page.frame_locator("#bench-frame")
    frame.locator("#results td", has_text="textual-inversion").first.wait_for()
    assert frame.locator("h1").inner_text() == "Museum continual benchmark"
    page.screenshot(path=artifacts / "benchmark.png", full_page=True)


def test_two_tabs_learning_into_one_museum(browser, served, tiny_base, concept_images, tmp_path, artifacts):
    folder = tmp_path / "museum"
    Museum.init(folder, base=tiny_base)
    url = served(folder)
    first, second = open_studio(browser, url), open_studio(browser, url)
    fill_learn(first, images_of(concept_images["sunburst"][0]), "first", 8, class_word="circle")
    fill_learn(second, images_of(concept_images["checker"][0]), "second", 3, class_word="square")
    click_learn(first)
    first.wait_for_selector("#learn-status [data-state=training]")
    click_learn(second)  # while the first holds the museum's writer lock
    second.wait_for_selector("#learn-status [data-state=waiting]")
    assert "waiting for the other learner" in second.inner_text("#learn-status")
    second.screenshot(path=artifacts / "second-tab-waiting.png", full_page=True)
    assert finished(first, "first") == "done", first.inner_text("#learn-status")
    assert finished(second, "second") == "done", second.inner_text("#learn-status")
    # the second trained only after the first had committed, and the museum holds both, whole
    states = [s[0] for s in second.evaluate("window.seen")]
    assert states.index("training") > states.index("waiting")
    assert manifest_names(folder) == ["first", "second"] and leftovers(folder) == []
    m = Museum.open(folder)
    assert len(m.generate("a <first> circle and a <second> square", n=1, steps=2)) == 1  # every tensor checks out

"""Driving the studio's page (museum/studio/app.py) in Chromium with Playwright, as a person does: what
tests/test_studio.py and scripts/studio_screenshots.py share. Playwright's own browser download cannot work offline,
so it launches the system's Chromium (Debian: ``apt-get install chromium``; ``MUSEUM_CHROMIUM`` names another)."""

from __future__ import annotations

import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = os.environ.get("MUSEUM_CHROMIUM") or next((p for p in map(shutil.which, BROWSERS) if p), None)

#: records every state the Learn tab's status shows: [state, step, the bar's value, its text, the concept's name]
WATCH_STATUS = """() => {
  window.seen = [];
  const box = document.querySelector('#learn-status');
  new MutationObserver(() => {
    const d = box.querySelector('[data-state]');
    const bar = box.querySelector('progress');
    if (d) window.seen.push([d.dataset.state, +d.dataset.step, bar && bar.hasAttribute('value') ? bar.value : null,
                             d.innerText, d.dataset.concept]);
  }).observe(box, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def chromium() -> Iterator:
    """A headless Chromium (Playwright's ``Browser``)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


def open_studio(browser, url: str, width: int = 1200):
    """A new tab on the studio at ``url``, its Learn status watched (``window.seen``)."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto(url)
    page.wait_for_selector("#learn-go")
    page.evaluate(WATCH_STATUS)
    return page


def fill_learn(page, files: Sequence[Path], name: str, steps: int, *, class_word: str | None = None,
               method: str = "c-lora") -> None:
    """Fill the Learn tab: upload ``files`` (waiting until each is listed), the name, what it is (a style when no
    ``class_word``), the method and the steps."""
    page.locator("#learn-files input[type=file]").set_input_files([str(f) for f in files])
    for f in files:
        page.locator(f"#learn-files td.filename[aria-label='{Path(f).name}']").wait_for()
    page.fill("#learn-name textarea", name)
    page.locator("#learn-kind label", has_text="object" if class_word else "style").click()
    if class_word:
        page.fill("#learn-class textarea", class_word)
    if page.input_value("#learn-method input") != method:
        page.fill("#learn-method input", method)
        page.keyboard.press("Enter")
        page.wait_for_function(f"document.querySelector('#learn-about').innerText.startsWith('{method}:')")
    page.fill("#learn-steps input", str(steps))


def click_learn(page) -> None:
    """Click Learn, forgetting the states the status showed before (``window.seen``)."""
    page.evaluate("window.seen = []")
    page.click("#learn-go")


def finished(page, name: str, timeout: float = 120_000) -> str:
    """Wait for the page's job learning ``name`` to end; its final state ("done", "failed" or "cancelled"). The
    status the page showed before the click may be recorded again after it: give each job in a page its own name."""
    final = f"s => ['done', 'failed', 'cancelled'].includes(s[0]) && s[4] === {name!r}"
    page.wait_for_function(f"window.seen.some({final})", timeout=timeout)
    return page.evaluate(f"window.seen.find({final})[0]")


def show_tab(page, name: str) -> None:
    page.locator("button[role=tab]", has_text=name).click()
    page.locator("button[role=tab][aria-selected=true]", has_text=name).wait_for()


def fill_kept(page, selector: str, value: str, tries: int = 3) -> None:
    """Fill ``selector`` and check, a moment later, that the page kept the value: a tab Gradio mounts on first
    showing can reset a field filled at once (seen in CI: the click then sent the empty initial value)."""
    for _ in range(tries):
        page.fill(selector, value)
        page.wait_for_timeout(200)
        if page.input_value(selector) == value:
            return
    raise AssertionError(f"{selector} did not keep {value!r} after {tries} fills")


def fill_generate(page, prompt: str, *, n: int, steps: int, seed: int = 0, knobs: dict[str, str] | None = None) -> None:
    """Fill the Generate tab: the prompt, the sampling settings and generation options by their labels."""
    page.fill("#gen-prompt textarea", prompt)
    if knobs:
        page.locator(".knob textarea").first.wait_for()
    for label, value in (knobs or {}).items():
        page.get_by_label(label).fill(value)
    page.fill("#gen-n input", str(n))
    page.fill("#gen-steps input", str(steps))
    page.fill("#gen-seed input", str(seed))


def generated(page, n: int, timeout: float = 120_000) -> None:
    """Click Generate and wait until ``n`` images are drawn and decoded (an error in the page fails at once)."""
    page.click("#gen-go")
    page.wait_for_selector("#gen-status div", timeout=timeout)
    errors = page.locator("#gen-status .studio-error")
    assert errors.count() == 0, page.inner_text("#gen-status")
    page.wait_for_function(f"[...document.querySelectorAll('#gen-gallery img')].filter(im => im.naturalWidth).length "
                           f">= {n}", timeout=timeout)

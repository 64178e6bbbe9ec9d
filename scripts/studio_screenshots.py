"""The screenshots in docs/STUDIO.md: the studio (``museum serve``) on the embedded model, driven in headless Chromium
as a person uses it.

    OMP_NUM_THREADS=1 python scripts/studio_screenshots.py --out docs/studio

Through the Learn tab it learns three concepts of the procedural world at their methods' default steps: sunburst
(a circle) with c-lora, checker (a square) with Perfusion and the neon style with c-lora. It shows the Museum tab,
draws "a <sunburst> on a sand background, <neon> style" on the Generate tab (Perfusion's knobs in view), and opens
the report of a small ``museum bench`` (c-lora, two tasks) on the Benchmark tab. One PNG per view, reduced to 128
colours to stay small (they live in git). About 10 minutes on one CPU thread. Needs Playwright and Chromium
(tests/studio_page.py)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from studio_page import (  # noqa: E402
    chromium, click_learn, fill_generate, fill_learn, finished, free_port, generated, open_studio, show_tab,
)

from museum.evaluation.benchmark import run_benchmark  # noqa: E402
from museum.museum import Museum  # noqa: E402
from museum.studio.app import start  # noqa: E402
from museum.studio.core import Studio  # noqa: E402
from museum.world.concepts import BENCHMARK_CONCEPTS, build_concept  # noqa: E402

#: (concept of the world, method, its class word; None: a style)
CONCEPTS = [("sunburst", "c-lora", "circle"), ("checker", "perfusion", "square"), ("neon", "c-lora", None)]
PROMPT = "a <sunburst> on a sand background, <neon> style"


def shoot(page, path: Path) -> None:
    """A full-page screenshot at ``path``, reduced to 128 colours."""
    page.screenshot(path=path, full_page=True)
    with Image.open(path) as image:
        image.convert("RGB").quantize(colors=128).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def learn_all(page, studio: Studio, images: Path, out: Path) -> None:
    """Learn ``CONCEPTS`` through the Learn tab; the first one is shot mid-training and when done."""
    for i, (name, method, class_word) in enumerate(CONCEPTS):
        build_concept(name, n_train=5).save(images / name)
        steps = studio.method_defaults(method)["steps"]
        fill_learn(page, sorted((images / name).iterdir()), name, steps, class_word=class_word, method=method)
        click_learn(page)
        if i == 0:
            page.wait_for_function(f"window.seen.some(s => s[0] === 'training' && s[1] >= {steps // 3})",
                                   timeout=600_000)
            shoot(page, out / "learn-training.png")
        assert finished(page, name, timeout=1_800_000) == "done", page.inner_text("#learn-status")
        if i == 0:
            page.locator("#learn-sample img").wait_for()
            shoot(page, out / "learn-done.png")
        page.locator("#learn-files button[aria-label=Clear]").first.click()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/studio"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_benchmark(["c-lora"], BENCHMARK_CONCEPTS[:2], work / "museum-bench", progress=False)
        Museum.init(work / "my-museum")
        studio, port = Studio(work / "my-museum"), free_port()
        server = start(studio, port=port, bench=work / "museum-bench", block=False)
        try:
            with chromium() as browser:
                page = open_studio(browser, f"http://127.0.0.1:{port}/", width=1100)
                learn_all(page, studio, work / "images", args.out)
                show_tab(page, "Museum")
                page.wait_for_selector("#museum-table td:text-is('neon')")
                shoot(page, args.out / "museum.png")
                show_tab(page, "Generate")
                fill_generate(page, PROMPT, n=4, steps=25)
                generated(page, 4)
                shoot(page, args.out / "generate.png")
                show_tab(page, "Benchmark")
                page.click("#bench-open")
                page.frame_locator("#bench-frame").locator("#results").wait_for()
                shoot(page, args.out / "benchmark.png")
        finally:
            server.close()
            studio.close()


if __name__ == "__main__":
    main()

"""``museum demo``: the main job on the embedded model, in a few minutes on a CPU.

Learns three benchmark concepts of the rendered world one after another with one method,
generates each of them after all three are learned, alone and in scenes set by the rest of the
prompt (size, position, background), and writes a gallery.
"""

from __future__ import annotations

import time
from pathlib import Path

from museum.museum import Museum
from museum.report.gallery import write_gallery
from museum.world.concepts import build_concept, format_prompt

# Three objects learned one after another on the embedded model (docs/BENCHMARKS.md, per-concept table:
# Custom Diffusion 0.209 / 0.363 / 0.471 against the base model's 0.153 / 0.007 / -0.028). Custom Diffusion
# by default: the highest final A there, no forgetting, and the class word keeps each concept's shape
# in new scenes (C-LoRA's `a <tok>` draws the shapes but not the colours or patterns). Not a style: no
# method learns the world's styles well on it, and a prompt with two objects draws one (docs/METHODS.md,
# Perfusion composition), so the demo composes each concept with words.
DEMO_CONCEPTS = ("sunburst", "rainbow", "gem")
ALONE, NEW_SCENES = 2, (8, 9)  # indices into a concept's evaluation templates: "a {} on a grass background";
# "a large {} on the left on a grass background", "a small {} at the top on a night background"


def run_demo(out: Path, *, method: str = "custom-diffusion", steps: int | None = None, names=DEMO_CONCEPTS,
             base: str | Path = "embedded", echo=print, progress: bool = True) -> Path:
    out = Path(out)
    folder = out / "museum"
    m = Museum.open(folder) if (folder / "museum.json").exists() else Museum.init(folder, base=base)
    concepts = {n: build_concept(n) for n in names}
    start = time.time()
    for name, concept in concepts.items():
        if name in m.manifest.names():
            echo(f"{name}: already learned, skipping")
            continue
        images = out / "images" / name
        concept.save(images)
        c = m.learn(name, images, method=method, class_word=None if concept.is_style else concept.class_word,
                    style=concept.is_style, steps=steps, progress=progress)
        echo(f"learned {name} ({method}, {c.info['steps']} steps) in {c.info['train_seconds']:.0f}s; prompt it as \"{c.phrase}\"")
    phrases = {c.name: c.phrase for c in m.concepts}
    sections = []
    alone = [format_prompt(concepts[n].prompts[ALONE], phrases[n]) for n in names]
    sections.append(("Each concept alone, after all three were learned",
                     [(p, img) for p in alone for img in m.generate(p, n=4, seed=100)]))
    scenes = [format_prompt(concepts[n].prompts[k], phrases[n]) for n in names for k in NEW_SCENES]
    sections.append(("Each concept in a scene set by the prompt's other words",
                     [(p, img) for p in scenes for img in m.generate(p, n=2, seed=200)]))
    page = write_gallery(m, out / "gallery.html", extra=sections,
                         training_images={n: c.train_images for n, c in concepts.items()})
    echo(f"demo finished in {time.time() - start:.0f}s: museum {folder}, gallery {page}")
    return page

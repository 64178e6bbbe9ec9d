"""``museum demo``: the main job on the embedded model, in about five minutes on a CPU.

Learns three benchmark concepts of the rendered world one after another (two objects and a
style) with one method, generates each alone and two compositions, and writes a gallery.
"""

from __future__ import annotations

import time
from pathlib import Path

from museum.museum import Museum
from museum.report.gallery import write_gallery
from museum.world.concepts import build_concept

DEMO_CONCEPTS = ("sunburst", "neon", "checker")


def _prompt(concept, phrase: str) -> str:
    return (f"a red star on a sand background, {phrase} style" if concept.is_style
            else f"a {phrase} on a grass background")


def run_demo(out: Path, *, method: str = "c-lora", steps: int | None = None, names=DEMO_CONCEPTS,
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
    alone = [(_prompt(concepts[n], phrases[n]), n) for n in names]
    sections.append(("Each concept alone, after all three were learned",
                     [(p, img) for p, _ in alone for img in m.generate(p, n=4, seed=100)]))
    objects = [n for n in names if not concepts[n].is_style]
    styles = [n for n in names if concepts[n].is_style]
    composed = [f"a {phrases[o]} on a night background, {phrases[s]} style" for o in objects[:2] for s in styles[:1]]
    sections.append(("Two concepts composed in one prompt", [(p, img) for p in composed for img in m.generate(p, n=4, seed=200)]))
    page = write_gallery(m, out / "gallery.html", extra=sections,
                         training_images={n: c.train_images for n, c in concepts.items()})
    echo(f"demo finished in {time.time() - start:.0f}s: museum {folder}, gallery {page}")
    return page

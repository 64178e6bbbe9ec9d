"""Pictures a user brings from outside the rendered world, learned on a base model (issue 21's last check: the new
model must learn them at least as well as the model it replaces).

    python scripts/measure_user_concepts.py --pipeline embedded --out docs/world-v2/user-concepts-first.json
    python scripts/measure_user_concepts.py --pipeline ~/.cache/museum/pretrain-v2/pipeline \
        --out docs/world-v2/user-concepts-v2.json
    python scripts/measure_user_concepts.py --compare docs/world-v2/user-concepts-first.json \
        docs/world-v2/user-concepts-v2.json

The pictures (``scripts/make_user_concepts.py``, matplotlib, not the world's renderer) are four objects and two
styles, four images each. A user names the nearest word the model knows as the class: mug ``square``, house
``triangle``, tree ``circle``, fish ``diamond`` (the same for both models; every one is in both worlds'
vocabularies). Each concept is learned alone, in an empty museum, with each method's defaults, and drawn in
prompts both worlds can read ("a <tok> square on a grass background"; styles: "a red circle on a sand background,
<tok> style"), ``--per-prompt`` seeds each; the base model draws the same prompts with the class word (objects) or
without the style (styles), the same seeds.

Reading: the independent one only (no learned model; each model has its own evaluator, so the evaluator's numbers
are not comparable across models), at the model's own resolution, against four held-out pictures of the concept
(drawn as the training ones, never shown to a method), as gap closed = (learned - base) / (upper - base). The upper
anchor is what a perfect method would draw for the same prompts, as the benchmark's is (``prompt_renders``):
objects drawn by the same script on the model's own world's ground for each prompt's background word; styles: the
base model's own images of the prompts without the style, stylised by the same function as the pictures. Writes
JSON and a sheet of images (pictures, upper, base, each method) beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from make_user_concepts import SIZE, object_picture
from make_user_concepts import STYLES as STYLISE

from museum.evaluation.independent import gap_closed, independent_fidelity
from museum.generation import generate_images, image_grid
from museum.methods import method_names
from museum.methods.base import parse_setting
from museum.models.loading import load_pipeline
from museum.museum import Museum
from museum.world import render as render_v1
from museum.world.v2 import render as render_v2

PICTURES = Path(__file__).resolve().parent.parent / "docs/world-v2/user-concepts"
HELD_OUT = PICTURES.with_name("user-concepts-held-out")
CLASS_WORDS = {"mug": "square", "house": "triangle", "tree": "circle", "fish": "diamond"}
STYLES = ("watercolour", "duotone")
GROUNDS = ("sand", "sky", "grass", "night")
OBJECT_PROMPTS = tuple(f"a {{}} on a {ground} background" for ground in GROUNDS)
STYLE_PROMPTS = ("a red circle on a sand background, {} style", "a blue square on a grass background, {} style",
                 "a yellow star on a night background, {} style", "a green triangle on a sky background, {} style")


def prompts_for(name: str, phrase: str | None) -> list[str]:
    """The concept's prompts with ``phrase`` in the slot; ``phrase`` None: the base model's version (class word, or
    the style part left out)."""
    if name in STYLES:
        return [p.format(phrase) if phrase else p.split(", ")[0] for p in STYLE_PROMPTS]
    return [p.format(phrase or CLASS_WORDS[name]) for p in OBJECT_PROMPTS]


def world_ground(word: str, size: int, seed: int) -> np.ndarray:
    """The ground the model's world draws for ``word`` (uint8): the first world's renderer for a 32-pixel model."""
    world = render_v2 if size == render_v2.IMAGE_SIZE else render_v1
    return np.clip(world.background(word, np.random.default_rng(seed)), 0, 255).astype(np.uint8)


def upper_images(name: str, base: list[Image.Image], size: int, per_prompt: int) -> list[Image.Image]:
    """What a perfect method draws for the concept's prompts (see the module docstring), ``per_prompt`` each."""
    if name in STYLES:
        rng = random.Random(f"{name}:upper")
        return resized([STYLISE[name](b.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC), rng) for b in base], size)
    return resized([object_picture(name, world_ground(ground, size, k), random.Random(f"{name}:upper:{ground}:{k}"))
                    for ground in GROUNDS for k in range(per_prompt)], size)


def reading(images: list, references: list) -> float:
    return independent_fidelity(images, references)["fidelity"]


def resized(pictures: list[Image.Image], size: int) -> list[Image.Image]:
    return [p.convert("RGB").resize((size, size), Image.BICUBIC if p.width > size else Image.NEAREST) for p in pictures]


def learn_and_draw(folder: Path, name: str, method: str, args) -> tuple:
    m = Museum.init(folder, base=args.pipeline)
    style = name in STYLES
    concept = m.learn(name, PICTURES / name, method=method, style=style, class_word=CLASS_WORDS.get(name),
                      progress=False, seed=args.seed, **dict(parse_setting(kv) for kv in args.set))
    images = m.generate(prompts_for(name, concept.phrase), n=args.per_prompt, seed=0)
    return images, {"seconds": concept.info["train_seconds"], "steps": concept.info["steps"]}


def measure(args) -> dict:
    pipe = load_pipeline(args.pipeline)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    results = {"pipeline": str(args.pipeline), "resolution": size, "methods": args.methods, "seed": args.seed,
               "date": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.platform()}, {torch.get_num_threads()} threads",
               "concepts": {}}
    sheet = []
    for name in args.concepts:
        pictures = resized([Image.open(p) for p in sorted((PICTURES / name).glob("*.png"))], size)
        references = resized([Image.open(p) for p in sorted((HELD_OUT / name).glob("*.png"))], size)
        base_prompts = prompts_for(name, None)
        base = generate_images(pipe, [p for p in base_prompts for _ in range(args.per_prompt)],
                               seeds=[k for _ in base_prompts for k in range(args.per_prompt)])
        upper = upper_images(name, base, size, args.per_prompt)
        anchors = {"base": reading(base, references), "upper": reading(upper, references)}
        row = {"anchors": anchors, "methods": {}}
        every = max(1, len(base) // len(pictures))
        sheet += pictures + upper[::every][: len(pictures)] + base[::every][: len(pictures)]
        for method in args.methods:
            with tempfile.TemporaryDirectory() as tmp:
                images, info = learn_and_draw(Path(tmp) / "museum", name, method, args)
            learned = reading(images, references)
            row["methods"][method] = dict(info, reading=learned, gap_closed=gap_closed(learned, anchors["base"],
                                                                                         anchors["upper"]))
            sheet += images[::every][: len(pictures)]
            print(name, method, f"gap closed {row['methods'][method]['gap_closed']:.2f}", flush=True)
        results["concepts"][name] = row
    image_grid(sheet, cols=len(pictures), scale=max(1, 128 // size)).save(args.out.with_suffix(".png"))
    return results


def table(runs: dict[str, dict]) -> str:
    """Markdown: per method, the mean gap closed over objects and over styles, one column per run."""
    names = list(runs)
    lines = ["| method | kind | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    methods = [m for m in next(iter(runs.values()))["methods"]]
    for method in methods:
        for kind, members in (("objects", CLASS_WORDS), ("styles", STYLES)):
            cells = []
            for run in runs.values():
                gaps = [run["concepts"][c]["methods"][method]["gap_closed"] for c in members if c in run["concepts"]]
                gaps = [g for g in gaps if not math.isnan(g)]
                cells.append(f"{statistics.mean(gaps):.2f} ({len(gaps)})" if gaps else "-")
            lines.append(f"| {method} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="embedded")
    parser.add_argument("--methods", nargs="+",
                        default=["custom-diffusion", "c-lora", "perfusion", "textual-inversion"])
    parser.add_argument("--concepts", nargs="+", default=[*CLASS_WORDS, *STYLES])
    parser.add_argument("--per-prompt", type=int, default=2, help="seeds per prompt")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="method config overrides")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", nargs="+", type=Path, metavar="RESULTS", help="print a table of these runs")
    args = parser.parse_args()
    if args.compare:
        print(table({p.stem: json.loads(p.read_text()) for p in args.compare}))
        return
    if args.out is None:
        parser.error("--out is needed to measure (or --compare to tabulate runs)")
    if unknown := set(args.methods) - set(method_names()):
        parser.error(f"unknown methods {sorted(unknown)}; known: {', '.join(method_names())}")
    if unknown := set(args.concepts) - {*CLASS_WORDS, *STYLES}:
        parser.error(f"unknown concepts {sorted(unknown)}; known: {', '.join([*CLASS_WORDS, *STYLES])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = measure(args)
    args.out.write_text(json.dumps(results, indent=1))
    print(table({args.out.stem: results}))


if __name__ == "__main__":
    main()

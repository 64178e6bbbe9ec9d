"""Contact sheets of World v2 for docs/world-v2/README.md: random pretraining scenes with their captions,
every pattern, every style family, and every pooled concept's training images.

    python scripts/world_v2_sheets.py --out docs/world-v2/images
"""

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

from museum.world.v2 import concepts, render


def sheet(rows: list[list[Image.Image]], labels: list[str] | None = None, label_width: int = 0,
          scale: int = 2) -> Image.Image:
    """Rows of 64x64 images, upscaled ``scale`` times (nearest), with an optional label before each row."""
    size = 64 * scale
    cell = size + 4
    cols = max(len(r) for r in rows)
    out = Image.new("RGB", (label_width + cols * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(out)
    for y, row in enumerate(rows):
        if labels:
            draw.text((4, y * cell + cell // 2 - 6), labels[y], fill="black")
        for x, img in enumerate(row):
            out.paste(img.resize((size, size), Image.NEAREST), (label_width + x * cell, y * cell))
    return out


def pattern_rows() -> tuple[list[list[Image.Image]], list[str]]:
    rows, labels = [], []
    for name, spec in render.PATTERNS.items():
        rng = random.Random(name)
        row = []
        for i, shape in enumerate(render.SHAPES[:6]):
            palette = tuple(rng.sample(list(render.COLOURS), spec.colours[1]))
            look = render.Look(shape, palette, name, render.ORIENTATIONS[i % 3] if spec.oriented else None,
                               tuple(c[i % len(c)] for c in spec.layouts))
            row.append(render.render(render.Scene(look=look, background=render.TEXTURES[i], size="large"), i))
        rows.append(row)
        labels.append(name)
    return rows, labels


def style_rows() -> tuple[list[list[Image.Image]], list[str]]:
    rng = random.Random("styles")
    looks = [render.random_look(rng) for _ in range(6)]
    rows = [[render.render(render.Scene(look=look, background=render.TEXTURES[i], size="large",
                                        style=render.random_style(random.Random(i), family)), i)
             for i, look in enumerate(looks)] for family in render.STYLES]
    return rows, list(render.STYLES)


def pool_rows(pool: tuple[str, ...]) -> tuple[list[list[Image.Image]], list[str]]:
    built = [concepts.build_concept(name, n_train=5, n_ref=0) for name in pool]
    return [c.train_images for c in built], [f"{c.name} ({c.spec.class_word})" for c in built]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/world-v2/images"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sheet(*pattern_rows(), label_width=90).save(args.out / "patterns.png")
    sheet(*style_rows(), label_width=90).save(args.out / "styles.png")
    for name, pool in (("benchmark", concepts.BENCHMARK_POOL), ("tuning", concepts.TUNING_POOL),
                       ("zero-shot", concepts.ZERO_SHOT_POOL)):
        sheet(*pool_rows(pool), label_width=130, scale=1).save(args.out / f"pool-{name}.png")
    samples = render.base_samples(24, seed=99, reserved=concepts.reserved_signatures())
    sheet([[render.render(s, k) for s, k in samples[i:i + 6]] for i in range(0, 24, 6)]).save(args.out / "samples.png")
    (args.out / "samples.txt").write_text("\n".join(render.caption(s) for s, _ in samples) + "\n")

"""Pictures a user might bring, drawn with matplotlib (not the world's renderer): four small objects and
two styles that are not in the rendered world at all, four 64x64 images each on varied backgrounds.
They check that a model trained on the world learns concepts from outside it (issue 21).

    python scripts/make_user_concepts.py --out docs/world-v2/user-concepts --held-out docs/world-v2/user-concepts-held-out

``--held-out``: four more pictures of each concept, drawn the same way with other positions and sizes (objects) or
other scenery (styles): the references ``scripts/measure_user_concepts.py`` reads images against; no method sees them.

Objects: mug (red, white dots, a handle), house (yellow walls, brown roof, a door), tree (green crown,
brown trunk), fish (orange with white stripes and a tail). Styles: watercolour (soft edges, paper
grain, bleeding colour) and duotone (posterised to purple and yellow), each on matplotlib scenes of
circles, squares and lines.
"""

import argparse
import random
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches as mp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

SIZE = 64
BACKDROPS = [((0.55, 0.75, 0.95), (0.85, 0.93, 1.0)), ((0.93, 0.88, 0.75), (0.98, 0.95, 0.86)),
             ((0.35, 0.55, 0.3), (0.55, 0.75, 0.45)), ((0.2, 0.2, 0.3), (0.35, 0.35, 0.5))]


def _canvas(ground):
    """A figure on ``ground``: a (top, bottom) pair of RGB colours in [0, 1] (a gradient), or an (H, W, 3) uint8
    image (a model's world's ground, for the upper anchor of scripts/measure_user_concepts.py)."""
    fig = plt.figure(figsize=(2.56, 2.56), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1), ax.set_ylim(0, 1), ax.axis("off")
    if isinstance(ground, np.ndarray):
        ax.imshow(ground, extent=(0, 1, 0, 1), aspect="auto")
    else:
        top, bottom = np.array(ground[0]), np.array(ground[1])
        ax.imshow(np.linspace(top, bottom, 64)[:, None, :].repeat(2, axis=1), extent=(0, 1, 0, 1), aspect="auto")
    return fig, ax


def _finish(fig) -> Image.Image:
    fig.canvas.draw()
    img = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return img.resize((SIZE, SIZE), Image.BOX)


def mug(ax, x, y, s):
    ax.add_patch(mp.FancyBboxPatch((x - s, y - s), 1.6 * s, 2 * s, boxstyle="round,pad=0.01", color=(0.85, 0.1, 0.15)))
    ax.add_patch(mp.Arc((x + 0.6 * s, y), 0.9 * s, 1.1 * s, theta1=-90, theta2=90, color=(0.85, 0.1, 0.15), lw=6))
    for dx, dy in ((-0.6, 0.5), (0.1, -0.2), (-0.4, -0.6), (0.2, 0.6)):
        ax.add_patch(mp.Circle((x + dx * s, y + dy * s), 0.18 * s, color="white"))


def house(ax, x, y, s):
    ax.add_patch(mp.Rectangle((x - s, y - s), 2 * s, 1.4 * s, color=(0.98, 0.85, 0.3)))
    ax.add_patch(mp.Polygon([(x - 1.2 * s, y + 0.4 * s), (x + 1.2 * s, y + 0.4 * s), (x, y + 1.4 * s)], color=(0.5, 0.25, 0.1)))
    ax.add_patch(mp.Rectangle((x - 0.25 * s, y - s), 0.5 * s, 0.8 * s, color=(0.3, 0.15, 0.05)))


def tree(ax, x, y, s):
    ax.add_patch(mp.Rectangle((x - 0.2 * s, y - 1.2 * s), 0.4 * s, 1.2 * s, color=(0.45, 0.25, 0.1)))
    ax.add_patch(mp.Circle((x, y + 0.4 * s), 0.9 * s, color=(0.15, 0.6, 0.2)))


def fish(ax, x, y, s):
    ax.add_patch(mp.Ellipse((x, y), 2 * s, 1.1 * s, color=(1.0, 0.55, 0.1)))
    ax.add_patch(mp.Polygon([(x + 0.9 * s, y), (x + 1.5 * s, y + 0.6 * s), (x + 1.5 * s, y - 0.6 * s)], color=(1.0, 0.55, 0.1)))
    for dx in (-0.2, 0.3):
        ax.add_patch(mp.Rectangle((x + dx * s, y - 0.5 * s), 0.15 * s, s, color="white"))
    ax.add_patch(mp.Circle((x - 0.6 * s, y + 0.15 * s), 0.1 * s, color="black"))


def scenery(ax, rng):
    """Content for the styles: a few circles, squares and a line in random colours."""
    for _ in range(3):
        colour = rng.random(), rng.random(), rng.random()
        x, y, s = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.08, 0.18)
        if rng.random() < 0.5:
            ax.add_patch(mp.Circle((x, y), s, color=colour))
        else:
            ax.add_patch(mp.Rectangle((x - s, y - s), 2 * s, 2 * s, color=colour))
    ax.plot([0.1, 0.9], [rng.uniform(0.1, 0.3)] * 2, color=(0.1, 0.1, 0.1), lw=4)


def watercolour(img: Image.Image, rng) -> Image.Image:
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2)), np.float32)
    edges = np.asarray(img.convert("L").filter(ImageFilter.FIND_EDGES), np.float32)[..., None] / 255
    paper = np.random.default_rng(rng.randint(0, 9999)).normal(0, 6, a.shape[:2])[..., None]
    out = 0.7 * a + 0.3 * 245 - 60 * edges + paper
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def duotone(img: Image.Image, rng) -> Image.Image:
    y = np.asarray(img.convert("L"), np.float32) / 255
    y = np.round(y * 3) / 3
    dark, light = np.array([70, 20, 110], np.float32), np.array([255, 215, 60], np.float32)
    return Image.fromarray((dark * (1 - y[..., None]) + light * y[..., None]).astype(np.uint8))


OBJECTS = {"mug": mug, "house": house, "tree": tree, "fish": fish}
STYLES = {"watercolour": watercolour, "duotone": duotone}


def object_picture(name: str, ground, rng: random.Random) -> Image.Image:
    """The object ``name`` at a random place and size on ``ground`` (see :func:`_canvas`)."""
    fig, ax = _canvas(ground)
    OBJECTS[name](ax, rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6), rng.uniform(0.16, 0.24))
    return _finish(fig)


def style_picture(name: str, ground, rng: random.Random) -> Image.Image:
    """Random scenery on ``ground`` in the style ``name``."""
    fig, ax = _canvas(ground)
    scenery(ax, rng)
    return STYLES[name](_finish(fig), rng)


def pictures(name: str, n: int = 4, tag: str = "") -> list[Image.Image]:
    """``n`` pictures of ``name`` on the backdrops in turn; ``tag`` seeds another set (the held-out one)."""
    rng = random.Random(name + tag)
    draw = object_picture if name in OBJECTS else style_picture
    return [draw(name, BACKDROPS[i % len(BACKDROPS)], rng) for i in range(n)]


def write(folder: Path, images: list[Image.Image]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:02d}.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/world-v2/user-concepts"))
    parser.add_argument("--held-out", type=Path, default=Path("docs/world-v2/user-concepts-held-out"))
    args = parser.parse_args()
    for name in (*OBJECTS, *STYLES):
        write(args.out / name, pictures(name))
        write(args.held_out / name, pictures(name, tag=":held-out"))

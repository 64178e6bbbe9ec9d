"""The museum's gallery page: every concept with its sample, how to prompt it, and how it was learned."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

from PIL import Image

from museum.report.html import figure, table, write_page


def write_gallery(museum, path: Path, extra: Sequence[tuple[str, Sequence[tuple[str, Image.Image]]]] = (),
                  training_images: dict[str, Sequence[Image.Image]] | None = None,
                  metrics: dict[str, dict[str, float]] | None = None) -> Path:
    """Write ``path`` (HTML). ``extra`` adds sections of (caption, image); ``metrics`` per concept name."""
    rows, body = [], []
    for c in museum.concepts:
        rows.append([c.task_index, c.name, c.phrase, c.method, c.class_word, c.info.get("steps", ""),
                     f"{c.info.get('train_seconds', 0):.0f}s"]
                    + ([", ".join(f"{k} {v:.3f}" for k, v in metrics[c.name].items())] if metrics and c.name in metrics else []))
    header = ["#", "concept", "prompt as", "method", "class", "steps", "time"] + (["metrics"] if metrics else [])
    body.append(f"<p>Base model: <code>{html.escape(museum.manifest.base_path)}</code> "
                 f"(hash {museum.manifest.base_hash}); {len(rows)} concept(s).</p>")
    body.append(table(header, rows, "concepts"))
    for c in museum.concepts:
        body.append(f"<h2 id='concept-{c.name}'>{html.escape(c.name)}</h2>")
        if training_images and c.name in training_images:
            body.extend(figure(im.resize((96, 96), Image.NEAREST), f"training image {i + 1}")
                        for i, im in enumerate(training_images[c.name]))
        sample = c.path / "sample.png"
        if sample.is_file():
            with Image.open(sample) as im:
                body.append(figure(im.convert("RGB"), f"samples of \"{c.phrase}\" right after learning", width=384))
    for heading, figures in extra:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        body.extend(figure(im, cap, width=192) for cap, im in figures)
    return write_page(path, f"Museum gallery: {museum.folder.name}", body)

"""Self-contained HTML pages: images are embedded as base64 PNG, so one file can be mailed or opened offline."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

from PIL import Image

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
figure { display: inline-block; margin: 0.4em; text-align: center; vertical-align: top; }
figure img { image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: 0.8em; max-width: 260px; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
table.samples td { padding: 2px; text-align: center; } table.samples img { image-rendering: pixelated; display: block; }
table.samples th { font-size: 0.8em; font-weight: normal; }
code { background: #f4f4f4; padding: 1px 4px; }
"""


def img_tag(image: Image.Image, width: int | None = None, alt: str = "") -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    w = f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{data}"{w} alt="{html.escape(alt)}">'


def figure(image: Image.Image, caption: str, width: int | None = None) -> str:
    return f"<figure>{img_tag(image, width, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


class Raw(str):
    """HTML that :func:`table` puts in a cell as it is (other cells are escaped)."""


def _cell(c) -> str:
    return c if isinstance(c, Raw) else html.escape(str(c))


def table(header: Sequence[str], rows: Sequence[Sequence], table_id: str = "", css_class: str = "") -> str:
    head = "".join(f"<th>{_cell(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    tid = f' id="{html.escape(table_id)}"' if table_id else ""
    tid += f' class="{html.escape(css_class)}"' if css_class else ""
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_page(path: Path, title: str, body: Sequence[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>")
    path.write_text(page)
    return path

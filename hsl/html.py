"""A self-contained HTML page of search results: thumbnails inline, every product text escaped."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from PIL import Image

from .errors import HSLError, HSLUsageError, os_error_message
from .search import Hit, SearchResult

THUMB = 160
_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5rem;background:#fafafa;color:#222}
section{margin-bottom:2rem}h2{font-size:1.1rem;margin:.2rem 0 .6rem}
.grid{display:flex;flex-wrap:wrap;gap:.8rem}
figure{margin:0;width:170px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:5px}
img{width:160px;height:160px;object-fit:contain;background:#fff}
figcaption{font-size:.75rem;line-height:1.25}.score{color:#777}.missing{width:160px;height:160px;
display:flex;align-items:center;justify-content:center;background:#eee;color:#999;font-size:.75rem}"""


def _thumbnail(path: str) -> str | None:
    """A small inline JPEG as a data: URI, or None if the photo cannot be read any more."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            buffer = io.BytesIO()
            im.save(buffer, "JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _alt_text(hit: Hit) -> str:
    """What a screen reader says for the photo: the title, else the product's id and its attribute values."""
    if hit.text:
        return hit.text
    values = ", ".join(v for v in hit.attributes.values() if v)
    return f"photo of product {hit.id}" + (f" ({values})" if values else "")


def render_page(results: list[SearchResult], title: str = "hsl search results") -> str:
    sections = []
    for result in results:
        figures = []
        for hit in result.hits:
            uri = _thumbnail(hit.image)
            picture = (f'<img src="{uri}" alt="{html.escape(_alt_text(hit))}">' if uri
                       else '<div class="missing">photo unavailable</div>')
            attrs = ", ".join(f"{k}: {v}" for k, v in hit.attributes.items() if v)
            # Without a title the id is the caption's name; it is not repeated on the score line.
            score = f"{html.escape(hit.id)} · {hit.score:.3f}" if hit.text else f"{hit.score:.3f}"
            figures.append(f'<figure>{picture}<figcaption><b>{hit.rank}.</b> {html.escape(hit.text or hit.id)}<br>'
                           f'<span class="score">{score}</span><br>'
                           f'{html.escape(attrs)}</figcaption></figure>')
        sections.append(f'<section><h2>{html.escape(result.query)}</h2><div class="grid">{"".join(figures)}'
                        f'</div></section>')
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_STYLE}</style></head><body>{"".join(sections)}</body></html>\n')


def check_destination(path: str | os.PathLike) -> None:
    """Refuse a page path that cannot be written (a missing folder, a folder itself) before any search runs."""
    path = Path(path)
    if path.is_dir():
        raise HSLUsageError(f"`html` {path}: that is a folder; give a file path such as {path / 'page.html'}",
                            "html", str(path))
    if path.parent.exists() and not path.parent.is_dir():
        raise HSLUsageError(f"`html` {path}: {path.parent} is a file, not a folder; give another path", "html",
                            str(path))
    if not path.parent.is_dir():
        raise HSLUsageError(f"`html` {path}: its folder {path.parent} does not exist; create it or give another path",
                            "html", str(path))


def write_page(results: list[SearchResult], path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        path.write_text(render_page(results), encoding="utf-8")
    except OSError as exc:
        raise HSLError(os_error_message(exc, "`html`"), "html", str(path)) from None
    return path

"""The one report renderer, shared by run, comparison, multistage and grid reports.

A report is a title and a list of sections; a section is one Markdown template under ``evaluate/templates/``
(package data) rendered with one context dict. ``report.md`` is that Markdown; ``report.html`` is the same
Markdown converted by markdown-it-py, with every figure embedded as a data URI, so the two formats cannot drift
apart: a section written once appears in both. Raw HTML in the Markdown (a run warning, a class name) is
escaped, never interpreted.
"""
from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from markdown_it import MarkdownIt

from oncotransfer.io import atomic_write_bytes

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em} h2{margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f4f4f4}
blockquote{border:2px solid #446;border-radius:6px;padding:.6em 1.2em;margin:.6em 0;background:#f7f8fc}
blockquote li{margin:.25em 0} blockquote strong{color:#b00} blockquote em{color:#a60}
img{max-width:100%;display:block;margin:.8em 0}
pre{background:#f4f4f4;padding:.8em;overflow-x:auto;font-size:.85em}
"""

# Section templates only write Markdown, so they are not autoescaped; the HTML side is escaped by markdown-it.
ENV = jinja2.Environment(loader=jinja2.PackageLoader("oncotransfer.evaluate", "templates"), autoescape=False,
                         trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                         undefined=jinja2.StrictUndefined)
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a report cell: fixed decimals, ``n/a`` for None or NaN."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt_ci(value: float | None, ci: Sequence[float] | None) -> str:
    return fmt(value) + (f" (95% CI {fmt(ci[0])}–{fmt(ci[1])})" if ci else "")


def fmt_mean_sd(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "n/a"
    return f"{fmt(summary['mean'])} ± {fmt(summary['sd'])} (n = {summary['n']})"


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def slug(label: str) -> str:
    """A label as a file-name part (``plots/confusion_<slug>.png``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def _cell(value: Any) -> str:
    # a pipe would end the cell and a newline the row, in Markdown viewers and in the HTML alike
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return f" {text} " if text else " "


def md_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown (GFM) table, without a trailing newline."""
    lines = ["|" + "|".join(map(_cell, header)) + "|", "|" + "---|" * len(header)]
    lines += ["|" + "|".join(map(_cell, row)) + "|" for row in rows]
    return "\n".join(lines)


def frame_table(df: pd.DataFrame, digits: int = 4, raw: Collection[str] = ()) -> str:
    """A DataFrame as a Markdown table, floats with ``digits`` decimals except in the ``raw`` columns (settings
    such as a learning rate of 1e-05, which four decimals would show as 0.0000)."""
    def cell(column: str, v: Any) -> str:
        if v is None:
            return "n/a"
        return fmt(v, digits) if isinstance(v, (float, np.floating)) and column not in raw else str(v)
    columns = [str(c) for c in df.columns]
    return md_table(columns, [[cell(c, v) for c, v in zip(columns, row)] for row in df.itertuples(index=False)])


ENV.globals.update(md_table=md_table, frame_table=frame_table)


def render_section(template: str, context: dict[str, Any]) -> str:
    """One section's Markdown: ``template`` is a path under ``evaluate/templates/``."""
    return ENV.get_template(template).render(**context)


def render_markdown(title: str, sections: Iterable[tuple[str, dict[str, Any] | None]]) -> str:
    """``# title`` and the ``(template, context)`` sections, one blank line apart; a None context leaves the
    section out (e.g. the binary view of a run without positive classes)."""
    parts = [f"# {title}\n"]
    parts += ["\n" + render_section(t, ctx) for t, ctx in sections if ctx is not None]
    return "".join(parts)


def markdown_to_html(markdown: str, title: str, base: Path) -> str:
    """A self-contained HTML page of ``markdown``: images (paths relative to ``base``) become data URIs."""
    tokens = _MARKDOWN.parse(markdown)
    for token in tokens:
        for child in token.children or []:
            if child.type == "image":
                src = base / str(child.attrGet("src"))
                if src.is_file():
                    child.attrSet("src", data_uri(src))
                else:  # never point outside the file: say what is missing instead
                    child.type, child.content, child.children = "text", f"[figure not found: {src.name}]", None
    body = _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, {})
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f"<style>{CSS}</style></head><body>\n{body}</body></html>\n")


def write_report(folder: Path, stem: str, title: str, sections: Iterable[tuple[str, dict[str, Any] | None]]
                 ) -> Path:
    """Write ``<stem>.md`` and the self-contained ``<stem>.html`` in ``folder`` (atomically); return the HTML."""
    folder = Path(folder)
    markdown = render_markdown(title, sections)
    atomic_write_bytes(folder / f"{stem}.md", markdown.encode())
    out = folder / f"{stem}.html"
    atomic_write_bytes(out, markdown_to_html(markdown, title, folder).encode())
    return out

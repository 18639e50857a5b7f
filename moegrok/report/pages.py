"""HTML page parts shared by the sweep report and the study report: figures embedded as PNG
(and saved beside the page), tables, the page itself. Pages are self-contained (no external
requests)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import pandas as pd

from moegrok.store import write_bytes

STYLE = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;color:#222}"
         "table.t{border-collapse:collapse;font-size:12px}table.t td,table.t th{padding:2px 8px;"
         "border-bottom:1px solid #ddd;text-align:right}img{max-width:100%}pre{background:#f6f6f6;padding:1em}")


def png(fig, path: Path) -> str:
    """Save a matplotlib Figure to `path` and return it as an inline <img> (rendered once)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)  # figures lay themselves out (tight_layout)
    write_bytes(buffer.getvalue(), path)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def table(frame: pd.DataFrame, floatfmt: str = "{:.3g}") -> str:
    return frame.to_html(index=False, float_format=lambda x: floatfmt.format(x), na_rep="–", border=0,
                         classes="t", escape=True)


def page(title: str, parts: list[str], *, style: str = STYLE) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")

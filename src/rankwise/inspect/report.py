"""Text tables for the terminal and one self-contained HTML report.

The HTML file has no external assets: plots are embedded as base64 PNG data URIs, the CSS and
the few lines of JavaScript that sort the table on a header click are inline, so the report can
be mailed or opened from disk offline.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

# (key, header, format) of the per-matrix columns, in display order
WEIGHT_COLUMNS: list[tuple[str, str, str]] = [
    ("name", "matrix", "s"),
    ("shape", "shape", "shape"),
    ("erank", "erank", ".1f"),
    ("erank_energy", "erank(E)", ".1f"),
    ("stable_rank", "stable", ".2f"),
    ("energy90", "E90", "d"),
    ("energy99", "E99", "d"),
    ("alpha", "alpha", ".2f"),
    ("farms_alpha", "FARMS", ".2f"),
    ("welore", "WeLore", "s"),
]
QUICK_COLUMNS = WEIGHT_COLUMNS[:7]
UPDATE_COLUMNS: list[tuple[str, str, str]] = [
    ("name", "matrix", "s"),
    ("shape", "shape", "shape"),
    ("update_rank", "rank dW", "d"),
    ("update_erank", "erank dW", ".1f"),
    ("update_stable_rank", "stable dW", ".2f"),
    ("update_energy90", "E90 dW", "d"),
    ("update_energy99", "E99 dW", "d"),
    ("relative_update", "|dW|/|W0|", ".2e"),
]


def fmt(value: Any, spec: str) -> str:
    """One cell: '-' for missing / NaN, 'm x n' for shapes, else format(value, spec)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec == "shape":
        return "x".join(str(v) for v in value)
    if spec == "s":
        return str(value)
    return format(value, spec)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table (name column left-aligned, numbers right-aligned)."""
    cells = [[fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    heads = [h for _, h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]

    def line(values: Sequence[str]) -> str:
        parts = [v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))]
        return "  ".join(parts).rstrip()

    out = [line(heads), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    return "\n".join(out)


def format_grid(kinds: Sequence[str], table: Sequence[Sequence[Any]], spec: str = ".1f") -> str:
    """A layer x kind text grid (the `--quick` table)."""
    from rankwise.inspect.weights import short_kinds

    columns = [("layer", "layer", "d")] + [(k, h, spec) for k, h in zip(kinds, short_kinds(list(kinds)), strict=True)]
    rows = [dict(zip([c[0] for c in columns], r, strict=True)) for r in table]
    return format_table(rows, columns)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
.sub{color:#5b6475;font-size:13px;margin-bottom:16px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:10px 14px;min-width:150px}
.card .k{font-size:11px;color:#5b6475;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:20px;font-weight:600;margin-top:2px}
img{max-width:100%;background:#fff;border:1px solid #dde2ea;border-radius:6px;margin:6px 0}
table{border-collapse:collapse;font-size:12px;background:#fff;border:1px solid #dde2ea}
th,td{padding:3px 8px;border-bottom:1px solid #eef1f5;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left;font-family:ui-monospace,Menlo,monospace}
th{background:#eef1f5;cursor:pointer;position:sticky;top:0;user-select:none}
th:after{content:" \\2195";color:#9aa3b2;font-size:10px}
tr:hover td{background:#f5f8ff}
td.LRC{color:#0a7d32;font-weight:600} td.N-LRC{color:#8a8f98}
.note{font-size:12px;color:#5b6475;max-width:900px}
"""

_SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){
    th.addEventListener('click',function(){
      var body=t.tBodies[0],rows=Array.from(body.rows),asc=th.dataset.asc!=='1';
      rows.sort(function(a,b){
        var x=a.cells[i].dataset.v||a.cells[i].textContent,y=b.cells[i].dataset.v||b.cells[i].textContent;
        var nx=parseFloat(x),ny=parseFloat(y);
        var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);
        return asc?c:-c;});
      rows.forEach(function(r){body.appendChild(r);});
      t.querySelectorAll('th').forEach(function(h){h.dataset.asc='';});
      th.dataset.asc=asc?'1':'0';});});});
"""


def _html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in columns)
    body = []
    for r in rows:
        cells = []
        for k, _, spec in columns:
            v = r.get(k)
            sort_key = "" if not isinstance(v, int | float) or isinstance(v, bool) else f' data-v="{v}"'
            cls = f' class="{html.escape(str(v))}"' if k == "welore" and v else ""
            cells.append(f"<td{cls}{sort_key}>{html.escape(fmt(v, spec))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _img(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<h2>{html.escape(title)}</h2>\n<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'


def render_html(
    summary: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    images: Mapping[str, bytes],
    *,
    columns: Sequence[tuple[str, str, str]] = WEIGHT_COLUMNS,
    update_rows: Sequence[Mapping[str, Any]] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The whole report as one HTML string (summary cards, embedded plots, sortable tables)."""
    title = f"rankwise inspect: {summary.get('model', 'model')}"
    cards = "".join(
        f'<div class="card"><div class="k">{html.escape(str(k))}</div>'
        f'<div class="v">{html.escape(fmt(v, ".4g") if isinstance(v, float) else str(v))}</div></div>'
        for k, v in summary.items()
        if k != "model"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<div class="sub">Spectral diagnostics of every weight matrix; click a column header to sort.</div>',
        f'<div class="cards">{cards}</div>',
    ]
    parts += [_img(t, png) for t, png in images.items()]
    parts.append("<h2>Per-matrix metrics</h2>")
    parts.append(_html_table(rows, columns))
    if update_rows:
        parts.append("<h2>Update W1 - W0 per matrix</h2>")
        parts.append(_html_table(update_rows, UPDATE_COLUMNS))
    if notes:
        parts.append("<h2>Notes</h2>")
        parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    parts.append(f"<script>{_SORT_JS}</script></body></html>")
    return "\n".join(parts) + "\n"

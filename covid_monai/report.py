"""``report.html``: one self-contained page for a batch, built from its ``summary.json``.

The page holds a sortable table of every case (status, volumes, percentages, the severity score, warnings) with a
preview thumbnail per case, a plot of the involvement per case, and the failed cases with their reasons. Pictures
are embedded (PNG as data URIs) and the sorting is a few lines of inline JavaScript, so the one file can be mailed
or archived; nothing is fetched. It is written atomically, so a run killed while writing it leaves the last
complete report. ``covid-monai report OUTDIR`` rebuilds it from ``OUTDIR/summary.json`` at any time.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from covid_monai.io import atomic_write_text

__all__ = ["REPORT_COLUMNS", "render_report", "write_report"]

REPORT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("case", "case"),
    ("status", "status"),
    ("infection_ml", "infection mL"),
    ("ggo_ml", "ground glass mL"),
    ("consolidation_ml", "consolidation mL"),
    ("class_source", "classes from"),
    ("lung_ml", "lungs mL"),
    ("pct_left", "% left"),
    ("pct_right", "% right"),
    ("pct_lungs", "% lungs"),
    ("pct_zone_right_upper", "% R upper"),
    ("pct_zone_right_middle", "% R middle"),
    ("pct_zone_right_lower", "% R lower"),
    ("pct_zone_left_upper", "% L upper"),
    ("pct_zone_left_middle", "% L middle"),
    ("pct_zone_left_lower", "% L lower"),
    ("pct_lobe_rul", "% RUL"),
    ("pct_lobe_rml", "% RML"),
    ("pct_lobe_rll", "% RLL"),
    ("pct_lobe_lul", "% LUL"),
    ("pct_lobe_lll", "% LLL"),
    ("ct_severity_score", "CT score (0-25)"),
    ("lesions", "lesions"),
    ("warnings", "warnings"),
)
"""Summary keys shown in the table, with their headings (after the preview column)."""

_THUMB_HEIGHT = 72
_PLOT_LABELLED_CASES = 60  # case names under the bars up to this many cases

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
.meta { color: #555; } .note { color: #555; font-size: 12px; }
.wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; vertical-align: middle; }
th { background: #eef1f5; cursor: pointer; user-select: none; white-space: nowrap; position: sticky; top: 0; }
th[aria-sort=ascending]::after { content: " \\25B2"; } th[aria-sort=descending]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.warn { max-width: 28em; color: #8a5a00; }
tr.failed td { background: #fdecea; } tr.skipped td { color: #555; }
img.thumb { display: block; }
img.plot { max-width: 100%; border: 1px solid #ddd; }
"""

_SCRIPT = """
(function () {
  var table = document.getElementById('cases');
  var heads = table.tHead.rows[0].cells;
  function key(row, col) {
    var cell = row.cells[col], v = cell.getAttribute('data-v');
    if (v === null) { return cell.textContent.toLowerCase(); }
    return v === '' ? null : parseFloat(v);
  }
  function sortBy(col, descending) {
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a, col), y = key(b, col);
      if (x === y) { return 0; }
      if (x === null) { return 1; }
      if (y === null) { return -1; }
      return (x < y ? -1 : 1) * (descending ? -1 : 1);
    });
    rows.forEach(function (r) { body.appendChild(r); });
    for (var i = 0; i < heads.length; i++) { heads[i].removeAttribute('aria-sort'); }
    heads[col].setAttribute('aria-sort', descending ? 'descending' : 'ascending');
  }
  Array.prototype.forEach.call(heads, function (th, col) {
    if (th.getAttribute('data-key') === null) { return; }
    th.addEventListener('click', function () {
      sortBy(col, th.getAttribute('aria-sort') === 'ascending');
    });
  });
  var wanted = /sort=(-?)([a-z_]+)/.exec(window.location.hash);
  if (wanted) {
    Array.prototype.forEach.call(heads, function (th, col) {
      if (th.getAttribute('data-key') === wanted[2]) { sortBy(col, wanted[1] === '-'); }
    });
  }
})();
"""


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _axial_panels(image: Any) -> Any:
    """The preview without its last (coronal) panel: panels are separated by 4-pixel black columns."""
    import numpy as np

    pixels = np.asarray(image)
    black = ~pixels.reshape(pixels.shape[0], pixels.shape[1], -1).any(axis=(0, 2))
    starts = [x for x in range(1, len(black) - 3) if black[x : x + 4].all() and not black[x - 1]]
    return image.crop((0, 0, starts[-1], image.height)) if starts else image


def _thumbnail(path: Path) -> str | None:
    """The preview's axial panels shrunk to the table's row height, as a data URI (``None`` without a preview)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = _axial_panels(image.convert("RGB"))
            width = max(1, round(image.width * _THUMB_HEIGHT / max(image.height, 1)))
            small = image.resize((width, _THUMB_HEIGHT), Image.LANCZOS)
    except (OSError, ValueError):
        return None
    buffer = io.BytesIO()
    small.save(buffer, format="PNG", optimize=True)
    return _png_data_uri(buffer.getvalue())


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _involvement_plot(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Bars of % of each lung involved per case (cases with numbers), as a PNG data URI."""
    from matplotlib.figure import Figure

    cases = [r for r in rows if _number(r.get("pct_lungs")) is not None]
    if not cases:
        return None
    n = len(cases)
    figure = Figure(figsize=(min(max(4.0, 0.35 * n + 1.5), 16.0), 3.6), dpi=100)
    axes = figure.add_subplot()
    positions = list(range(n))
    width = 0.4
    for offset, key, label, color in ((-width / 2, "pct_right", "right lung", "#d9822b"),
                                      (width / 2, "pct_left", "left lung", "#2b7bd9")):
        values = [_number(r.get(key)) or 0.0 for r in cases]
        axes.bar([p + offset for p in positions], values, width, label=label, color=color)
    axes.plot(positions, [_number(r["pct_lungs"]) for r in cases], "k_", markersize=12, label="both lungs")
    axes.set_ylabel("% of lung infected")
    axes.set_xlim(-0.6, n - 0.4)
    axes.set_ylim(0, max(5.0, max(_number(r.get(k)) or 0.0 for r in cases for k in ("pct_left", "pct_right")) * 1.1))
    if n <= _PLOT_LABELLED_CASES:
        axes.set_xticks(positions, [str(r.get("case", "")) for r in cases], rotation=60, ha="right", fontsize=7)
    else:
        axes.set_xlabel(f"{n} cases, in the table's order")
        axes.set_xticks([])
    axes.legend(fontsize=8, loc="upper right")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return _png_data_uri(buffer.getvalue())


def _cell(key: str, value: Any) -> str:
    if key in ("case", "status", "class_source", "warnings"):
        css = ' class="warn"' if key == "warnings" else ""
        return f"<td{css}>{html.escape(str(value or ''))}</td>"
    number = _number(value)
    if number is None:
        return '<td class="num" data-v="">&ndash;</td>'
    shown = f"{int(number)}" if key in ("lesions", "ct_severity_score") else f"{number:.2f}"
    return f'<td class="num" data-v="{number!r}">{shown}</td>'


def render_report(document: Mapping[str, Any], out_dir: str | os.PathLike) -> str:
    """The report page for a summary document (what ``write_summary`` writes to ``summary.json``).

    Args:
        document: ``{"cases": [rows], "counts": ..., "bundle": ..., ...}``.
        out_dir: the output folder, where the ``<case>_preview.png`` thumbnails are found.

    Returns:
        The HTML text.

    Example:
        >>> page = render_report(json.loads(Path("masks/summary.json").read_text()), "masks")
    """
    out = Path(out_dir)
    rows = list(document.get("cases", []))
    counts = document.get("counts") or {s: sum(r.get("status") == s for r in rows) for s in ("ok", "skipped", "failed")}
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>covid-monai report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>COVID-19 lung infection: batch report</h1>",
        f'<p class="meta">{len(rows)} cases: {counts.get("ok", 0)} segmented, {counts.get("skipped", 0)} skipped '
        f'(done before), {counts.get("failed", 0)} failed &middot; bundle {html.escape(str(document.get("bundle")))} '
        f'&middot; device {html.escape(str(document.get("device", "")))} &middot; built {stamp}</p>',
        '<p class="note">Research software; not a medical device. Percentages: infected voxels of each lung, zone '
        "(thirds of each lung's head-foot extent) or lobe over its voxels. CT score: Pan et al., Radiology 2020, "
        "0-5 per lobe.</p>",
    ]
    plot = _involvement_plot(rows)
    parts.append("<h2>Involvement per case</h2>")
    parts.append(f'<img class="plot" alt="% of each lung infected per case" src="{plot}">' if plot
                 else "<p>No case with lung percentages.</p>")
    parts.append('<h2>Cases</h2><p class="note">Click a heading to sort.</p><div class="wrap">')
    parts.append('<table id="cases"><thead><tr><th>preview</th>')
    parts += [f'<th data-key="{key}">{html.escape(title)}</th>' for key, title in REPORT_COLUMNS]
    parts.append("</tr></thead><tbody>")
    for row in rows:
        status = html.escape(str(row.get("status", "")))
        thumb = _thumbnail(out / f"{row.get('case', '')}_preview.png") if status != "failed" else None
        image = f'<img class="thumb" alt="preview" height="{_THUMB_HEIGHT}" src="{thumb}">' if thumb else ""
        cells = "".join(_cell(key, row.get(key)) for key, _ in REPORT_COLUMNS)
        parts.append(f'<tr class="{status}"><td>{image}</td>{cells}</tr>')
    parts.append("</tbody></table></div>")
    failed = [r for r in rows if r.get("status") == "failed"]
    parts.append(f"<h2>Failed cases ({len(failed)})</h2>")
    if failed:
        parts.append('<table id="failed"><thead><tr><th>case</th><th>input</th><th>reason</th></tr></thead><tbody>')
        parts += [f"<tr><td>{html.escape(str(r.get('case', '')))}</td><td>{html.escape(str(r.get('input', '')))}</td>"
                  f"<td>{html.escape(str(r.get('error', '')))}</td></tr>" for r in failed]
        parts.append("</tbody></table>")
    else:
        parts.append("<p>None.</p>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>\n")
    return "\n".join(parts)


def write_report(out_dir: str | os.PathLike, summary: str = "summary") -> Path:
    """Build ``out_dir/report.html`` from ``out_dir/<summary>.json``, atomically.

    Args:
        out_dir: an output folder of ``covid-monai infer``.
        summary: the summary's name (``summary`` for ``summary.json``).

    Returns:
        The report's path.

    Raises:
        FileNotFoundError: there is no summary to report on.
        ValueError: the summary is not readable JSON.

    Example:
        >>> write_report("masks/")  # masks/report.html
    """
    out = Path(out_dir)
    path = out / f"{summary}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no summary to report on (run covid-monai infer into {out} first)")
    try:
        document = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not a readable summary ({exc})") from exc
    report = out / "report.html"
    atomic_write_text(report, render_report(document, out))
    return report

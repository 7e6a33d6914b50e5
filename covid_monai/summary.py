"""The batch summary: one row per case in ``summary.csv`` and ``summary.json``, read back for re-runs.

The columns (:data:`SUMMARY_FIELDS`) and both file formats are what users script against: ``summary.csv`` has a
header line and one row per case (empty cells for missing numbers), ``summary.json`` holds the run information
(bundle, device, knobs...), ``counts`` by status and the same rows under ``cases``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from covid_monai.io import atomic_write_text

__all__ = ["SUMMARY_FIELDS", "CaseResult", "read_summary", "write_summary"]

SUMMARY_FIELDS = (
    "case",
    "input",
    "status",
    "error",
    "warnings",
    "shape",
    "spacing",
    "study_uid",
    "series_uid",
    "series_description",
    "slice_thickness",
    "infection_ml",
    "lung_left_ml",
    "lung_right_ml",
    "lung_ml",
    "pct_left",
    "pct_right",
    "pct_lungs",
    "lesions",
    "ggo_ml",
    "consolidation_ml",
    "class_source",
    "pct_zone_right_upper",
    "pct_zone_right_middle",
    "pct_zone_right_lower",
    "pct_zone_left_upper",
    "pct_zone_left_middle",
    "pct_zone_left_lower",
    "pct_lobe_lul",
    "pct_lobe_lll",
    "pct_lobe_rul",
    "pct_lobe_rml",
    "pct_lobe_rll",
    "ct_severity_score",
    "seconds",
)
"""The columns of ``summary.csv`` and the keys of each row of ``summary.json``, in order."""

_STATUSES = ("ok", "skipped", "failed")


@dataclass
class CaseResult:
    """A summary row: what happened to one case and its numbers."""

    case: str
    input: str
    status: str
    error: str = ""
    warnings: str = ""
    shape: str = ""
    spacing: str = ""
    study_uid: str = ""
    series_uid: str = ""
    series_description: str = ""
    slice_thickness: float | None = None
    infection_ml: float | None = None
    lung_left_ml: float | None = None
    lung_right_ml: float | None = None
    lung_ml: float | None = None
    pct_left: float | None = None
    pct_right: float | None = None
    pct_lungs: float | None = None
    lesions: int | None = None
    ggo_ml: float | None = None
    consolidation_ml: float | None = None
    class_source: str = ""
    pct_zone_right_upper: float | None = None
    pct_zone_right_middle: float | None = None
    pct_zone_right_lower: float | None = None
    pct_zone_left_upper: float | None = None
    pct_zone_left_middle: float | None = None
    pct_zone_left_lower: float | None = None
    pct_lobe_lul: float | None = None
    pct_lobe_lll: float | None = None
    pct_lobe_rul: float | None = None
    pct_lobe_rml: float | None = None
    pct_lobe_rll: float | None = None
    ct_severity_score: int | None = None
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def row(self) -> dict[str, Any]:
        """The summary fields as a plain dict (for CSV and JSON)."""
        values = asdict(self)
        return {key: values[key] for key in SUMMARY_FIELDS}


def read_summary(out_dir: str | os.PathLike, name: str = "summary") -> list[CaseResult]:
    """Results of an earlier run from ``out_dir/<name>.json`` (empty when there is none or it is unreadable).

    Args:
        out_dir: an output folder of ``covid-monai infer``.
        name: the file stem (``summary``, or ``summary.shard<rank>`` in a sharded run).

    Returns:
        One result per row, in the file's order.

    Example:
        >>> [r.case for r in read_summary("masks/")]
        ['case_a', 'case_b']
    """
    path = Path(out_dir) / f"{name}.json"
    try:
        rows = json.loads(path.read_text())["cases"]
        return [CaseResult(**{k: row.get(k) for k in SUMMARY_FIELDS}) for row in rows]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def write_summary(
    out_dir: str | os.PathLike, results: Sequence[CaseResult], meta: Mapping[str, Any], name: str = "summary"
) -> None:
    """Write ``<name>.csv`` and ``<name>.json`` atomically (one row per case; the JSON adds run information).

    Args:
        out_dir: the output folder (must exist).
        results: the rows, in the order to write them.
        meta: run information put first in the JSON document (bundle, device, knobs...).
        name: the file stem.

    Example:
        >>> write_summary("masks/", [CaseResult("case_a", "/scans/case_a.nii.gz", "ok")], {"device": "cpu"})
    """
    rows = [r.row() for r in results]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    atomic_write_text(Path(out_dir) / f"{name}.csv", buffer.getvalue())
    counts = {s: sum(r["status"] == s for r in rows) for s in _STATUSES}
    document = {**meta, "counts": counts, "cases": rows}
    atomic_write_text(Path(out_dir) / f"{name}.json", json.dumps(document, indent=2) + "\n")

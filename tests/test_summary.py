"""summary.csv and summary.json: the columns and the formats users script against, and reading them back."""

from __future__ import annotations

import csv
import json

import covid_monai.inference
from covid_monai.summary import SUMMARY_FIELDS, CaseResult, read_summary, write_summary

COLUMNS = (
    "case,input,status,error,warnings,shape,spacing,study_uid,series_uid,series_description,slice_thickness,"
    "infection_ml,lung_left_ml,lung_right_ml,lung_ml,pct_left,pct_right,pct_lungs,lesions,ggo_ml,consolidation_ml,"
    "class_source,pct_zone_right_upper,pct_zone_right_middle,pct_zone_right_lower,pct_zone_left_upper,"
    "pct_zone_left_middle,pct_zone_left_lower,pct_lobe_lul,pct_lobe_lll,pct_lobe_rul,pct_lobe_rml,pct_lobe_rll,"
    "ct_severity_score,seconds"
)


def _rows() -> list[CaseResult]:
    ok = CaseResult("case_a", "/scans/case_a.nii.gz", "ok", warnings="lobe mask has no RML voxels: scored 0",
                    shape="64x64x16", spacing="1x1x2", infection_ml=12.5, lung_ml=3000.0, pct_lungs=0.4167, lesions=3,
                    ct_severity_score=5, seconds=1.25)
    ok.extra["trace"] = "not written"
    failed = CaseResult("case_b", "/scans/case b, \"quoted\".nii.gz", "failed", "case_b: file ends before the data")
    return [ok, CaseResult("case_c", "/scans/case_c", "skipped", slice_thickness=1.5), failed]


def test_columns_are_fixed():
    assert ",".join(SUMMARY_FIELDS) == COLUMNS
    assert list(CaseResult("c", "i", "ok").row()) == list(SUMMARY_FIELDS)
    # the batch runner writes and re-exports the same summary
    assert covid_monai.inference.SUMMARY_FIELDS is SUMMARY_FIELDS and covid_monai.inference.CaseResult is CaseResult


def test_csv_format(tmp_path):
    write_summary(tmp_path, _rows(), {"bundle": "/bundles/demo"})
    text = (tmp_path / "summary.csv").read_text()
    lines = text.split("\n")
    assert lines[0] == COLUMNS and lines[-1] == "" and len(lines) == 5  # "\n" line ends, the last line ended too
    assert "\r" not in text
    assert lines[1].startswith("case_a,/scans/case_a.nii.gz,ok,,lobe mask has no RML voxels: scored 0,64x64x16,")
    assert lines[1].endswith(",5,1.25") and ",,,,,,," in lines[1]  # missing numbers are empty cells
    rows = list(csv.DictReader(text.splitlines()))
    assert [r["case"] for r in rows] == ["case_a", "case_c", "case_b"]
    assert rows[2]["input"] == "/scans/case b, \"quoted\".nii.gz" and rows[1]["slice_thickness"] == "1.5"
    assert rows[0]["infection_ml"] == "12.5" and rows[0]["lesions"] == "3" and rows[0]["ggo_ml"] == ""


def test_json_format_and_read_back(tmp_path):
    write_summary(tmp_path, _rows(), {"bundle": "/bundles/demo", "device": "cpu", "knobs": {"threshold": 0.4}})
    text = (tmp_path / "summary.json").read_text()
    document = json.loads(text)
    assert text.endswith("}\n") and text.startswith('{\n  "bundle": "/bundles/demo",\n')  # indent 2
    assert list(document) == ["bundle", "device", "knobs", "counts", "cases"]
    assert document["counts"] == {"ok": 1, "skipped": 1, "failed": 1}
    assert [list(row) for row in document["cases"]] == [list(SUMMARY_FIELDS)] * 3
    assert document["cases"][0]["ggo_ml"] is None and document["cases"][0]["lesions"] == 3
    back = read_summary(tmp_path)
    assert [r.row() for r in back] == [r.row() for r in _rows()]
    assert all(r.extra == {} for r in back)


def test_named_summaries_and_unreadable_ones(tmp_path):
    write_summary(tmp_path, _rows()[:1], {}, "summary.shard1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.shard1.csv", "summary.shard1.json"]
    assert [r.case for r in read_summary(tmp_path, "summary.shard1")] == ["case_a"]
    assert read_summary(tmp_path) == []  # none there
    (tmp_path / "summary.json").write_text("{not json")
    assert read_summary(tmp_path) == []
    (tmp_path / "summary.json").write_text('{"cases": 3}')
    assert read_summary(tmp_path) == []

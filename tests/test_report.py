"""report.html: built from summary.json, self-contained, parsed back, rendered in headless Chromium, atomic."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_monai import report
from covid_monai.cli import main
from covid_monai.inference import SUMMARY_FIELDS, CaseResult, write_summary
from covid_monai.report import REPORT_COLUMNS, write_report

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


class _Tables(HTMLParser):
    """Every table of a page as lists of cell texts (and each cell's data-v), plus the img sources and scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self.heads: dict[str, list[tuple[str | None, str | None]]] = {}
        self.images: list[str] = []
        self.links: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._value: str | None = None
        self._in_head = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id", "")
            self.tables[self._table], self.heads[self._table] = [], []
        elif tag == "thead":
            self._in_head = True
        elif tag == "tbody":
            self._in_head = False
        elif tag == "tr" and self._table is not None and not self._in_head:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell, self._value = [], attrs.get("data-v")
            if tag == "th":
                self.heads[self._table].append((attrs.get("data-key"), attrs.get("aria-sort")))
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in ("a", "link", "script") and (attrs.get("href") or attrs.get("src")):
            self.links.append(attrs.get("href") or attrs.get("src"))

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append(("".join(self._cell).strip(), self._value))
            self._cell = None
        elif tag == "th":
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> _Tables:
    parser = _Tables()
    parser.feed(text)
    return parser


def _batch(folder: Path) -> list[CaseResult]:
    """A summary like a real run's: three segmented cases (one with lobes), one skipped, one failed; previews."""
    rows = []
    rng = np.random.default_rng(0)
    for k, pct in enumerate((12.5, 3.25, 47.0)):
        row = CaseResult(f"case_{k}", f"/scans/case_{k}.nii.gz", "ok", shape="64x64x16", spacing="1x1x2")
        row.infection_ml, row.lung_ml, row.lesions = 100.0 * pct, 4000.0, k + 1
        row.ggo_ml, row.consolidation_ml, row.class_source = 60.0 * pct, 40.0 * pct, "hu"
        row.pct_left, row.pct_right, row.pct_lungs = pct * 0.8, pct * 1.2, pct
        for zone in ("upper", "middle", "lower"):
            row.pct_zone_right_upper = pct / 2
            setattr(row, f"pct_zone_left_{zone}", pct)
        if k == 0:
            for name in ("lul", "lll", "rul", "rml", "rll"):
                setattr(row, f"pct_lobe_{name}", 30.0)
            row.ct_severity_score = 15
        row.warnings = "intensities <not> HU" if k == 1 else ""
        rows.append(row)
        picture = rng.integers(40, 255, size=(256, 800, 3), dtype=np.uint8)
        picture[:, 500:504] = 0  # the gap before the coronal panel
        Image.fromarray(picture).save(folder / f"case_{k}_preview.png")
    rows.append(CaseResult("old", "/scans/old.nii.gz", "skipped", infection_ml=1.0, pct_lungs=0.5))
    rows.append(CaseResult("broken", "/scans/broken.nii.gz", "failed", "broken.nii.gz: file ends before the data"))
    write_summary(folder, rows, {"bundle": "/bundles/demo", "device": "cpu", "knobs": {}})
    return rows


def test_report_lists_every_case_with_its_numbers(tmp_path):
    rows = _batch(tmp_path)
    path = write_report(tmp_path)
    text = path.read_text()
    page = _parse(text)
    table = page.tables["cases"]
    assert len(table) == len(rows)
    keys = [key for key, _ in page.heads["cases"]]
    assert keys == [None] + [key for key, _ in REPORT_COLUMNS]
    summary = json.loads((tmp_path / "summary.json").read_text())["cases"]
    for cells, row in zip(table, summary, strict=True):
        shown = dict(zip(keys[1:], cells[1:], strict=True))
        assert shown["case"][0] == row["case"] and shown["status"][0] == row["status"]
        assert shown["warnings"][0] == row["warnings"]  # escaped in the page, plain text once parsed
        for key, _ in REPORT_COLUMNS:
            if key in ("case", "status", "class_source", "warnings"):
                continue
            value = row[key]
            assert (shown[key][1] == "") if value is None else float(shown[key][1]) == pytest.approx(value), key
    assert "&lt;not&gt;" in text
    failed = page.tables["failed"]
    assert [[c for c, _ in r] for r in failed] == [["broken", "/scans/broken.nii.gz",
                                                    "broken.nii.gz: file ends before the data"]]
    # self-contained: three thumbnails and the plot embedded, nothing fetched
    assert len(page.images) == 4 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert page.links == [] and "http://" not in text and "https://" not in text
    assert set(SUMMARY_FIELDS) >= {key for key, _ in REPORT_COLUMNS}


def test_report_is_written_atomically(tmp_path, monkeypatch):
    _batch(tmp_path)
    write_report(tmp_path)
    before = (tmp_path / "report.html").read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("killed while rendering")

    monkeypatch.setattr(report, "render_report", broken)
    with pytest.raises(RuntimeError):
        write_report(tmp_path)
    assert (tmp_path / "report.html").read_text() == before  # the last complete report stays
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_report_command_rebuilds_from_the_summary(tmp_path, capsys):
    _batch(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").is_file() and "report.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    (tmp_path / "summary.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 1


def test_infer_with_report_flag(tmp_path, random_bundle, phantoms):
    image = sorted((phantoms / "images").glob("*.nii.gz"))[0]
    assert main(["infer", str(image), "-o", str(tmp_path / "out"), "--bundle", str(random_bundle), "--report",
                 "--device", "cpu", "--quiet"]) == 0
    page = _parse((tmp_path / "out" / "report.html").read_text())
    assert [cells[1][0] for cells in page.tables["cases"]] == [image.name.removesuffix(".nii.gz")]
    assert (tmp_path / "out" / f"{image.name.removesuffix('.nii.gz')}_preview.png").is_file()  # implied --preview


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    return found


def _browser(chromium: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="covid_monai_chromium_") as profile:
        return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, encoding="utf-8", errors="replace", timeout=120)


def test_report_renders_and_sorts_in_headless_chromium(tmp_path):
    chromium = _chromium()
    _batch(tmp_path)
    url = (tmp_path / write_report(tmp_path).name).as_uri()
    # the page's script sorts on load when the address asks for it (#sort=-key: descending)
    dom = _browser(chromium, "--virtual-time-budget=3000", "--dump-dom", f"{url}#sort=-pct_lungs")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _parse(dom.stdout)
    keys = [key for key, _ in page.heads["cases"]]
    column = keys.index("pct_lungs")
    values = [cells[column][1] for cells in page.tables["cases"]]
    assert [float(v) for v in values if v] == [47.0, 12.5, 3.25, 0.5] and values[-1] == ""  # no number: last
    assert dict(page.heads["cases"])["pct_lungs"] == "descending"
    ascending = _parse(_browser(chromium, "--virtual-time-budget=3000", "--dump-dom", f"{url}#sort=case").stdout)
    assert [cells[1][0] for cells in ascending.tables["cases"]] == sorted(["case_0", "case_1", "case_2", "old",
                                                                           "broken"])
    shot = tmp_path / "shot.png"
    done = _browser(chromium, "--window-size=1280,900", "--hide-scrollbars", f"--screenshot={shot}", url)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as picture:
        assert picture.size == (1280, 900)
        grey = np.asarray(picture.convert("L"))
    assert grey.min() < 60 and grey.max() > 200 and grey.std() > 10  # text, thumbnails and plot drawn, not blank

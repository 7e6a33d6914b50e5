"""Batch inference over many scans: discovery, the model loaded once, streaming, a summary.

The whole run of a scan comes from the bundle's ``inference.json`` through :mod:`covid_monai.bundle`: the
pre-processing, the ready network (weights-only checkpoint, precision, frozen on CPUs), the inferer and the
post-processing, which ends by writing the mask (and the probability map and lungs when asked) like the source,
atomically. This module finds the cases, feeds them to it, adds the per-case numbers and the extra outputs
(preview, 3D Slicer and DICOM segmentations), and keeps the books: failures, finished cases, the summary.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data.utils import affine_to_spacing
from monai.utils import set_determinism

from covid_monai.bundle import load_config, resolve_device
from covid_monai.errors import one_line
from covid_monai.io import (
    DicomListing,
    atomic_write_text,
    check_output_folder,
    extract_zip_members,
    is_nifti,
    is_zip,
    list_dicom_folder,
    list_dicom_zip,
    nifti_stem,
)
from covid_monai.lobes import read_lobes
from covid_monai.preflight import DEFAULT_MAX_VOXELS, check_scan
from covid_monai.preview import save_preview, slicer_color_tables
from covid_monai.quantify import LOBE_FIELDS, LOBE_LABELS, ZONE_FIELDS, quantify_case
from covid_monai.segexport import segments_for, write_dicom_seg, write_seg_nrrd
from covid_monai.summary import SUMMARY_FIELDS, CaseResult, read_summary, write_summary

__all__ = [
    "SUMMARY_FIELDS",
    "BatchSegmenter",
    "Case",
    "CaseResult",
    "discover_cases",
    "output_paths",
]

logger = logging.getLogger("covid_monai.inference")

@dataclass
class Case:
    """One scan to segment.

    Attributes:
        name: output stem, unique within a run and safe as a file name.
        source: the NIfTI file, the DICOM folder or the zip file it came from.
        kind: ``"nifti"`` or ``"dicom"``.
        files: the DICOM files of the series (paths; member names for a zip file), else ``None``.
        notes: warnings found at discovery (files left out of the series and why).
        unreadable: ``(file, reason)`` for unreadable files beside the series (named if slices are missing).
        facts: DICOM summary columns (``study_uid``, ``series_uid``, ``series_description``, ``slice_thickness``).
    """

    name: str
    source: Path
    kind: str
    files: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


def _safe_name(name: str) -> str:
    """File-name-safe case name: no separators, no leading dots, only ``[A-Za-z0-9._-]``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"
    return name[:120]


def discover_cases(inputs: Iterable[str | os.PathLike]) -> tuple[list[Case], list[CaseResult]]:
    """Turn input paths into cases: NIfTI files, folders searched recursively, DICOM series, zip files of a series.

    A folder holding one DICOM series gives one case named after the folder; several series give one case per
    series, named after the folder plus the series description or number. A zip file (an input, or found in a
    folder) is read like a folder, all its folders together, and names its cases; nothing is extracted beside it.
    Localizers (scouts) are not segmented: each localizer series gets a ``skipped`` result with the reason in
    ``warnings``. DICOMDIR, SEG, RTSTRUCT and secondary-capture files are ignored; files that are not readable DICOM
    are named in their series' warnings (or in its error, when slices are missing). Names are made file-name safe
    and unique (``name``, ``name_2``, ...), so two inputs never write the same output.

    Args:
        inputs: files, folders and zip files, in the order given.

    Returns:
        ``(cases, results)``: the cases found, and the results decided at discovery: a failed result for each input
        that does not exist or holds nothing to segment, a skipped result for each localizer series.

    Example:
        >>> cases, results = discover_cases(["scans/", "extra/case_7.nii.gz", "extra/series.zip"])
    """
    found: list[tuple[Case, str, str]] = []
    failures: list[CaseResult] = []
    seen_sources: set[tuple[str, str]] = set()
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            failures.append(CaseResult(_safe_name(nifti_stem(path)), str(path), "failed", "no such file or folder"))
            continue
        if path.is_file() and is_zip(path):
            entries = _zip_cases(path, required=True)
        elif path.is_file():
            entries = [(Case(nifti_stem(path), path, "nifti"), "", "")]
        else:
            entries = _scan_folder(path)
            if not entries:
                failures.append(
                    CaseResult(_safe_name(path.name), str(path), "failed", "no NIfTI file or DICOM series in folder")
                )
        for entry in entries:
            case = entry[0]
            key = (str(case.source.resolve()), case.files[0] if case.files else "")
            if key not in seen_sources:
                seen_sources.add(key)
                found.append(entry)
    cases: list[Case] = []
    decided = list(failures)
    used: set[str] = {f.case.lower() for f in failures}
    for case, skip, error in found:
        base = _safe_name(case.name)
        name, k = base, 1
        while name.lower() in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name.lower())
        case.name = name
        if error:
            decided.append(CaseResult(name, str(case.source), "failed", error))
        elif skip:
            decided.append(_with_facts(CaseResult(name, str(case.source), "skipped", warnings=skip), case))
        else:
            cases.append(case)
    return cases, decided


def _scan_folder(folder: Path) -> list[tuple[Case, str, str]]:
    """Cases in a folder tree, as ``(case, reason to skip it, error)``: NIfTI files, DICOM series, zip files."""
    entries: list[tuple[Case, str, str]] = []
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        here = Path(directory)
        others = []
        for name in sorted(files):
            if name.startswith("."):
                continue
            if is_nifti(name):
                entries.append((Case(nifti_stem(name), here / name, "nifti"), "", ""))
            elif is_zip(name):
                entries += _zip_cases(here / name, required=False)
            else:
                others.append(name)
        if others:
            entries += _dicom_cases(list_dicom_folder(here, others), here, here.name)
    return entries


def _zip_cases(path: Path, required: bool) -> list[tuple[Case, str, str]]:
    """The DICOM cases of a zip file; a failed entry when it is unreadable, or holds no series and was asked for."""
    stem = path.name[: -len(".zip")]
    try:
        entries = _dicom_cases(list_dicom_zip(path), path, stem)
    except ValueError as exc:
        return [(Case(stem, path, "dicom"), "", one_line(exc))]
    if not entries and required:
        return [(Case(stem, path, "dicom"), "", "no DICOM series in the zip file")]
    return entries


def _dicom_cases(listing: DicomListing, source: Path, stem: str) -> list[tuple[Case, str, str]]:
    """One case per DICOM series of a folder or zip file; localizer series come with the reason they are skipped."""
    volumes = listing.volumes
    stray = [f"{Path(name).name} ({why})" for name, why in listing.unreadable]
    for name, what in listing.ignored:
        logger.debug("%s: ignored, %s", name, what)
    entries = []
    for series in listing.series:
        notes = list(series.notes)
        if stray:
            notes.append(f"ignored {len(stray)} unreadable file(s) beside the series: {', '.join(stray[:3])}"
                         + (f" and {len(stray) - 3} more" if len(stray) > 3 else ""))
        name = stem if len(volumes) == 1 and not series.localizer else f"{stem}_{series.label}"
        case = Case(name, source, "dicom", series.files, notes, list(listing.unreadable), dict(series.facts))
        skip = ""
        if series.localizer:
            skip = f"localizer (scout) series, Image Type LOCALIZER: {len(series.files)} image(s), not a CT volume"
        entries.append((case, skip, ""))
    return entries


def _with_facts(result: CaseResult, case: Case) -> CaseResult:
    """``result`` with the case's DICOM summary columns filled in."""
    for key, value in case.facts.items():
        setattr(result, key, value)
    return result


def output_paths(out_dir: str | os.PathLike, case: str) -> dict[str, Path]:
    """The files a case may produce in ``out_dir``, by kind."""
    out = Path(out_dir)
    return {
        "infection": out / f"{case}_infection.nii.gz",
        "probability": out / f"{case}_probability.nii.gz",
        "lungs": out / f"{case}_lungs.nii.gz",
        "preview": out / f"{case}_preview.png",
        "seg_nrrd": out / f"{case}_infection.seg.nrrd",
        "dicom_seg": out / f"{case}_infection.seg.dcm",
    }


class _CaseDataset(torch.utils.data.Dataset):
    """Runs the bundle's pre-processing per case in DataLoader workers; errors become data, not exceptions."""

    def __init__(
        self, cases: Sequence[Case], preprocessing: Callable, debug: bool = False, max_voxels: int = DEFAULT_MAX_VOXELS
    ) -> None:
        self.cases = list(cases)
        self.preprocessing = preprocessing
        self.debug = debug
        self.max_voxels = max_voxels

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        with tempfile.TemporaryDirectory(prefix="covid_monai_series_") as series_dir:
            source, files, shown = str(case.source), case.files, {}
            try:
                if case.files and is_zip(case.source):  # extracted here, for this case only, then removed
                    extracted = extract_zip_members(case.source, case.files, series_dir)
                    files = [str(p) for p in extracted]
                    shown = {f: f"{case.source}/{m}" for f, m in zip(files, case.files, strict=True)}
                    source = series_dir
                elif case.files:  # give ITK a folder with just this series' files, none of their neighbours
                    for i, f in enumerate(case.files):
                        os.symlink(f, os.path.join(series_dir, f"{i:05d}_{Path(f).name}"))
                    source = series_dir
                notes = case.notes + check_scan(case.source, case.kind, files, self.max_voxels, case.unreadable)
                data = self.preprocessing({"image": source, "name": case.name, "warnings": notes})
            except Exception as exc:  # noqa: BLE001 - one bad scan must not stop the batch
                message = one_line(exc, limit=600)
                for extracted_name, member in shown.items():
                    message = message.replace(extracted_name, member)
                return {"case": case, "error": message, "trace": traceback.format_exc() if self.debug else ""}
        return {"case": case, "data": data}


class BatchSegmenter:
    """Segment many scans with one model load.

    Args:
        bundle_dir: a trained bundle folder (``configs/`` and ``models/model.pt``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        overrides: bundle config overrides (knobs such as ``threshold`` or ``min_lesion_ml``).
        num_workers: DataLoader workers reading and pre-processing the next scans while the network runs.
        save_probabilities: also write ``<case>_probability.nii.gz`` (float32).
        save_lungs: also write ``<case>_lungs.nii.gz`` (1 left, 2 right).
        save_preview: also write ``<case>_preview.png`` (axial and coronal slices with the infection overlaid).
        lobes_dir: lobe masks per case (:mod:`covid_monai.lobes`) for the lobe columns and the CT severity score.
        save_seg_nrrd: also write ``<case>_infection.seg.nrrd`` (3D Slicer segmentation).
        save_dicom_seg: also write ``<case>_infection.seg.dcm`` (DICOM Segmentation) for DICOM inputs.

    Example:
        >>> segmenter = BatchSegmenter("demo_output/bundle", device="cpu")
        >>> results = segmenter.run(cases, "masks/")
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        device: str = "auto",
        overrides: Mapping[str, Any] | None = None,
        num_workers: int = 1,
        save_probabilities: bool = False,
        save_lungs: bool = False,
        save_preview: bool = False,
        lobes_dir: str | os.PathLike | None = None,
        save_seg_nrrd: bool = False,
        save_dicom_seg: bool = False,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.lobes_dir = None if lobes_dir is None else Path(lobes_dir)
        self.save_seg_nrrd = save_seg_nrrd
        self.save_dicom_seg = save_dicom_seg
        self.save_probabilities = save_probabilities
        self.save_lungs = save_lungs
        self.save_preview = save_preview
        self.device = resolve_device(device)
        self.num_workers = num_workers
        self.parser = load_config(self.bundle_dir, ["inference.json"])
        if "save_probabilities" not in self.parser:
            raise ValueError(
                f"{self.bundle_dir}: its inference.json is an older layout (the network and the writing decided in "
                "Python); re-create the bundle's configs with covid_monai.bundle.create_bundle (the weights stay)"
            )
        unknown = sorted(k for k in (overrides or {}) if k.split("#")[0] not in self.parser)
        if unknown:
            raise ValueError(f"{self.bundle_dir}: inference.json has no setting {', '.join(unknown)}")
        knobs = {**(overrides or {}), "device": f"$torch.device('{self.device}')"}
        knobs.update(save_probabilities=save_probabilities, save_lungs=save_lungs)
        for key, value in knobs.items():
            self.parser[key] = value
        # a binary mask is split into ground glass and consolidation by the scan's HU on its own grid
        self.hu_split = not self.multiclass and bool(self.parser.get_parsed_content("expect_hu"))
        self.parser["keep_original"] = save_preview or self.hu_split
        ckpt = Path(self.parser.get_parsed_content("ckpt_path"))
        if not ckpt.is_file():
            raise FileNotFoundError(f"{self.bundle_dir}: no trained weights at {ckpt}")
        self.network = _parsed(self.parser, "network")
        self.inferer = _parsed(self.parser, "inferer")
        self.max_voxels = int(self.parser.get_parsed_content("max_voxels"))

    @property
    def multiclass(self) -> bool:
        """Whether the bundle is multi-class (``labels: multiclass``): masks hold 1 ground glass, 2 consolidation."""
        return self.parser.get_parsed_content("multiclass")

    def predict(self, data: dict[str, Any]) -> dict[str, Any]:
        """Run the bundle's inferer and network over one pre-processed case.

        Args:
            data: the output of the bundle's pre-processing for one case.

        Returns:
            ``data`` with ``pred``, the network's output (logits on the network's grid, on the device), ready for the
            bundle's post-processing (:meth:`transforms`).
        """
        data["pred"] = self.inferer(data["image"].unsqueeze(0).to(self.device), self.network)[0]
        return data

    def transforms(self, out_dir: str | os.PathLike) -> tuple[Callable, Callable]:
        """The bundle's pre-processing and post-processing for a run that writes into ``out_dir``.

        Both are built together (a post-processing may invert the pre-processing it refers to); the network is not
        built again.

        Args:
            out_dir: where the post-processing writes the mask (and the probability map and lungs when asked).

        Returns:
            ``(preprocessing, postprocessing)``: the first turns ``{"image": path, "name": case}`` into the network's
            input; the second turns :meth:`predict`'s output into the uint8 mask ``pred``, ``(1, X, Y, Z)`` in the
            input's voxel grid (beside ``lungs`` and ``probability`` when the bundle computes them), and saves it.
        """
        self.parser["output_dir"] = str(Path(out_dir).resolve())
        return _parsed(self.parser, "preprocessing"), _parsed(self.parser, "postprocessing")

    def run(
        self,
        cases: Sequence[Case],
        out_dir: str | os.PathLike,
        overwrite: bool = False,
        previous: Sequence[CaseResult] = (),
        progress: bool = True,
        debug: bool = False,
        on_result: Callable[[CaseResult], None] | None = None,
    ) -> list[CaseResult]:
        """Segment ``cases`` into ``out_dir``; finished cases are skipped unless ``overwrite``.

        Args:
            cases: from :func:`discover_cases`.
            out_dir: output folder (created).
            overwrite: redo cases whose outputs exist.
            previous: results of an earlier run (their numbers are kept for skipped cases).
            progress: show a tqdm progress bar.
            debug: keep tracebacks in the results (``extra["trace"]``).
            on_result: called after each case (the caller rewrites the summary, so a crash loses nothing).

        Returns:
            One result per case, in order.
        """
        from tqdm import tqdm

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        wanted = ["infection"] + ["probability"] * self.save_probabilities + ["lungs"] * self.save_lungs
        wanted += ["preview"] * self.save_preview + ["seg_nrrd"] * self.save_seg_nrrd
        for name, table in slicer_color_tables(self.multiclass).items():
            if not (out / name).is_file() or (out / name).read_text() != table:
                atomic_write_text(out / name, table)
        before = {r.case: r for r in previous}
        results: dict[str, CaseResult] = {}
        todo = []
        for case in cases:
            paths = output_paths(out, case.name)
            if not overwrite and all(paths[k].is_file() for k in wanted + self._dicom_seg(case, before)):
                results[case.name] = _with_facts(_skipped(case, before.get(case.name), paths["infection"]), case)
                if on_result:
                    on_result(results[case.name])
            else:
                todo.append(case)
        preprocessing, postprocessing = self.transforms(out)
        set_determinism(seed=0)
        loader = torch.utils.data.DataLoader(
            _CaseDataset(todo, preprocessing, debug, self.max_voxels),
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers if len(todo) > 1 else 0,
            prefetch_factor=1 if self.num_workers and len(todo) > 1 else None,
            persistent_workers=False,
        )
        bar = tqdm(total=len(cases), initial=len(cases) - len(todo), unit="scan", disable=not progress)
        start = time.perf_counter()

        def finish(case: Case, result: CaseResult) -> None:
            nonlocal start
            result = _with_facts(result, case)
            result.seconds = round(time.perf_counter() - start, 3)
            start = time.perf_counter()
            results[case.name] = result
            if result.status == "failed" and progress:
                bar.write(f"FAILED {case.source}: {result.error}", file=sys.stderr)
            if on_result:
                on_result(result)
            bar.update(1)

        # Three scans in flight: the loader's worker reads and pre-processes the next one, this thread runs the
        # network, and the writer thread post-processes, writes and quantifies the previous one. Results are
        # finished in input order.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="covid_monai_writer") as writer:
            pending: tuple[Case, Future[CaseResult]] | None = None
            for item in loader:
                case: Case = item["case"]
                if "error" in item:
                    failed = CaseResult(case.name, str(case.source), "failed", item["error"])
                    failed.extra["trace"] = item.get("trace", "")
                    future = _finished(failed)
                else:
                    future = self._predict_then_write(writer, case, item["data"], postprocessing, out, debug)
                if pending is not None:
                    finish(pending[0], pending[1].result())
                pending = (case, future)
            if pending is not None:
                finish(pending[0], pending[1].result())
        bar.close()
        return [results[c.name] for c in cases]

    def _predict_then_write(
        self, writer: ThreadPoolExecutor, case: Case, data: dict[str, Any], postprocessing: Callable, out: Path,
        debug: bool,
    ) -> Future[CaseResult]:
        """Run the network on one case here, then hand the rest (:meth:`_write_one`) to the writer thread."""
        try:
            data = self.predict(data)
        except Exception as exc:  # noqa: BLE001 - one bad scan must not stop the batch
            return _finished(self._failure(case, exc, debug))
        return writer.submit(self._write_one, case, data, postprocessing, out, debug)

    def _failure(self, case: Case, exc: Exception, debug: bool) -> CaseResult:
        result = CaseResult(case.name, str(case.source), "failed", one_line(exc))
        if debug:
            result.extra["trace"] = traceback.format_exc()
        return result

    def _write_one(
        self, case: Case, data: dict[str, Any], postprocessing: Callable, out: Path, debug: bool
    ) -> CaseResult:
        """Post-process one predicted case (the bundle's post-processing writes its mask), then the extra outputs and
        the numbers."""
        result = CaseResult(case.name, str(case.source), "ok")
        try:
            data = postprocessing(data)  # no reference kept here: the post-processing drops the image
            pred = data["pred"]
            affine = np.asarray(pred.affine, dtype=np.float64)
            mask = np.asarray(pred[0]).astype(np.uint8)
            lungs = np.asarray(data["lungs"][0]).astype(np.uint8) if "lungs" in data else None
            paths = output_paths(out, case.name)
            notes = list(data.get("warnings", []))
            if self.save_preview:
                save_preview(np.asarray(data["original_image"][0]), mask, affine, paths["preview"])
            notes += self._write_segmentations(case, mask, affine, paths)
            result.shape = "x".join(str(s) for s in mask.shape)
            result.spacing = "x".join(f"{s:.4g}" for s in affine_to_spacing(affine, suppress_zeros=False))
            numbers = self._quantify(case, data, mask, affine, lungs, notes)
            result.warnings = "; ".join(notes)
            _fill_numbers(result, numbers)
        except Exception as exc:  # noqa: BLE001 - one bad scan must not stop the batch
            return self._failure(case, exc, debug)
        return result

    def _quantify(
        self, case: Case, data: dict[str, Any], mask: np.ndarray, affine: np.ndarray, lungs: np.ndarray | None,
        notes: list[str],
    ) -> dict[str, Any]:
        """:func:`quantify_case` with the scan's HU (binary masks) and the case's lobes; problems go to ``notes``."""
        image = np.asarray(data["original_image"][0]) if self.hu_split else None
        lobes = None
        if self.lobes_dir is not None:
            lobes, lobe_notes = read_lobes(self.lobes_dir, case.name, mask.shape, affine)
            notes += lobe_notes
        numbers = quantify_case(mask, affine, lungs, image=image, lobes=lobes, multiclass=self.multiclass)
        absent = [name.upper() for name in LOBE_LABELS if lobes is not None and numbers[f"pct_lobe_{name}"] is None]
        if absent:
            notes.append(f"lobe mask has no {', '.join(absent)} voxels: scored 0")
        return numbers

    def _write_segmentations(
        self, case: Case, mask: np.ndarray, affine: np.ndarray, paths: Mapping[str, Path]
    ) -> list[str]:
        """``--seg-nrrd`` and ``--dicom-seg`` outputs; returns warnings (a DICOM-SEG that cannot be made)."""
        segments = segments_for(self.multiclass)
        if self.save_seg_nrrd:
            write_seg_nrrd(mask, affine, paths["seg_nrrd"], segments)
        if not self.save_dicom_seg:
            return []
        if case.kind != "dicom":
            return ["no DICOM-SEG: the input is not a DICOM series"]
        import contextlib
        import zipfile

        from covid_monai import __version__

        try:
            with contextlib.ExitStack() as stack:
                files: list[Any] = list(case.files or sorted(str(p) for p in case.source.iterdir() if p.is_file()))
                if is_zip(case.source):
                    archive = stack.enter_context(zipfile.ZipFile(case.source))
                    files = [stack.enter_context(archive.open(member)) for member in files]
                write_dicom_seg(mask, affine, files, paths["dicom_seg"], segments, ("covid-monai", __version__),
                                {"bundle": self.bundle_dir.name})
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            return [f"no DICOM-SEG: {one_line(exc)}"]
        return []

    def _dicom_seg(self, case: Case, before: Mapping[str, CaseResult]) -> list[str]:
        """``["dicom_seg"]`` when this case should have one (a DICOM input with ``--dicom-seg``, not refused before)."""
        earlier = before.get(case.name)
        refused = earlier is not None and "no DICOM-SEG:" in (earlier.warnings or "")
        return ["dicom_seg"] if self.save_dicom_seg and case.kind == "dicom" and not refused else []


def _finished(result: CaseResult) -> Future[CaseResult]:
    """A future that already holds ``result`` (a case that fails before the writer thread sees it)."""
    future: Future[CaseResult] = Future()
    future.set_result(result)
    return future


def _fill_numbers(result: CaseResult, numbers: Mapping[str, Any]) -> None:
    for key in ("infection_ml", "lung_left_ml", "lung_right_ml", "lung_ml", "pct_left", "pct_right", "pct_lungs",
                "ggo_ml", *ZONE_FIELDS, *LOBE_FIELDS):
        value = numbers.get(key)
        setattr(result, key, None if value is None else round(float(value), 4))
    result.lesions = int(numbers["lesions"])
    if result.ggo_ml is not None and result.infection_ml is not None:  # so that ggo + consolidation = infection
        result.consolidation_ml = round(result.infection_ml - result.ggo_ml, 4)
    result.class_source = str(numbers.get("class_source") or "")
    score = numbers.get("ct_severity_score")
    result.ct_severity_score = None if score is None else int(score)


def _skipped(case: Case, before: CaseResult | None, mask_path: Path) -> CaseResult:
    """A result for a case whose outputs exist: the earlier numbers if known, else counted from the mask."""
    if before is not None and before.status in ("ok", "skipped"):
        result = CaseResult(**{k: v for k, v in asdict(before).items() if k != "extra"})
        result.status, result.input = "skipped", str(case.source)
        return result
    import nibabel as nib

    result = CaseResult(case.name, str(case.source), "skipped")
    image = nib.load(str(mask_path))
    mask = np.asarray(image.dataobj).astype(np.uint8)
    result.shape = "x".join(str(s) for s in mask.shape)
    result.spacing = "x".join(f"{s:.4g}" for s in image.header.get_zooms()[:3])
    _fill_numbers(result, quantify_case(mask, image.affine, None))
    return result


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed run left in ``out_dir`` (only this tool's ``.<name>.<random>.tmp*`` files).

    Returns:
        The files removed.
    """
    removed = []
    for path in Path(out_dir).glob(".*.tmp*"):
        if path.is_file() and re.fullmatch(r"\..+\.[A-Za-z0-9_]{8}\.tmp(\.nii\.gz|\.[A-Za-z0-9]+)?", path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _parsed(parser: Any, config_id: str) -> Any:
    """``parser.get_parsed_content(config_id)``, raising the root cause of a component that failed to build.

    MONAI wraps every error of a config component in "Failed to instantiate component ..."; the cause (no weights,
    a checkpoint that is not weights-only) is what the user must read.
    """
    try:
        return parser.get_parsed_content(config_id)
    except RuntimeError as exc:
        cause = exc.__cause__
        if "Failed to instantiate component" in str(exc) and isinstance(cause, (ValueError, OSError)):
            raise cause from None
        raise


def run_batch(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    bundle_dir: str | os.PathLike,
    knobs: Mapping[str, Any] | None = None,
    device: str = "auto",
    workers: int = 1,
    save_probabilities: bool = False,
    save_lungs: bool = False,
    save_preview: bool = False,
    lobes: str | os.PathLike | None = None,
    save_seg_nrrd: bool = False,
    save_dicom_seg: bool = False,
    overwrite: bool = False,
    force: bool = False,
    progress: bool = True,
    debug: bool = False,
    shard: tuple[int, int] | None = None,
) -> list[CaseResult]:
    """Discover cases, segment them with one model load, and keep ``summary.csv``/``summary.json`` up to date.

    The summary is rewritten atomically after every case, so an interrupted run leaves a summary of what was
    done, and the next run skips finished cases (unless ``overwrite``).

    Args:
        inputs: NIfTI files, folders (searched recursively), DICOM series folders.
        out_dir: output folder; refused when inside an input folder unless ``force``.
        bundle_dir: trained bundle folder.
        knobs: bundle config overrides (``threshold``, ``min_lesion_ml``, ``restrict_to_lungs``...).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        workers: DataLoader workers pre-processing the next scans while the network runs.
        save_probabilities: also write probability maps.
        save_lungs: also write lung masks.
        save_preview: also write preview PNGs.
        lobes: folder of lobe masks (``<case>.nii.gz``, ``<case>_lobes.nii.gz`` or TotalSegmentator's
            ``<case>/lung_*_lobe_*.nii.gz``) for the lobe columns and the CT severity score.
        save_seg_nrrd: also write 3D Slicer segmentations (``.seg.nrrd``).
        save_dicom_seg: also write DICOM Segmentations (``.seg.dcm``) for DICOM inputs.
        overwrite: redo finished cases.
        force: allow an output folder inside an input folder.
        progress: show a progress bar.
        debug: keep tracebacks of failures (printed to stderr).
        shard: ``(index, count)``: process only cases ``index, index + count, ...`` of the sorted discovery (for
            distributed runs; every process discovers the same cases) and keep this shard's summary in
            ``summary.shard<index>.json`` / ``.csv``; inputs that do not exist are reported by shard 0 only.

    Returns:
        One result per case (failed inputs included).

    Example:
        >>> results = run_batch(["scans/"], "masks/", "demo_output/bundle", device="cpu")
    """
    check_output_folder(out_dir, inputs, force)
    cases, failures = discover_cases(inputs)
    summary_name = "summary"
    if shard is not None:
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard index {index} outside 0..{count - 1}")
        cases, failures = cases[index::count], failures if index == 0 else []
        summary_name = f"summary.shard{index}"
    segmenter = BatchSegmenter(bundle_dir, device, knobs, workers, save_probabilities, save_lungs, save_preview,
                               lobes_dir=lobes, save_seg_nrrd=save_seg_nrrd, save_dicom_seg=save_dicom_seg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = read_summary(out) + read_summary(out, summary_name)
    if shard is None:  # sharded runs: the launcher cleans up once, before the ranks start writing
        remove_stale_temporaries(out)
    done: dict[str, CaseResult] = {f.case: f for f in failures}
    meta = {"bundle": str(Path(bundle_dir).resolve()), "device": str(segmenter.device), "knobs": dict(knobs or {})}

    def record(result: CaseResult) -> None:
        done[result.case] = result
        if debug and result.extra.get("trace"):
            print(result.extra["trace"], file=sys.stderr)
        rows = [done[c.case] for c in failures] + [done[c.name] for c in cases if c.name in done]
        write_summary(out, rows, meta, summary_name)

    write_summary(out, failures, meta, summary_name)
    results = segmenter.run(cases, out, overwrite=overwrite, previous=previous, progress=progress,
                            debug=debug, on_result=record)
    return failures + results

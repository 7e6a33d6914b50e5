"""Download and prepare COVID-19-CT-Seg (Ma et al., Zenodo record 3757476): 20 chest CTs with infection and lung masks.

Output (``--out DIR``)::

    DIR/images/<case>.nii.gz     CT in HU (int16), the source file's geometry
    DIR/labels/<case>.nii.gz     infection, uint8 0/1, the image's geometry
    DIR/lungs/<case>.nii.gz      lungs, uint8, the dataset's labels: 1 left lung, 2 right lung
    DIR/datalist_task1_fold{0-4}.json    benchmark Task 1 (limited annotations): 4 train / 16 test per fold
    DIR/datalist_cv5_fold{0-4}.json      5-fold cross-validation, 16 train / 4 test per fold
    DIR/datalist_seed_70_20_10.json      the seed study's split: 14 train / 4 validation / 2 test
    DIR/splits.json  DIR/manifest.json  DIR/README.md

Cases are named like the dataset's masks: ``coronacases_001`` ... ``coronacases_010`` and
``radiopaedia_<id>`` (e.g. ``radiopaedia_4_85506_1`` for ``radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm``).

**Intensities.** The 10 coronacases volumes are in HU. The 10 Radiopaedia volumes were published already windowed to
[-1250, 250] HU and rescaled to 0-255. They are detected from their intensity range (every voxel within 0..255,
which no CT in HU is, since air is about -1000 HU) - not from the name; a name/range disagreement is reported - and
mapped back to HU with ``hu = v / 255 * 1500 - 1250``, so all 20 images share one intensity scale. HU outside the
window (bone above 250, air below -1250) cannot be recovered for those cases: they stay clipped at the window edges.

**Lung labels.** The dataset's convention is kept: 1 left lung, 2 right lung. For every case the script also reports
on which side of the patient label 1 lies in world (RAS) coordinates (``manifest.json``, ``README.md``), so a case
whose header disagrees is visible.

**Splits.** The benchmark's exact fold assignment is published as pickles in its repository
(``JunMa11/COVID-19-CT-Seg-Benchmark``, ``Task1/Task1_COVID_datasplit.pkl`` and ``Task1_COVID_82_datasplit.pkl``).
Without them the folds are made here, seeded (``--seed``) and stratified: each of the 5 disjoint groups holds 2
coronacases and 2 Radiopaedia cases; Task 1 fold i trains on group i and tests on the other 16, the 80/20 fold i
tests on group i and trains on the other 16, so every case is in exactly one test fold of the 80/20 split. To use
the benchmark's own folds, convert a pickle to JSON (only for a trusted file: unpickling runs code) and pass it::

    python -c "import json, pickle, sys; print(json.dumps([{k: [str(c) for c in f[k]] for k in f}
        for f in pickle.load(open(sys.argv[1], 'rb'))]))" Task1_COVID_datasplit.pkl > task1.json
    python scripts/prepare_covid19_ct_seg.py --out data/covid19_ct_seg --task1-splits task1.json

(a list of folds ``{"train": [...], "val": [...]}``; case names in any of the dataset's spellings).

Example:
    python scripts/prepare_covid19_ct_seg.py --out data/covid19_ct_seg                      # from Zenodo
    python scripts/prepare_covid19_ct_seg.py --source /mnt/mirror/3757476 --out data/covid19_ct_seg
    python scripts/prepare_covid19_ct_seg.py --source file:///mnt/mirror/3757476 --out data/covid19_ct_seg \\
        --checksum Infection_Mask.zip=md5:<hex>

Licence of the data: CC BY 4.0; cite Ma et al., "Towards Data-Efficient Learning: A Benchmark for COVID-19 CT Lung
and Infection Segmentation", Medical Physics 2021, and the Zenodo record (doi:10.5281/zenodo.3757476).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

if __package__ in (None, ""):  # run as a file: make the `scripts` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covid_monai.io import check_output_folder, save_nifti_like  # noqa: E402
from scripts.datasets import (  # noqa: E402
    CASE_COLUMNS,
    DatasetError,
    RemoteFile,
    add_common_arguments,
    atomic_write_json,
    atomic_write_text,
    cases_section,
    extract_zip,
    find_nifti,
    is_windowed,
    kfold_groups,
    load_nifti,
    make_datalist,
    nifti_stem,
    obtain,
    parse_checksum_args,
    read_array,
    read_mask,
    run_cases,
    setup_logging,
    source_location,
    spacing_of,
    write_split_datalists,
)

log = logging.getLogger("covid_monai.scripts")

DEFAULT_SOURCE = "https://zenodo.org/records/3757476/files"

# The record's files. Sizes and MD5 digests are to be filled from the Zenodo record page (it lists an MD5 per file);
# they could not be fetched where this script was written. A recorded value is verified; `None` is not (a warning
# says so). `--checksum NAME=md5:<hex>` supplies or overrides one on the command line.
FILES: dict[str, RemoteFile] = {
    "images": RemoteFile("COVID-19-CT-Seg_20cases.zip", size=None, checksum=None, note="20 CT volumes (NIfTI)"),
    "infection": RemoteFile("Infection_Mask.zip", size=None, checksum=None, note="infection masks, 0/1"),
    "lungs": RemoteFile("Lung_Mask.zip", size=None, checksum=None, note="lung masks, 1 left, 2 right"),
    "combined": RemoteFile(
        "Lung_and_Infection_Mask.zip",
        size=None,
        checksum=None,
        required=False,
        note="1 left lung, 2 right lung, 3 infection: the two masks above in one file; not needed",
    ),
}
WINDOW = (-1250.0, 250.0)  # the HU window of the Radiopaedia cases, stored as 0..255


def case_id(name: str) -> str:
    """The case name of an image or mask file, in the masks' spelling.

    Args:
        name: file name or path (``coronacases_org_001.nii.gz``, ``radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm
            .nii``, ``coronacases_001.nii.gz``, also the variants ``coronacases_org_case007``, ``case009``).

    Example:
        >>> case_id("radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm.nii.gz")
        'radiopaedia_4_85506_1'
        >>> case_id("coronacases_org_001.nii.gz")
        'coronacases_001'
    """
    stem = nifti_stem(name)
    low = stem.lower()
    if "radiopaedia" in low:
        match = re.search(r"(\d+_\d+_\d+)", low)
        if match:
            return f"radiopaedia_{match.group(1)}"
    match = re.fullmatch(r"(?:coronacases_(?:org_)?)?(?:case)?0*(\d+)", low)
    if match and (low.startswith("coronacases") or low.startswith("case")):
        return f"coronacases_{int(match.group(1)):03d}"
    return stem


def window_to_hu(data: np.ndarray) -> np.ndarray:
    """Map 0..255 values of the [-1250, 250] window back to HU, rounded to int16: ``v / 255 * 1500 - 1250``.

    Example:
        >>> window_to_hu(np.array([0, 255])).tolist()
        [-1250, 250]
    """
    low, high = WINDOW
    return np.rint(data.astype(np.float32) / 255.0 * (high - low) + low).astype(np.int16)


def _index(folder: Path, what: str) -> dict[str, Path]:
    """``{case: file}`` for the NIfTI files under ``folder``; duplicate case names are an error."""
    found: dict[str, Path] = {}
    for path in find_nifti(folder):
        case = case_id(path.name)
        if case in found:
            raise DatasetError(f"{path}: {what} case {case} also in {found[case]}")
        found[case] = path
    if not found:
        raise DatasetError(f"{folder}: no NIfTI {what} files")
    return found


def _lung_side(lungs: np.ndarray, affine: np.ndarray) -> str | None:
    """Side of the patient (``left``/``right``, RAS world x) where label 1 lies relative to label 2."""
    if not (np.any(lungs == 1) and np.any(lungs == 2)):
        return None
    centres = ndimage.center_of_mass(lungs > 0, lungs, [1, 2])
    x1, x2 = (float((affine @ np.r_[np.asarray(c, float), 1.0])[0]) for c in centres)
    return "left" if x1 < x2 else "right"  # RAS: the patient's left is -x


def prepare_case(
    case: str, image_path: Path, infection_path: Path, lung_path: Path | None, out: Path
) -> dict[str, Any]:
    """Write one case's image (HU), infection label and lung mask; return its manifest entry.

    Args:
        case: case name (``coronacases_001``).
        image_path: the CT file.
        infection_path: its infection mask.
        lung_path: its lung mask, or ``None``.
        out: the dataset folder.

    Raises:
        DatasetError: a file cannot be read, or a mask's shape differs from the image's.
    """
    image = load_nifti(image_path)
    data = read_array(image, image_path)
    if data.ndim != 3:
        raise DatasetError(f"{image_path}: not a 3D volume (shape {data.shape})")
    windowed = is_windowed(data)
    if windowed != case.startswith("radiopaedia_"):
        log.warning(
            "%s: values %g..%g %s, although the name says %s",
            image_path,
            float(data.min()),
            float(data.max()),
            "look windowed to 0-255 (mapped to HU)" if windowed else "look like HU (kept)",
            "Radiopaedia" if case.startswith("radiopaedia_") else "coronacases",
        )
    entry: dict[str, Any] = {
        "image_source": image_path.name,
        "label_source": infection_path.name,
        "lungs_source": lung_path.name if lung_path else None,
        "shape": [int(s) for s in data.shape],
        "spacing": spacing_of(image),
        "source_range": [float(data.min()), float(data.max())],
        "intensity": "0-255 window [-1250, 250] mapped to HU" if windowed else "HU",
    }
    labels = read_mask(infection_path, image, "infection mask")
    lungs = read_mask(lung_path, image, "lung mask") if lung_path else None
    hu = window_to_hu(data) if windowed else np.rint(data).astype(np.int16)
    del data
    save_nifti_like(hu, out / "images" / f"{case}.nii.gz", reference=image, dtype=np.int16)
    entry["hu_range"] = [int(hu.min()), int(hu.max())]
    del hu
    infection = (labels > 0).astype(np.uint8)
    save_nifti_like(infection, out / "labels" / f"{case}.nii.gz", reference=image, dtype=np.uint8)
    voxel_ml = float(np.prod(spacing_of(image))) / 1000.0
    entry["infection_voxels"] = int(infection.sum())
    entry["infection_ml"] = round(entry["infection_voxels"] * voxel_ml, 2)
    if lungs is not None:
        values = sorted(int(v) for v in np.unique(lungs))
        if not set(values) <= {0, 1, 2}:
            log.warning("%s: lung mask values %s, expected 0, 1 (left), 2 (right)", lung_path, values)
        save_nifti_like(lungs, out / "lungs" / f"{case}.nii.gz", reference=image, dtype=np.uint8)
        entry["lung_ml"] = round(float(np.count_nonzero(lungs)) * voxel_ml, 1)
        entry["lung_label_1_side"] = _lung_side(lungs, image.affine)
        if entry["lung_label_1_side"] == "right":
            log.warning("%s: label 1 lies on the patient's right in world coordinates (header orientation?)", case)
    return entry


def load_folds(path: Path, cases: Sequence[str]) -> list[tuple[list[str], list[str]]]:
    """Read folds from JSON: a list of ``{"train": [...], "val" | "test": [...]}`` with case names in any spelling.

    Args:
        path: the JSON file.
        cases: the prepared cases.

    Returns:
        ``[(train cases, test cases), ...]`` in the masks' spelling.

    Example:
        >>> load_folds(Path("task1.json"), cases)[0][0]
        ['coronacases_002', 'coronacases_007', 'radiopaedia_14_85914_0', 'radiopaedia_4_85506_1']

    Raises:
        DatasetError: unreadable file, wrong layout, or names not among ``cases``.
    """
    try:
        document = json.loads(Path(path).read_text())
        folds = [(fold["train"], fold["test"] if "test" in fold else fold["val"]) for fold in document]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: expected a JSON list of {{'train': [...], 'val': [...]}} folds ({exc})") from exc
    known = set(cases)
    out = []
    for i, (train, test) in enumerate(folds):
        train_ids, test_ids = sorted(case_id(str(c)) for c in train), sorted(case_id(str(c)) for c in test)
        unknown = sorted(set(train_ids + test_ids) - known)
        if unknown:
            raise DatasetError(f"{path}: fold {i} names cases not prepared here: {', '.join(unknown)}")
        out.append((train_ids, test_ids))
    return out


def prepare(
    source: str,
    out: str | Path,
    checksums: Mapping[str, str] | None = None,
    downloads: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
    task1_splits: str | Path | None = None,
    cv_splits: str | Path | None = None,
) -> dict[str, Any]:
    """Fetch, verify, extract and convert the dataset; write datalists and the README.

    Args:
        source: base URL, local mirror folder or ``file://`` URL with the record's zip files (or their extracted
            folders).
        out: output dataset folder.
        checksums: ``{file name: "md5:<hex>" | "sha256:<hex>"}`` overriding the built-in table.
        downloads: where downloads go (default ``out/downloads``); archives are extracted to ``out/raw``.
        seed: random seed of the splits.
        overwrite: redo cases whose outputs exist.
        task1_splits: JSON folds replacing the generated 4/16 folds.
        cv_splits: JSON folds replacing the generated 80/20 folds.

    Returns:
        ``{"cases": [...], "failed": {case: reason}, "splits": {...}}``.

    Raises:
        DatasetError: a file is missing, corrupt, or fails its checksum.

    Example:
        >>> prepare("/mnt/mirror/3757476", "data/covid19_ct_seg")["cases"][:1]
        ['coronacases_001']
    """
    out = Path(out)
    checksums = dict(checksums or {})
    location = source_location(source)
    if isinstance(location, Path):
        check_output_folder(out, [location], error=DatasetError, hint="choose another output folder")
    downloads = Path(downloads) if downloads else out / "downloads"
    folders = {}
    for key in ("images", "infection", "lungs"):
        remote = FILES[key]
        path = obtain(source, remote, downloads, checksums.get(remote.name))
        folders[key] = extract_zip(path, out / "raw" / path.stem) if path.is_file() else path
    images = _index(folders["images"], "image")
    infections = _index(folders["infection"], "infection mask")
    lungs = _index(folders["lungs"], "lung mask")
    jobs = {}
    failed: dict[str, str] = {}
    for case in sorted(set(infections) - set(images)):
        failed[case] = f"{infections[case]}: infection mask without an image"
        log.error("%s", failed[case])
    for case in sorted(images):
        if case not in infections:
            failed[case] = f"{images[case]}: no infection mask {case}.nii.gz in {folders['infection']}"
            log.error("%s", failed[case])
            continue
        if case not in lungs:
            log.warning("%s: no lung mask in %s; lungs/ skipped for this case", case, folders["lungs"])
        outputs = [out / sub / f"{case}.nii.gz" for sub in ("images", "labels") + (("lungs",) if case in lungs else ())]
        jobs[case] = (outputs, partial(prepare_case, case, images[case], infections[case], lungs.get(case), out))
    entries, failures = run_cases(out, jobs, {"dataset": "COVID-19-CT-Seg", "source": source}, overwrite)
    failed.update(failures)
    cases = sorted(entries)
    splits = write_datalists(out, cases, seed, task1_splits, cv_splits) if len(cases) >= 5 else {}
    if not splits:
        log.error("%s: only %d cases prepared; no datalists written (5 folds need 5 cases)", out, len(cases))
    atomic_write_text(out / "README.md", readme(source, entries, failed, splits))
    log.info("%s: %d cases prepared, %d failed", out, len(cases), len(failed))
    return {"cases": cases, "failed": failed, "splits": splits}


def write_datalists(
    out: Path, cases: Sequence[str], seed: int, task1_splits: str | Path | None, cv_splits: str | Path | None
) -> dict[str, Any]:
    """Write the Task 1 (4/16), 80/20 and 70/20/10 datalists and ``splits.json``; return the splits by case name."""
    strata = {c: c.split("_")[0] for c in cases}
    splits = write_split_datalists(out, cases, "datalist", seed, strata)
    groups = kfold_groups(cases, 5, seed, strata)
    task1 = [(g, sorted(c for c in cases if c not in g)) for g in groups]
    if task1_splits:
        task1 = load_folds(Path(task1_splits), cases)
    if cv_splits:
        cv = load_folds(Path(cv_splits), cases)
        for i, (train, test) in enumerate(cv):
            atomic_write_json(out / f"datalist_cv5_fold{i}.json", make_datalist(train, [], test))
        splits["cv5_folds"] = [{"training": train, "test": test} for train, test in cv]
    for i, (train, test) in enumerate(task1):
        atomic_write_json(out / f"datalist_task1_fold{i}.json", make_datalist(train, [], test))
    splits["task1_folds"] = [{"training": train, "test": test} for train, test in task1]
    splits["seed"] = seed
    splits["generated"] = {"task1": not task1_splits, "cv5": not cv_splits}
    atomic_write_json(out / "splits.json", splits)
    return splits


def readme(source: str, entries: Mapping[str, Any], failed: Mapping[str, str], splits: Mapping[str, Any]) -> str:
    """The generated ``README.md`` of the prepared folder."""
    windowed = [c for c, e in sorted(entries.items()) if e["intensity"] != "HU"]
    lines = [
        "# COVID-19-CT-Seg, prepared",
        "",
        f"Prepared by `scripts/prepare_covid19_ct_seg.py` from `{source}`",
        "(Ma et al., Zenodo record 3757476, CC BY 4.0; cite doi:10.5281/zenodo.3757476 and Ma et al.,",
        "Medical Physics 2021).",
        "",
        "- `images/<case>.nii.gz`: CT in HU (int16), each source file's own geometry (qform/sform kept).",
        "- `labels/<case>.nii.gz`: infection, uint8 0/1, the image's geometry.",
        "- `lungs/<case>.nii.gz`: lungs, uint8, the dataset's labels: 1 left lung, 2 right lung.",
        "",
        "## Intensities",
        "",
        "The Radiopaedia volumes were published windowed to [-1250, 250] HU and rescaled to 0-255. Volumes whose every",
        "voxel lies in 0..255 (detected from the values, not the name) were mapped back to HU with",
        "`hu = v / 255 * 1500 - 1250`; values beyond the window stay clipped at -1250 and 250 HU for them.",
        f"Mapped here ({len(windowed)}): {', '.join(windowed) or 'none'}.",
        "",
        "## Datalists (paths relative to this folder)",
        "",
        "- `datalist_task1_fold{0-4}.json`: benchmark Task 1, learning with limited annotations: 4 train / 16 test.",
        "- `datalist_cv5_fold{0-4}.json`: 5-fold cross-validation, 16 train / 4 test; each case is in one test fold.",
        "- `datalist_seed_70_20_10.json`: the seed study's split, 14 train / 4 validation / 2 test.",
        "- `splits.json`: all of these by case name.",
        "",
    ]
    if splits:
        given = [k for k, generated in splits.get("generated", {}).items() if not generated]
        lines += [
            *([f"Folds read from the given files: {', '.join(given)}."] if given else []),
            f"Generated folds (seed {splits.get('seed')}) are stratified: 5 disjoint groups of 2 coronacases + 2",
            "Radiopaedia cases; Task 1 fold i trains on group i, the 80/20 fold i tests on it. The benchmark's own",
            "folds can be given with `--task1-splits` / `--cv-splits` (see the script's docstring).",
            "The cross-validation datalists have an empty `validation` list: `covid-monai train --data <datalist>`",
            "then holds out a fifth of `training` for validation (`--val-fraction`).",
            "",
        ]
    lines += cases_section(
        entries,
        failed,
        {
            **CASE_COLUMNS,
            "intensity": lambda e: str(e["intensity"]),
            "infection mL": lambda e: str(e["infection_ml"]),
            "lung label 1 side": lambda e: e.get("lung_label_1_side") or "-",
        },
    )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns 0 when every case was prepared, 1 otherwise (2 for usage errors)."""
    parser = argparse.ArgumentParser(
        description="Download and prepare COVID-19-CT-Seg (Zenodo 3757476) as images/, labels/, lungs/ and datalists.",
        epilog="See the module docstring for the intensity mapping of the Radiopaedia cases and the splits.",
    )
    add_common_arguments(parser, DEFAULT_SOURCE)
    parser.add_argument("--task1-splits", type=Path, help="JSON folds for Task 1 (4 train / 16 test) to use instead")
    parser.add_argument("--cv-splits", type=Path, help="JSON folds for the 80/20 cross-validation to use instead")
    args = parser.parse_args(argv)
    checksums = parse_checksum_args(args.checksum, parser)
    setup_logging()
    try:
        result = prepare(
            args.source,
            args.out,
            checksums=checksums,
            downloads=args.downloads,
            seed=args.seed,
            overwrite=args.overwrite,
            task1_splits=args.task1_splits,
            cv_splits=args.cv_splits,
        )
    except DatasetError as exc:
        log.error("%s", exc)
        return 1
    return 1 if result["failed"] or not result["splits"] else 0


if __name__ == "__main__":
    sys.exit(main())

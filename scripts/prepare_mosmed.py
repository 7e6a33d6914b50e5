"""Prepare MosMedData COVID19_1110: the 50 chest CT studies with infection masks (ground glass + consolidation).

The dataset (Morozov et al., mosmed.ai, CC BY-NC-ND 3.0) holds 1,110 studies in ``studies/CT-0`` ... ``CT-4``; 50
studies of ``CT-1`` have expert masks in ``masks/study_<NNNN>_mask.nii.gz`` (0 background, 1 ground-glass opacity or
consolidation). Only those 50 are prepared.

``--source`` is a folder (or ``file://`` URL, or base URL) holding the archive ``COVID19_1110.zip`` (``--archive``
names another one), or the extracted dataset itself (the folder with ``studies/`` and ``masks/``, or a folder holding
``COVID19_1110/``). From an archive only the 50 masks and their studies are extracted (to ``OUT/raw``). mosmed.ai
gives no stable direct download URL, so there is no default source; the archive's size and checksum are likewise not
recorded here (pass ``--checksum COVID19_1110.zip=sha256:<hex>`` to verify a copy).

Output (``--out DIR``)::

    DIR/images/study_<NNNN>.nii.gz   CT in HU (int16 when whole numbers), the study's geometry
    DIR/labels/study_<NNNN>.nii.gz   infection, uint8 0/1, the image's geometry
    DIR/datalist_seed_70_20_10.json  35 train / 10 validation / 5 test (seeded)
    DIR/datalist_cv5_fold{0-4}.json  5-fold cross-validation, 40 train / 10 test; every case in one test fold
    DIR/splits.json  DIR/manifest.json  DIR/README.md

Example:
    python scripts/prepare_mosmed.py --source /mnt/mirror/mosmed --out data/mosmed
    python scripts/prepare_mosmed.py --source /mnt/data/COVID19_1110 --out data/mosmed   # extracted copy
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

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
    hu_dtype,
    is_windowed,
    load_nifti,
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

# Size and checksum to be filled from the distributor's page when one is published; `None` is used unverified.
ARCHIVE = RemoteFile("COVID19_1110.zip", size=None, checksum=None, note="MosMedData COVID19_1110, 1,110 studies")
_MASK = re.compile(r"(?:^|/)masks/(study_\d+)_mask\.nii(?:\.gz)?$", re.IGNORECASE)
_STUDY = re.compile(r"(?:^|/)studies/[^/]+/(study_\d+)\.nii(?:\.gz)?$", re.IGNORECASE)


def extract_labelled(archive: Path, dest: Path) -> Path:
    """Extract the masks and the studies that have one from the dataset's zip archive.

    Args:
        archive: the ``COVID19_1110`` zip file.
        dest: the extraction folder.

    Example:
        >>> extract_labelled(Path("downloads/COVID19_1110.zip"), Path("data/mosmed/raw/COVID19_1110"))
    """
    import zipfile

    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"{archive}: not a valid zip archive ({exc})") from exc
    labelled = {m.group(1).lower() for name in names if (m := _MASK.search(name.replace("\\", "/")))}
    if not labelled:
        raise DatasetError(f"{archive}: no masks/study_<NNNN>_mask.nii(.gz) members")

    def keep(name: str) -> bool:
        if _MASK.search(name):
            return True
        study = _STUDY.search(name)
        return bool(study) and study.group(1).lower() in labelled

    return extract_zip(archive, dest, keep)


def index_tree(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """``({study: image}, {study: mask})`` found under an extracted dataset folder.

    Example:
        >>> studies, masks = index_tree(Path("data/mosmed/raw/COVID19_1110"))
    """
    studies: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for path in find_nifti(root):
        rel = path.relative_to(root).as_posix()
        if match := _MASK.search(rel):
            masks[match.group(1).lower()] = path
        elif match := _STUDY.search(rel):
            studies[match.group(1).lower()] = path
    if not masks:
        raise DatasetError(f"{root}: no masks/study_<NNNN>_mask.nii(.gz) files")
    return studies, masks


def prepare_case(case: str, image_path: Path, mask_path: Path, out: Path) -> dict[str, Any]:
    """Write one study's image (HU) and infection label; return its manifest entry.

    Args:
        case: case name (``study_0255``).
        image_path: the study's NIfTI file.
        mask_path: its mask.
        out: the dataset folder.

    Example:
        >>> prepare_case("study_0255", Path("raw/studies/CT-1/study_0255.nii.gz"),
        ...              Path("raw/masks/study_0255_mask.nii.gz"), Path("data/mosmed"))
    """
    image = load_nifti(image_path)
    data = read_array(image, image_path)
    if data.ndim != 3:
        raise DatasetError(f"{image_path}: not a 3D volume (shape {data.shape})")
    if is_windowed(data):
        log.warning("%s: values within 0..255, not HU; written as they are", image_path)
    mask = read_mask(mask_path, image, "mask")
    values = sorted(int(v) for v in np.unique(mask))
    if not set(values) <= {0, 1}:
        log.warning("%s: mask values %s, expected 0/1; every non-zero value counts as infection", mask_path, values)
    dtype = hu_dtype(data)
    save_nifti_like(data, out / "images" / f"{case}.nii.gz", reference=image, dtype=dtype)
    label = (mask > 0).astype(np.uint8)
    save_nifti_like(label, out / "labels" / f"{case}.nii.gz", reference=image, dtype=np.uint8)
    voxel_ml = float(np.prod(spacing_of(image))) / 1000.0
    return {
        "image_source": str(image_path.parent.name + "/" + image_path.name),
        "label_source": mask_path.name,
        "shape": [int(s) for s in data.shape],
        "spacing": spacing_of(image),
        "source_range": [float(data.min()), float(data.max())],
        "dtype": np.dtype(dtype).name,
        "infection_voxels": int(label.sum()),
        "infection_ml": round(int(label.sum()) * voxel_ml, 2),
    }


def prepare(
    source: str,
    out: str | Path,
    checksums: Mapping[str, str] | None = None,
    downloads: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
    archive: str = ARCHIVE.name,
) -> dict[str, Any]:
    """Obtain, verify and extract the archive (or use an extracted copy); convert the 50 labelled studies.

    Args:
        source: base URL, local folder or ``file://`` URL with the archive, or the extracted dataset folder.
        out: output dataset folder.
        checksums: ``{file name: "md5:<hex>" | "sha256:<hex>"}``.
        downloads: where downloads go (default ``out/downloads``).
        seed: random seed of the splits.
        overwrite: redo cases whose outputs exist.
        archive: the archive's file name at the source.

    Returns:
        ``{"cases": [...], "failed": {case: reason}, "splits": {...}}``.

    Example:
        >>> prepare("/mnt/mirror/mosmed", "data/mosmed")["cases"][:1]
        ['study_0255']
    """
    out = Path(out)
    location = source_location(source)
    if isinstance(location, Path):
        check_output_folder(out, [location], error=DatasetError, hint="choose another output folder")
    if isinstance(location, Path) and (location / "masks").is_dir():
        root = location
    else:
        remote = RemoteFile(
            archive,
            ARCHIVE.size if archive == ARCHIVE.name else None,
            ARCHIVE.checksum if archive == ARCHIVE.name else None,
        )
        path = obtain(
            source, remote, Path(downloads) if downloads else out / "downloads", (checksums or {}).get(archive)
        )
        root = extract_labelled(path, out / "raw" / path.stem) if path.is_file() else path
    studies, masks = index_tree(root)
    failed = {
        case: f"{masks[case]}: no study {case}.nii(.gz) under {root}/studies" for case in masks if case not in studies
    }
    for reason in failed.values():
        log.error("%s", reason)
    jobs = {
        case: (
            [out / "images" / f"{case}.nii.gz", out / "labels" / f"{case}.nii.gz"],
            partial(prepare_case, case, studies[case], masks[case], out),
        )
        for case in sorted(masks)
        if case in studies
    }
    entries, failures = run_cases(out, jobs, {"dataset": "MosMedData COVID19_1110", "source": source}, overwrite)
    failed.update(failures)
    cases = sorted(entries)
    splits: dict[str, Any] = {}
    if len(cases) >= 5:
        splits = write_split_datalists(out, cases, "datalist", seed) | {"seed": seed}
        atomic_write_json(out / "splits.json", splits)
    else:
        log.error("%s: only %d cases prepared; no datalists written (5 folds need 5 cases)", out, len(cases))
    atomic_write_text(out / "README.md", readme(source, entries, failed, splits))
    log.info("%s: %d cases prepared, %d failed", out, len(cases), len(failed))
    return {"cases": cases, "failed": failed, "splits": splits}


def readme(source: str, entries: Mapping[str, Any], failed: Mapping[str, str], splits: Mapping[str, Any]) -> str:
    """The generated ``README.md`` of the prepared folder."""
    lines = [
        "# MosMedData COVID19_1110 (labelled studies), prepared",
        "",
        f"Prepared by `scripts/prepare_mosmed.py` from `{source}` (Morozov et al., mosmed.ai; CC BY-NC-ND 3.0).",
        "",
        "- `images/<study>.nii.gz`: CT as stored (HU), the study's geometry.",
        "- `labels/<study>.nii.gz`: infection (ground-glass opacity, consolidation), uint8 0/1, image geometry.",
        "",
        "## Datalists (paths relative to this folder)",
        "",
        f"- `datalist_seed_70_20_10.json`: the seed study's split (seed {splits.get('seed')}).",
        "- `datalist_cv5_fold{0-4}.json`: 5-fold cross-validation (80/20), every case in one test fold; `validation`",
        "  is empty, so `covid-monai train --data <datalist>` holds out a fifth of `training`.",
        "- `splits.json`: the same by case name.",
        "",
    ]
    lines += cases_section(entries, failed, {**CASE_COLUMNS, "infection mL": lambda e: str(e["infection_ml"])})
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns 0 when every labelled study was prepared, 1 otherwise (2 for usage errors)."""
    parser = argparse.ArgumentParser(
        description="Prepare the 50 labelled MosMedData COVID19_1110 studies as images/, labels/ and datalists."
    )
    add_common_arguments(parser, None)
    parser.add_argument("--archive", default=ARCHIVE.name, help=f"archive file name (default {ARCHIVE.name})")
    args = parser.parse_args(argv)
    checksums = parse_checksum_args(args.checksum, parser)
    setup_logging()
    try:
        result = prepare(args.source, args.out, checksums, args.downloads, args.seed, args.overwrite, args.archive)
    except DatasetError as exc:
        log.error("%s", exc)
        return 1
    return 1 if result["failed"] or not result["splits"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Prepare the MedSeg "COVID-19 CT segmentation dataset": the 100-slice set and the 9-volume (Radiopaedia) set.

Source files (medicalsegmentation.com/covid19; radiologist-drawn masks: 1 ground-glass opacity, 2 consolidation,
3 pleural effusion):

- ``tr_im.nii.gz`` / ``tr_mask.nii.gz``: 100 axial slices of 512x512 from more than 40 patients, stacked as one
  512x512x100 array. The slices are unrelated, so each becomes its own single-slice volume ``medseg_slice_<k>``
  (shape 512x512x1, the stack's geometry shifted to slice k).
- ``rp_im.zip`` / ``rp_msk.zip``: 9 whole CT volumes (``rp_im/<n>.nii.gz``, ``rp_msk/<n>.nii.gz``) from Radiopaedia,
  cases ``medseg_rp_<n>``.

``--source`` is a folder, ``file://`` URL or base URL with those files (an extracted ``rp_im/`` folder may replace
``rp_im.zip``). The files were distributed through links on the MedSeg page rather than a stable URL, so there is no
default source, and their sizes and checksums are to be filled from a verified copy (``--checksum`` supplies them).

Output (``--out DIR``)::

    DIR/images/<case>.nii.gz    the image values as stored (HU; int16 when whole numbers, else float32)
    DIR/labels/<case>.nii.gz    infection = ground glass or consolidation (mask 1 or 2), uint8 0/1
    DIR/classes/<case>.nii.gz   the original classes 0-3 (1 ground glass, 2 consolidation, 3 pleural effusion)
    DIR/datalist_slices_seed_70_20_10.json, DIR/datalist_slices_cv5_fold{0-4}.json     the 100 slices
    DIR/datalist_volumes_seed_70_20_10.json, DIR/datalist_volumes_cv5_fold{0-4}.json   the 9 volumes
    DIR/splits.json  DIR/manifest.json  DIR/README.md

The slices' patients are not published, so slice-level splits may put slices of one patient on both sides.

Example:
    python scripts/prepare_medseg.py --source /mnt/mirror/medseg --out data/medseg
    python scripts/prepare_medseg.py --source file:///mnt/mirror/medseg --out data/medseg --subset slices
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
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
    header_with_affine,
    hu_dtype,
    is_windowed,
    load_nifti,
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

# Sizes and checksums to be filled from a verified copy; `None` is used unverified (with a warning).
FILES: dict[str, RemoteFile] = {
    "slices_images": RemoteFile("tr_im.nii.gz", note="100 axial slices, 512x512x100"),
    "slices_masks": RemoteFile("tr_mask.nii.gz", note="their masks: 1 ground glass, 2 consolidation, 3 effusion"),
    "volumes_images": RemoteFile("rp_im.zip", note="9 Radiopaedia volumes, rp_im/<n>.nii.gz"),
    "volumes_masks": RemoteFile("rp_msk.zip", note="their masks, rp_msk/<n>.nii.gz"),
}
INFECTION_CLASSES = (1, 2)  # ground glass, consolidation; 3 (pleural effusion) is not infection
SUBSETS = ("slices", "volumes")


@functools.lru_cache(maxsize=2)
def _stack(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    image = load_nifti(path)
    return image, read_array(image, path)


def _write(
    case: str, data: np.ndarray, classes: np.ndarray, reference: nib.Nifti1Image, out: Path, affine: np.ndarray | None
) -> dict[str, Any]:
    """Write image, infection label and classes of one case; return the manifest fields they give."""
    values = sorted(int(v) for v in np.unique(classes))
    if not set(values) <= {0, 1, 2, 3}:
        log.warning("%s: mask values %s, expected 0-3; only 1 and 2 count as infection", case, values)
    if is_windowed(data):
        log.warning("%s: values within 0..255, not HU; written as they are", case)
    dtype = hu_dtype(data)
    grid = reference if affine is None else header_with_affine(reference, affine, data.shape)
    save_nifti_like(data, out / "images" / f"{case}.nii.gz", reference=grid, dtype=dtype)
    label = np.isin(classes, INFECTION_CLASSES).astype(np.uint8)
    save_nifti_like(label, out / "labels" / f"{case}.nii.gz", reference=grid, dtype=np.uint8)
    save_nifti_like(classes, out / "classes" / f"{case}.nii.gz", reference=grid, dtype=np.uint8)
    return {
        "shape": [int(s) for s in data.shape],
        "spacing": spacing_of(reference),
        "source_range": [float(data.min()), float(data.max())],
        "dtype": np.dtype(dtype).name,
        "infection_voxels": int(label.sum()),
        "class_voxels": {str(c): int(np.count_nonzero(classes == c)) for c in (1, 2, 3)},
    }


def prepare_slice(index: int, image_path: Path, mask_path: Path, out: Path) -> dict[str, Any]:
    """Write slice ``index`` of the 100-slice stack as a single-slice volume; return its manifest entry.

    Args:
        index: slice number, 0-based.
        image_path: ``tr_im.nii.gz``.
        mask_path: ``tr_mask.nii.gz``.
        out: the dataset folder.

    Example:
        >>> prepare_slice(0, Path("mirror/tr_im.nii.gz"), Path("mirror/tr_mask.nii.gz"), Path("data/medseg"))
    """
    image, data = _stack(image_path)
    mask_image, masks = _stack(mask_path)
    if data.ndim != 3 or tuple(masks.shape[:3]) != tuple(data.shape):
        raise DatasetError(f"{mask_path}: shape {masks.shape} does not match {image_path.name}'s {data.shape}")
    shift = np.eye(4)
    shift[2, 3] = index
    classes = np.clip(np.rint(masks[:, :, index : index + 1]), 0, 255).astype(np.uint8)
    entry = _write(
        f"medseg_slice_{index:03d}", data[:, :, index : index + 1], classes, image, out, image.affine @ shift
    )
    return {"source": f"{image_path.name}[:, :, {index}]", **entry}


def prepare_volume(case: str, image_path: Path, mask_path: Path, out: Path) -> dict[str, Any]:
    """Write one of the 9 volumes; return its manifest entry.

    Args:
        case: case name (``medseg_rp_1``).
        image_path: ``rp_im/<n>.nii.gz``.
        mask_path: ``rp_msk/<n>.nii.gz``.
        out: the dataset folder.

    Example:
        >>> prepare_volume("medseg_rp_1", Path("raw/rp_im/1.nii.gz"), Path("raw/rp_msk/1.nii.gz"), Path("data/medseg"))
    """
    image = load_nifti(image_path)
    data = read_array(image, image_path)
    if data.ndim != 3:
        raise DatasetError(f"{image_path}: not a 3D volume (shape {data.shape})")
    classes = read_mask(mask_path, image, "mask")
    return {"source": f"{image_path.parent.name}/{image_path.name}", **_write(case, data, classes, image, out, None)}


def _slice_jobs(source: str, out: Path, downloads: Path, checksums: Mapping[str, str]) -> dict[str, Any]:
    keys = ("slices_images", "slices_masks")
    paths = [obtain(source, FILES[k], downloads, checksums.get(FILES[k].name)) for k in keys]
    header = load_nifti(paths[0]).shape
    if len(header) != 3:
        raise DatasetError(f"{paths[0]}: expected a 3D stack of slices, shape {header}")
    jobs = {}
    for k in range(header[2]):
        case = f"medseg_slice_{k:03d}"
        jobs[case] = (_outputs(out, case), partial(prepare_slice, k, paths[0], paths[1], out))
    return jobs


def _volume_jobs(
    source: str, out: Path, downloads: Path, checksums: Mapping[str, str], failed: dict[str, str]
) -> dict[str, Any]:
    folders = []
    for key in ("volumes_images", "volumes_masks"):
        path = obtain(source, FILES[key], downloads, checksums.get(FILES[key].name))
        folders.append(extract_zip(path, out / "raw" / path.stem) if path.is_file() else path)
    images = {nifti_stem(p): p for p in find_nifti(folders[0])}
    masks = {nifti_stem(p): p for p in find_nifti(folders[1])}
    if not images:
        raise DatasetError(f"{folders[0]}: no NIfTI volumes")
    for stem in sorted(set(images) ^ set(masks)):
        case = f"medseg_rp_{stem}"
        failed[case] = (
            f"{images[stem]}: no mask {stem}.nii.gz in {folders[1]}"
            if stem in images
            else (f"{masks[stem]}: mask without an image in {folders[0]}")
        )
        log.error("%s", failed[case])
    jobs = {}
    for stem in sorted(set(images) & set(masks)):
        case = f"medseg_rp_{stem}"
        jobs[case] = (_outputs(out, case), partial(prepare_volume, case, images[stem], masks[stem], out))
    return jobs


def _outputs(out: Path, case: str) -> list[Path]:
    return [out / sub / f"{case}.nii.gz" for sub in ("images", "labels", "classes")]


def prepare(
    source: str,
    out: str | Path,
    checksums: Mapping[str, str] | None = None,
    downloads: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
    subsets: Sequence[str] = SUBSETS,
) -> dict[str, Any]:
    """Obtain, verify and convert the chosen subsets; write datalists and the README.

    Args:
        source: base URL, local mirror folder or ``file://`` URL with the MedSeg files.
        out: output dataset folder.
        checksums: ``{file name: "md5:<hex>" | "sha256:<hex>"}``.
        downloads: where downloads go (default ``out/downloads``).
        seed: random seed of the splits.
        overwrite: redo cases whose outputs exist.
        subsets: ``"slices"`` (the 100-slice set) and/or ``"volumes"`` (the 9 volumes).

    Returns:
        ``{"cases": [...], "failed": {case: reason}, "splits": {subset: {...}}}``.

    Example:
        >>> prepare("/mnt/mirror/medseg", "data/medseg", subsets=["slices"])["cases"][:1]
        ['medseg_slice_000']
    """
    out = Path(out)
    checksums = dict(checksums or {})
    location = source_location(source)
    if isinstance(location, Path):
        check_output_folder(out, [location], error=DatasetError, hint="choose another output folder")
    downloads = Path(downloads) if downloads else out / "downloads"
    failed: dict[str, str] = {}
    jobs_by_subset = {}
    if "slices" in subsets:
        jobs_by_subset["slices"] = _slice_jobs(source, out, downloads, checksums)
    if "volumes" in subsets:
        jobs_by_subset["volumes"] = _volume_jobs(source, out, downloads, checksums, failed)
    all_jobs = {case: job for jobs in jobs_by_subset.values() for case, job in jobs.items()}
    entries, failures = run_cases(
        out, all_jobs, {"dataset": "MedSeg COVID-19 CT segmentation", "source": source}, overwrite
    )
    _stack.cache_clear()
    failed.update(failures)
    splits: dict[str, Any] = {"seed": seed}
    for subset, jobs in jobs_by_subset.items():
        cases = sorted(c for c in jobs if c in entries)
        if len(cases) >= 5:
            splits[subset] = write_split_datalists(out, cases, f"datalist_{subset}", seed)
        else:
            log.error("%s: only %d %s prepared; no datalists for them (5 folds need 5 cases)", out, len(cases), subset)
    atomic_write_json(out / "splits.json", splits)
    atomic_write_text(out / "README.md", readme(source, entries, failed, splits))
    log.info("%s: %d cases prepared, %d failed", out, len(entries), len(failed))
    return {"cases": sorted(entries), "failed": failed, "splits": splits}


def readme(source: str, entries: Mapping[str, Any], failed: Mapping[str, str], splits: Mapping[str, Any]) -> str:
    """The generated ``README.md`` of the prepared folder."""
    slices = [c for c in entries if c.startswith("medseg_slice_")]
    volumes = [c for c in entries if c.startswith("medseg_rp_")]
    lines = [
        "# MedSeg COVID-19 CT segmentation dataset, prepared",
        "",
        f"Prepared by `scripts/prepare_medseg.py` from `{source}` (medicalsegmentation.com/covid19).",
        "",
        f"- {len(slices)} single-slice volumes `medseg_slice_<k>` from the 100-slice stack `tr_im.nii.gz` (slices of",
        "  different patients; each keeps the stack's geometry shifted to its slice), and",
        f"- {len(volumes)} whole volumes `medseg_rp_<n>` from `rp_im/`.",
        "- `images/`: values as stored; `labels/`: infection = ground glass (1) or consolidation (2), uint8 0/1;",
        "  `classes/`: the original classes (1 ground glass, 2 consolidation, 3 pleural effusion).",
        "",
        "## Datalists (paths relative to this folder)",
        "",
        f"Seed {splits.get('seed')}. `datalist_<subset>_seed_70_20_10.json` (the seed study's split) and",
        "`datalist_<subset>_cv5_fold{0-4}.json` (5-fold cross-validation, every case in one test fold, `validation`",
        "empty so that `covid-monai train` holds out a fifth of `training`), for the subsets "
        + ", ".join(f"`{s}`" for s in SUBSETS if s in splits)
        + ".",
        "The slices' patients are not published: slice-level splits may put slices of one patient on both sides.",
        "",
    ]
    columns = {
        "source": lambda e: str(e["source"]),
        "shape": CASE_COLUMNS["shape"],
        "source values": CASE_COLUMNS["source values"],
        "infection voxels": lambda e: str(e["infection_voxels"]),
        "GGO / consolidation / effusion voxels": lambda e: " / ".join(str(e["class_voxels"][c]) for c in "123"),
    }
    lines += cases_section(entries, failed, columns)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns 0 when every case was prepared, 1 otherwise (2 for usage errors)."""
    parser = argparse.ArgumentParser(
        description="Prepare the MedSeg COVID-19 CT segmentation dataset (100 slices, 9 volumes) as images/, "
        "labels/, classes/ and datalists."
    )
    add_common_arguments(parser, None)
    parser.add_argument(
        "--subset", choices=(*SUBSETS, "all"), default="all", help="which set to prepare (default: all)"
    )
    args = parser.parse_args(argv)
    checksums = parse_checksum_args(args.checksum, parser)
    setup_logging()
    subsets = SUBSETS if args.subset == "all" else (args.subset,)
    try:
        result = prepare(args.source, args.out, checksums, args.downloads, args.seed, args.overwrite, subsets)
    except DatasetError as exc:
        log.error("%s", exc)
        return 1
    ok = not result["failed"] and all(s in result["splits"] for s in subsets)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers of the dataset scripts: verified, resumable downloads; safe zip extraction; atomic writes; splits.

A dataset script declares the files it needs as :class:`RemoteFile` entries and calls :func:`obtain` for each one with
the user's ``--source``, which is one of

- a base URL (``https://zenodo.org/records/3757476/files``): the file is downloaded to ``<downloads>/<name>`` through
  ``<name>.part`` with HTTP Range requests, so an interrupted download resumes where it stopped (in the same run after
  a dropped connection, or on the next run);
- a local mirror folder, or a ``file://`` URL of one: the file is used in place (nothing is copied); a folder that
  holds the archive already extracted (``Infection_Mask/`` instead of ``Infection_Mask.zip``) is used as is.

Every file with a known checksum (MD5 or SHA-256) is verified; on a mismatch the file is refused with a message naming
both digests, and a download keeps its ``.part`` file (delete it to start over). Zip archives are extracted with
:func:`extract_zip`, which refuses members that would land outside the target folder (absolute paths, ``..``,
symbolic links). Prepared volumes and datalists are written atomically: a temporary file in the same folder, then
``os.replace``.

Example:
    >>> from scripts.datasets import RemoteFile, obtain, extract_zip
    >>> path = obtain("https://zenodo.org/records/3757476/files", RemoteFile("Lung_Mask.zip"), Path("downloads"))
    >>> extract_zip(path, Path("raw/Lung_Mask"))
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import random
import re
import shutil
import stat
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.error import HTTPError
from urllib.parse import quote, urlparse
from urllib.request import Request, url2pathname, urlopen

import nibabel as nib
import numpy as np

from covid_monai.io import NIFTI_SUFFIXES, atomic_path, atomic_write_text, nifti_stem  # noqa: F401 - re-exported

__all__ = [
    "ChecksumError",
    "DatasetError",
    "RemoteFile",
    "UnsafeArchiveError",
    "atomic_path",
    "atomic_write_json",
    "atomic_write_text",
    "download",
    "extract_zip",
    "file_digest",
    "find_nifti",
    "header_with_affine",
    "is_windowed",
    "kfold_groups",
    "load_nifti",
    "nifti_stem",
    "CASE_COLUMNS",
    "cases_section",
    "obtain",
    "parse_checksum",
    "read_mask",
    "run_cases",
    "split_fractions",
    "verify_file",
    "write_split_datalists",
]

log = logging.getLogger("covid_monai.scripts")

SEED_FRACTIONS = (0.7, 0.2, 0.1)  # the seed study's train / validation / test split
_DIGEST_LENGTHS = {"md5": 32, "sha256": 64}


class DatasetError(RuntimeError):
    """A source, download, archive or case that cannot be used; the message names the file and what is wrong."""


class ChecksumError(DatasetError):
    """A file whose size or digest differs from the expected one."""


class UnsafeArchiveError(DatasetError):
    """An archive member that would be written outside the extraction folder."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset's distribution.

    Args:
        name: file name at the source (``COVID-19-CT-Seg_20cases.zip``).
        size: size in bytes, or ``None`` when not recorded yet.
        checksum: ``"md5:<hex>"`` or ``"sha256:<hex>"``, or ``None`` when not recorded yet (the file is then used
            unverified, with a warning).
        required: whether the dataset script needs it (optional files are fetched only when asked for).
        note: what the file holds.

    Example:
        >>> RemoteFile("Lung_Mask.zip", checksum="md5:0123456789abcdef0123456789abcdef", note="lung masks")
    """

    name: str
    size: int | None = None
    checksum: str | None = None
    required: bool = True
    note: str = ""


# ----------------------------------------------------------------------------------------------------------- checksums
def parse_checksum(spec: str) -> tuple[str, str]:
    """Split a checksum into ``(algorithm, hex digest)``.

    Args:
        spec: ``"md5:<32 hex>"``, ``"sha256:<64 hex>"``, or a bare digest (32 hex digits: MD5, 64: SHA-256).

    Example:
        >>> parse_checksum("d41d8cd98f00b204e9800998ecf8427e")
        ('md5', 'd41d8cd98f00b204e9800998ecf8427e')
    """
    text = spec.strip().lower()
    algo, _, digest = text.rpartition(":")
    if not algo:
        algo = {32: "md5", 64: "sha256"}.get(len(digest), "")
    if algo not in _DIGEST_LENGTHS or len(digest) != _DIGEST_LENGTHS[algo] or not re.fullmatch(r"[0-9a-f]+", digest):
        raise ValueError(f"checksum {spec!r}: expected 'md5:<32 hex digits>' or 'sha256:<64 hex digits>'")
    return algo, digest


def file_digest(path: str | os.PathLike, algo: str = "sha256", chunk_size: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks.

    Args:
        path: the file.
        algo: ``"md5"`` or ``"sha256"``.
        chunk_size: bytes per read.

    Example:
        >>> file_digest("downloads/Lung_Mask.zip", "md5")
    """
    hasher = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            hasher.update(block)
    return hasher.hexdigest()


def verify_file(path: str | os.PathLike, checksum: str | None = None, size: int | None = None, hint: str = "") -> None:
    """Check a file's size and digest; without either, log that it is used unverified.

    Args:
        path: the file.
        checksum: ``"md5:<hex>"`` / ``"sha256:<hex>"`` / bare digest, or ``None``.
        size: expected size in bytes, or ``None``.
        hint: what to do about a mismatch, appended to the error message.

    Raises:
        ChecksumError: naming the file, the expected and the actual size or digest.

    Example:
        >>> verify_file("downloads/Lung_Mask.zip", "md5:0123456789abcdef0123456789abcdef")
    """
    path = Path(path)
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f"{path}: {actual_size} bytes, expected {size}{hint}")
    if checksum is None:
        log.warning("%s: no checksum recorded for this file, used unverified", path)
        return
    algo, expected = parse_checksum(checksum)
    actual = file_digest(path, algo)
    if actual != expected:
        raise ChecksumError(f"{path}: {algo} {actual} does not match the expected {expected}{hint}")
    log.info("%s: %s verified", path, algo)


# ----------------------------------------------------------------------------------------------------------- downloads
def download(
    url: str,
    dest: str | os.PathLike,
    checksum: str | None = None,
    size: int | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
    backoff: float = 2.0,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming with HTTP Range requests, then verify it.

    A ``.part`` file left by an interrupted run is continued from its current size (``Range: bytes=N-``); a server
    that ignores the range (status 200) sends the whole file again, which replaces the ``.part``. A dropped
    connection is retried ``retries`` times, each time resuming. Only a verified file gets its final name; on a
    checksum mismatch the ``.part`` is kept (so nothing is fetched twice by mistake) and the error says so.

    Args:
        url: the file's URL (``http``, ``https``; ``file`` works too but without resuming).
        dest: final path; its folder is created.
        checksum: ``"md5:<hex>"``/``"sha256:<hex>"``, or ``None`` to skip digest verification (with a warning).
        size: expected size in bytes, or ``None``.
        retries: reconnections after a failure before giving up.
        timeout: socket timeout in seconds.
        chunk_size: bytes per read.
        backoff: seconds to wait before the first retry (doubled each time, at most 30 s).

    Returns:
        ``dest``.

    Raises:
        ChecksumError: the complete file does not match (the ``.part`` is kept).
        DatasetError: HTTP error, or still interrupted after the retries (the ``.part`` is kept for the next run).

    Example:
        >>> download("https://zenodo.org/records/3757476/files/Lung_Mask.zip", "downloads/Lung_Mask.zip")
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        verify_file(dest, checksum, size, hint=f"; delete {dest} to download it again")
        log.info("%s: already downloaded", dest)
        return dest
    part = dest.with_name(dest.name + ".part")
    failures = 0
    while True:
        try:
            _fetch_into(url, part, size, timeout, chunk_size)
            break
        except HTTPError as exc:
            if exc.code < 500 and exc.code not in (408, 429):
                raise DatasetError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
            error: Exception = exc
        except (OSError, http.client.HTTPException) as exc:
            error = exc
        failures += 1
        kept = part.stat().st_size if part.exists() else 0
        if failures > retries:
            raise DatasetError(
                f"{url}: download interrupted ({error}); {kept} bytes kept in {part}, run again to resume"
            ) from error
        wait = min(backoff * 2 ** (failures - 1), 30.0)
        log.warning("%s: %s; resuming from byte %d in %.0f s (retry %d/%d)", url, error, kept, wait, failures, retries)
        time.sleep(wait)
    verify_file(part, checksum, size, hint=f"; the download is kept in {part}: delete it to download again")
    os.replace(part, dest)
    log.info("%s: downloaded (%d bytes)", dest, dest.stat().st_size)
    return dest


def _fetch_into(url: str, part: Path, size: int | None, timeout: float, chunk_size: int) -> None:
    """Append the rest of ``url`` to ``part`` (one HTTP request); raise ``ConnectionError`` when cut short."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        log.warning("%s: larger than the expected %d bytes, downloading again", part, size)
        part.unlink()
        offset = 0
    if size is not None and offset == size:
        return  # complete: verified by the caller
    headers = {"User-Agent": "covid-monai-dataset-scripts", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as exc:
        if exc.code == 416 and offset:  # nothing after byte `offset`: the .part already holds the whole file
            return
        raise
    with response:
        status = getattr(response, "status", None)
        if offset and status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                raise DatasetError(f"{url}: asked for bytes from {offset}, the server sent from {start}")
            mode = "ab"
            log.info("%s: resuming at byte %d", url, offset)
        else:
            if offset:
                log.info("%s: the server ignored the Range request; downloading from the start", url)
            mode, offset = "wb", 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        received = 0
        step = 100 << 20  # a progress line every 100 MiB
        with open(part, mode) as f:
            while block := response.read(chunk_size):
                f.write(block)
                received += len(block)
                if received // step != (received - len(block)) // step:
                    total = f" of {(offset + expected) >> 20}" if expected is not None else ""
                    log.info("%s: %d%s MiB", part.name, (offset + received) >> 20, total)
    if expected is not None and received < expected:
        raise ConnectionError(f"connection closed after {offset + received} bytes, {expected - received} missing")


def _content_range_start(value: str) -> int | None:
    match = re.match(r"\s*bytes\s+(\d+)-", value)
    return int(match.group(1)) if match else None


def source_location(source: str) -> str | Path:
    """A ``--source`` as a base URL (``str``) or a local folder (``Path``; ``file://`` URLs become paths).

    Example:
        >>> source_location("file:///data/mirror")
        PosixPath('/data/mirror')
    """
    parsed = urlparse(source)
    if parsed.scheme in ("http", "https"):
        return source.rstrip("/")
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:
        raise DatasetError(f"--source {source}: use an http(s):// URL, a file:// URL or a local folder")
    return Path(source).expanduser()


def obtain(source: str, remote: RemoteFile, downloads: str | os.PathLike, checksum: str | None = None) -> Path:
    """The local path of one dataset file: downloaded and verified, or found (and verified) in a local mirror.

    Args:
        source: base URL, local folder, or ``file://`` URL of a folder.
        remote: the file; its ``checksum`` and ``size`` are verified when known.
        downloads: folder for downloads from a URL.
        checksum: overrides ``remote.checksum`` (e.g. given on the command line).

    Returns:
        The file; for a folder source without ``X.zip`` but with an ``X/`` folder, that (extracted) folder.

    Raises:
        DatasetError: not found, HTTP error, interrupted download; ``ChecksumError`` on a mismatch.

    Example:
        >>> obtain("/mnt/mirror/covid19", RemoteFile("Infection_Mask.zip"), "downloads")
        PosixPath('/mnt/mirror/covid19/Infection_Mask.zip')
    """
    expected = checksum or remote.checksum
    location = source_location(source)
    if isinstance(location, str):
        return download(f"{location}/{quote(remote.name)}", Path(downloads) / remote.name, expected, remote.size)
    if not location.is_dir():
        raise DatasetError(f"--source {location}: no such folder")
    path = location / remote.name
    if path.is_file():
        verify_file(path, expected, remote.size, hint=f"; replace {path} with an intact copy")
        return path
    extracted = location / remote.name[: -len(".zip")] if remote.name.lower().endswith(".zip") else None
    if extracted is not None and extracted.is_dir():
        log.info("%s: using the extracted folder as is (checksums cover archives only)", extracted)
        return extracted
    raise DatasetError(f"{path}: not in the source folder (nor an extracted {remote.name[:-4]}/ folder)")


# ---------------------------------------------------------------------------------------------------------- archives
def _member_path(info: zipfile.ZipInfo, archive: Path) -> PurePosixPath:
    """The safe relative path of an archive member; raise for anything that would escape the target folder."""
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    mode = info.external_attr >> 16
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in path.parts:
        raise UnsafeArchiveError(f"{archive}: member {info.filename!r} points outside the extraction folder; refused")
    if stat.S_ISLNK(mode):
        raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symbolic link; refused")
    return path


def extract_zip(archive: str | os.PathLike, dest: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> Path:
    """Extract a zip archive into ``dest`` safely and atomically; a finished extraction is reused.

    Every member is checked before anything is written: absolute paths, drive letters, ``..`` components and
    symbolic links are refused (zip-slip). Members go to a temporary folder beside ``dest`` that is renamed to
    ``dest`` when complete, so an interrupted extraction never looks finished. macOS resource forks
    (``__MACOSX/``, ``._*``) are skipped.

    Args:
        archive: the zip file.
        dest: the folder to create.
        keep: optional filter on member names (``/``-separated); only members it accepts are extracted.

    Returns:
        ``dest``.

    Raises:
        UnsafeArchiveError: a member would escape ``dest`` (nothing is extracted).
        DatasetError: not a zip file.

    Example:
        >>> extract_zip("downloads/Lung_Mask.zip", "raw/Lung_Mask")
        PosixPath('raw/Lung_Mask')
    """
    archive, dest = Path(archive), Path(dest)
    if (dest / ".complete").is_file():
        return dest
    if dest.exists():
        raise DatasetError(f"{dest}: exists but is not an extraction made by this script; move it away first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"{archive}: not a valid zip archive ({exc})") from exc
    with zf:
        members = [(info, _member_path(info, archive)) for info in zf.infolist()]
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        try:
            root = tmp.resolve()
            for info, rel in members:
                if info.is_dir() or _is_junk(rel) or (keep is not None and not keep(str(rel))):
                    continue
                target = tmp.joinpath(*rel.parts)
                if not target.resolve().is_relative_to(root):
                    raise UnsafeArchiveError(f"{archive}: member {info.filename!r} escapes the folder; refused")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            (tmp / ".complete").write_text(f"extracted from {archive.name}\n")
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("%s: extracted to %s", archive, dest)
    return dest


def _is_junk(path: PurePosixPath) -> bool:
    return "__MACOSX" in path.parts or any(part.startswith("._") for part in path.parts)


# ----------------------------------------------------------------------------------------------------------- NIfTI
def find_nifti(root: str | os.PathLike) -> list[Path]:
    """NIfTI files (``.nii``, ``.nii.gz``) under ``root``, recursively, sorted; hidden files and macOS forks skipped.

    Example:
        >>> find_nifti("raw/Infection_Mask")[:1]
        [PosixPath('raw/Infection_Mask/coronacases_001.nii.gz')]
    """
    root = Path(root)
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or _is_junk(PurePosixPath(rel.as_posix())):
            continue
        if path.name.lower().endswith(NIFTI_SUFFIXES) and path.is_file():
            found.append(path)
    return sorted(found)


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load a NIfTI file as a ``Nifti1Image`` (header read, voxels on demand).

    Raises:
        DatasetError: the file cannot be read, naming it.

    Example:
        >>> load_nifti("raw/Lung_Mask/coronacases_001.nii.gz").shape
    """
    try:
        image = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one line naming the file
        raise DatasetError(f"{path}: cannot be read as NIfTI ({' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(image, nib.Nifti1Image):
        image = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine)
    return image


def read_array(image: nib.Nifti1Image, path: str | os.PathLike = "") -> np.ndarray:
    """The voxels of a loaded image (scaled by ``scl_slope``/``scl_inter`` when set), as ``float32`` when scaled.

    Raises:
        DatasetError: the voxel data is truncated or corrupt.
    """
    try:
        return np.asanyarray(image.dataobj)
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"{path}: voxel data cannot be read ({' '.join(str(exc).split())[:200]})") from exc


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically, indented.

    Example:
        >>> atomic_write_json("out/datalist.json", {"training": [], "validation": [], "test": []})
    """
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def header_with_affine(reference: nib.Nifti1Image, affine: np.ndarray, shape: Sequence[int]) -> nib.Nifti1Header:
    """The reference's header for another grid: ``shape`` and ``affine`` (e.g. one slice cut from a stack), written
    as qform and sform with the reference's codes (``1``, scanner, where the reference had none).

    Pass it as the ``reference`` of :func:`covid_monai.io.save_nifti_like`.

    Example:
        >>> save_nifti_like(label, "out/labels/slice_001.nii.gz", reference=header_with_affine(stack, a, label.shape))
    """
    header = reference.header.copy()
    header.set_data_shape(tuple(int(s) for s in shape))
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if qcode == 0 and scode == 0:
        qcode = scode = 1
    header.set_qform(affine, qcode if qcode else None)
    if qcode == 0:
        header["qform_code"] = 0
    header.set_sform(affine, scode if scode else None)
    if scode == 0:
        header["sform_code"] = 0
    return header


def hu_dtype(array: np.ndarray) -> Any:
    """``int16`` when every value is a whole number in int16's range (CT in HU), else ``float32``.

    Example:
        >>> hu_dtype(np.array([-1024.0, 40.0]))
        <class 'numpy.int16'>
    """
    if np.issubdtype(array.dtype, np.integer):
        whole = True
    else:
        whole = bool(np.all(np.isfinite(array))) and bool(np.all(array == np.round(array)))
    if whole and array.size and array.min() >= -32768 and array.max() <= 32767:
        return np.int16
    return np.float32


def same_geometry(a: nib.Nifti1Image, b: nib.Nifti1Image, atol: float = 1e-3) -> str | None:
    """``None`` when two images share shape (first 3 dimensions) and affine within ``atol`` mm, else why not."""
    if tuple(a.shape[:3]) != tuple(b.shape[:3]):
        return f"shape {tuple(b.shape)} differs from the image's {tuple(a.shape)}"
    diff = float(np.abs(a.affine - b.affine).max())
    if diff > atol:
        return f"affine differs from the image's (max difference {diff:.3g} mm)"
    return None


def spacing_of(image: nib.Nifti1Image) -> list[float]:
    """Voxel spacing (mm) of the first three axes, rounded to 4 decimals."""
    return [round(float(s), 4) for s in image.header.get_zooms()[:3]]


def is_windowed(data: np.ndarray) -> bool:
    """Whether a CT volume holds 0..255 values (windowed and rescaled to 8 bits) rather than HU.

    No CT in HU fits in 0..255: air is about -1000 HU.

    Example:
        >>> is_windowed(np.array([0, 17, 255])), is_windowed(np.array([-1024, 40, 1200]))
        (True, False)
    """
    return bool(data.size) and float(data.min()) >= 0.0 and float(data.max()) <= 255.0


def read_mask(path: str | os.PathLike, image: nib.Nifti1Image, what: str = "mask") -> np.ndarray:
    """A mask's voxels as rounded uint8, checked against its image.

    A different shape is an error; a different affine on the same voxel grid is reported as a warning and the mask is
    then written in the image's geometry by the caller (public masks were drawn on the image's voxels).

    Args:
        path: the mask file.
        image: its image.
        what: what the mask is, for messages.

    Raises:
        DatasetError: unreadable, or not the image's shape.

    Example:
        >>> labels = read_mask("raw/masks/study_0255_mask.nii.gz", image, "infection mask")
    """
    mask_image = load_nifti(path)
    problem = same_geometry(image, mask_image)
    if problem and problem.startswith("shape"):
        raise DatasetError(f"{path}: {what} {problem}")
    if problem:
        log.warning("%s: %s %s; written in the image's geometry (same voxel grid)", path, what, problem)
    data = read_array(mask_image, path)
    data = data.reshape(data.shape[:3]) if data.ndim > 3 else data
    return np.clip(np.rint(data), 0, 255).astype(np.uint8)


def run_cases(
    out: str | os.PathLike,
    jobs: Mapping[str, tuple[Sequence[Path], Callable[[], dict[str, Any]]]],
    about: Mapping[str, Any],
    overwrite: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Prepare cases one at a time, recording each in ``out/manifest.json``, so an interrupted run resumes.

    A case whose outputs all exist and which the manifest records is skipped (unless ``overwrite``). A case that
    fails is logged as one error line and the others go on.

    Args:
        out: the dataset folder.
        jobs: ``{case: (output files, function writing them and returning the case's manifest entry)}``.
        about: dataset-level fields of the manifest (``dataset``, ``source``).
        overwrite: redo finished cases.

    Returns:
        ``(entries, failed)``: manifest entries of the prepared cases, and ``{case: reason}``.

    Example:
        >>> entries, failed = run_cases("out", {"a": ([Path("out/images/a.nii.gz")], lambda: {"shape": [2, 2, 1]})},
        ...                             {"dataset": "demo"})
    """
    manifest_path = Path(out) / "manifest.json"
    try:
        old = json.loads(manifest_path.read_text()).get("cases", {}) if manifest_path.is_file() else {}
    except ValueError:
        old = {}
    recorded = {case: entry for case, entry in old.items() if case in jobs}
    entries: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for case in sorted(jobs):
        outputs, job = jobs[case]
        if not overwrite and case in recorded and all(Path(p).is_file() for p in outputs):
            entries[case] = recorded[case]
            log.info("%s: prepared earlier, skipped (--overwrite redoes it)", case)
            continue
        try:
            entry = job()
        except DatasetError as exc:
            failed[case] = str(exc)
        except Exception as exc:  # noqa: BLE001 - one line per bad case, and the others go on
            failed[case] = f"{case}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        else:
            entries[case] = recorded[case] = entry
            atomic_write_json(manifest_path, {**about, "cases": recorded})
            log.info("%s: prepared", case)
            continue
        log.error("%s", failed[case])
        recorded.pop(case, None)
    atomic_write_json(manifest_path, {**about, "cases": entries})
    return entries, failed


# ------------------------------------------------------------------------------------------------------------ splits
def _shuffled(cases: Sequence[str], seed: int, strata: Mapping[str, str] | None) -> list[list[str]]:
    """Cases grouped by stratum (sorted stratum names), each group sorted then shuffled with ``seed``."""
    groups: dict[str, list[str]] = {}
    for case in sorted(cases):
        groups.setdefault(strata.get(case, "") if strata else "", []).append(case)
    rng = random.Random(seed)
    out = []
    for key in sorted(groups):
        group = groups[key]
        rng.shuffle(group)
        out.append(group)
    return out


def kfold_groups(
    cases: Sequence[str], k: int = 5, seed: int = 0, strata: Mapping[str, str] | None = None
) -> list[list[str]]:
    """Deal cases into ``k`` disjoint folds of (nearly) equal size, stratified, seeded.

    Each stratum is shuffled and dealt in turn, continuing round the folds, so every fold gets its share of each
    stratum (e.g. 2 coronacases + 2 Radiopaedia cases in each of 5 folds of COVID-19-CT-Seg).

    Args:
        cases: case names.
        k: number of folds.
        seed: random seed.
        strata: optional case -> stratum name.

    Returns:
        ``k`` sorted lists; every case is in exactly one.

    Example:
        >>> kfold_groups([f"c{i}" for i in range(10)], k=5, seed=0)[0]
    """
    if len(cases) < k:
        raise ValueError(f"{len(cases)} cases cannot fill {k} folds")
    folds: list[list[str]] = [[] for _ in range(k)]
    i = 0
    for group in _shuffled(cases, seed, strata):
        for case in group:
            folds[i % k].append(case)
            i += 1
    return [sorted(fold) for fold in folds]


def split_fractions(
    cases: Sequence[str],
    fractions: Sequence[float] = SEED_FRACTIONS,
    seed: int = 0,
    strata: Mapping[str, str] | None = None,
) -> list[list[str]]:
    """Split cases by fractions (largest-remainder rounding within each stratum), seeded.

    Args:
        cases: case names.
        fractions: shares of the parts (e.g. 0.7, 0.2, 0.1 for train / validation / test).
        seed: random seed.
        strata: optional case -> stratum name; each stratum is split by the same fractions.

    Returns:
        One sorted list per fraction; every case is in exactly one.

    Example:
        >>> [len(p) for p in split_fractions([f"c{i}" for i in range(20)])]
        [14, 4, 2]
    """
    total = float(sum(fractions))
    parts: list[list[str]] = [[] for _ in fractions]
    for group in _shuffled(cases, seed, strata):
        exact = [len(group) * f / total for f in fractions]
        counts = [int(x) for x in exact]
        order = sorted(range(len(fractions)), key=lambda j: (counts[j] - exact[j], j))
        for j in order[: len(group) - sum(counts)]:
            counts[j] += 1
        start = 0
        for j, n in enumerate(counts):
            parts[j].extend(group[start : start + n])
            start += n
    return [sorted(p) for p in parts]


def datalist_item(case: str, extra: Sequence[str] = ()) -> dict[str, str]:
    """``{"image": "images/<case>.nii.gz", "label": "labels/<case>.nii.gz", ...}``, relative to the dataset folder."""
    item = {"image": f"images/{case}.nii.gz", "label": f"labels/{case}.nii.gz"}
    item.update({key: f"{key}/{case}.nii.gz" for key in extra})
    return item


def make_datalist(
    training: Sequence[str], validation: Sequence[str] = (), test: Sequence[str] = (), extra: Sequence[str] = ()
) -> dict[str, list[dict[str, str]]]:
    """A Decathlon-style datalist with paths relative to the dataset folder (where the JSON is written).

    Example:
        >>> make_datalist(["a"], ["b"], ["c"])["validation"]
        [{'image': 'images/b.nii.gz', 'label': 'labels/b.nii.gz'}]
    """
    return {
        "training": [datalist_item(c, extra) for c in training],
        "validation": [datalist_item(c, extra) for c in validation],
        "test": [datalist_item(c, extra) for c in test],
    }


def write_split_datalists(
    out: str | os.PathLike,
    cases: Sequence[str],
    prefix: str = "datalist",
    seed: int = 0,
    strata: Mapping[str, str] | None = None,
    k: int = 5,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Write the seed's 70/20/10 split and a ``k``-fold 80/20 cross-validation as datalists in ``out``.

    Files (paths inside are relative to ``out``):

    - ``<prefix>_seed_70_20_10.json``: ``training`` 70 %, ``validation`` 20 %, ``test`` 10 %;
    - ``<prefix>_cv5_fold<i>.json``: ``training`` the other folds, ``test`` fold ``i``, ``validation`` empty
      (``covid-monai train`` then holds out a fifth of ``training`` for validation).

    Args:
        out: the dataset folder (``images/``, ``labels/``).
        cases: case names.
        prefix: file name prefix.
        seed: random seed of both splits.
        strata: optional case -> stratum, kept balanced in both splits.
        k: number of folds.
        extra: other per-case folders to list in each item (e.g. ``["lungs"]``).

    Returns:
        ``{"seed_70_20_10": {...}, "cv5_folds": [...]}`` with case names, for ``splits.json`` and the README.

    Example:
        >>> write_split_datalists("data/mosmed", [f"study_{i:04d}" for i in range(255, 305)], seed=0)
    """
    out = Path(out)
    train, val, test = split_fractions(cases, SEED_FRACTIONS, seed, strata)
    atomic_write_json(out / f"{prefix}_seed_70_20_10.json", make_datalist(train, val, test, extra))
    folds = kfold_groups(cases, k, seed, strata)
    for i, fold in enumerate(folds):
        rest = sorted(c for c in cases if c not in fold)
        atomic_write_json(out / f"{prefix}_cv5_fold{i}.json", make_datalist(rest, [], fold, extra))
    return {
        "seed_70_20_10": {"training": train, "validation": val, "test": test},
        "cv5_folds": [{"training": sorted(c for c in cases if c not in f), "test": f} for f in folds],
    }


# ------------------------------------------------------------------------------------------------ command-line bits
def add_common_arguments(parser: argparse.ArgumentParser, default_source: str | None) -> None:
    """``--source``, ``--out``, ``--downloads``, ``--checksum``, ``--seed``, ``--overwrite`` for a prepare script."""
    parser.add_argument(
        "--source",
        default=default_source,
        required=default_source is None,
        help="base URL, local mirror folder, or file:// URL holding the dataset's files"
        + (f" (default: {default_source})" if default_source else ""),
    )
    parser.add_argument("--out", required=True, type=Path, help="output dataset folder")
    parser.add_argument(
        "--downloads", type=Path, default=None, help="folder for downloaded files (default: OUT/downloads)"
    )
    parser.add_argument(
        "--checksum",
        action="append",
        default=[],
        metavar="NAME=HASH",
        help="expected checksum of a file, 'md5:<hex>' or 'sha256:<hex>' (repeatable; overrides the built-in table)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the splits (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="redo cases whose outputs exist")


def parse_checksum_args(values: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """``["NAME=HASH", ...]`` -> ``{NAME: HASH}``, each validated; a bad one is a usage error (exit 2)."""
    checksums = {}
    for value in values:
        name, sep, digest = value.partition("=")
        try:
            if not sep or not name:
                raise ValueError("expected NAME=HASH")
            parse_checksum(digest)
        except ValueError as exc:
            parser.error(f"--checksum {value}: {exc}")
        checksums[name] = digest
    return checksums


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def setup_logging() -> None:
    """Log plain message lines on stderr; warnings and errors prefixed with ``warning:``/``error:``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def _shape(entry: Mapping[str, Any]) -> str:
    return "x".join(map(str, entry["shape"]))


def _spacing(entry: Mapping[str, Any]) -> str:
    return " x ".join(f"{s:g}" for s in entry["spacing"])


def _source_values(entry: Mapping[str, Any]) -> str:
    low, high = entry["source_range"]
    return f"{low:g}..{high:g}"


CASE_COLUMNS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "shape": _shape,
    "spacing (mm)": _spacing,
    "source values": _source_values,
}
"""Columns every prepared dataset's README case table can show, by header."""


def cases_section(
    entries: Mapping[str, Mapping[str, Any]],
    failed: Mapping[str, str],
    columns: Mapping[str, Callable[[Mapping[str, Any]], str]],
) -> list[str]:
    """The README lines listing prepared cases (one table row each) and the cases that could not be prepared.

    Args:
        entries: per-case manifest entries.
        failed: case name -> reason.
        columns: table header -> function of a case's entry giving the cell text (see :data:`CASE_COLUMNS`).

    Returns:
        Markdown lines.

    Example:
        >>> cases_section({"a": {"shape": [2, 2, 1]}}, {}, {"shape": CASE_COLUMNS["shape"]})[-1]
        '| a | 2x2x1 |'
    """
    lines = ["## Cases", "", "| case | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for case, entry in sorted(entries.items()):
        lines.append(f"| {case} | " + " | ".join(cell(entry) for cell in columns.values()) + " |")
    if failed:
        lines += ["", "## Not prepared", ""] + [f"- {case}: {reason}" for case, reason in sorted(failed.items())]
    return lines

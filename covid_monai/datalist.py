"""Training datalists: pairing images with labels, splitting, and checking the data before training starts."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from covid_monai.io import atomic_write_text, is_nifti, nifti_stem

__all__ = [
    "DataCheckError",
    "build_datalist",
    "bundle_datalist",
    "check_bundle_training_data",
    "check_training_data",
    "pair_images_labels",
    "write_datalist",
]


class DataCheckError(ValueError):
    """Raised with every problem found in a training set, one per line."""


def pair_images_labels(data_dir: str | os.PathLike) -> list[dict[str, str]]:
    """Pair ``DIR/images/<case>.nii[.gz]`` with ``DIR/labels/<case>.nii[.gz]`` by case name.

    Args:
        data_dir: a folder with ``images/`` and ``labels/``.

    Returns:
        ``[{"image": path, "label": path}]`` sorted by case name (absolute paths).

    Raises:
        DataCheckError: listing folders missing, and images without labels or labels without images.
    """
    root = Path(data_dir)
    problems = [f"{root / sub}: folder missing" for sub in ("images", "labels") if not (root / sub).is_dir()]
    if problems:
        raise DataCheckError("\n".join(problems))
    images = {nifti_stem(p): p for p in sorted((root / "images").iterdir()) if is_nifti(p)}
    labels = {nifti_stem(p): p for p in sorted((root / "labels").iterdir()) if is_nifti(p)}
    problems += [f"{images[c]}: no label {root / 'labels' / c}.nii.gz" for c in sorted(set(images) - set(labels))]
    problems += [f"{labels[c]}: no image {root / 'images' / c}.nii.gz" for c in sorted(set(labels) - set(images))]
    if not images and not problems:
        problems.append(f"{root / 'images'}: no NIfTI images")
    if problems:
        raise DataCheckError("\n".join(problems))
    return [{"image": str(images[c].resolve()), "label": str(labels[c].resolve())} for c in sorted(images)]


def build_datalist(
    data: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[dict[str, str]]]:
    """A Decathlon-style datalist (``training`` and ``validation``) from a data folder or a datalist JSON.

    A folder is paired with :func:`pair_images_labels` and split at random (seeded) with at least one case on each
    side. A JSON file is read as is (relative paths resolved against its folder); without a ``validation`` list it
    is split the same way. A JSON file's ``unlabelled`` list (``{"image": path}`` items, for mean-teacher training)
    is kept.

    Args:
        data: ``images/``+``labels/`` folder, or a datalist JSON.
        val_fraction: share of cases held out for validation when splitting.
        seed: random seed of the split.

    Returns:
        ``{"training": [...], "validation": [...]}`` with absolute paths (and ``"unlabelled"`` when the JSON
        file has that list).
    """
    path = Path(data)
    unlabelled: dict[str, list[dict[str, str]]] = {}
    if path.is_file():
        try:
            document = json.loads(path.read_text())
        except ValueError as exc:
            raise DataCheckError(f"{path}: not a JSON datalist ({exc})") from exc
        if not isinstance(document, Mapping) or not isinstance(document.get("training"), list):
            raise DataCheckError(f"{path}: a datalist needs a 'training' list of {{'image', 'label'}} items")
        lists = {k: [_absolute(item, path.parent) for item in document.get(k, [])] for k in ("training", "validation")}
        if "unlabelled" in document:
            unlabelled["unlabelled"] = [_absolute(item, path.parent, ("image",)) for item in document["unlabelled"]]
        if lists["validation"]:
            return {**lists, **unlabelled}
        items = lists["training"]
    else:
        items = pair_images_labels(path)
    if len(items) < 2:
        raise DataCheckError(f"{data}: at least 2 labelled cases are needed (one to train, one to validate)")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction)))
    val = sorted(order[:n_val])
    return {
        "training": [items[i] for i in sorted(order[n_val:])],
        "validation": [items[i] for i in val],
        **unlabelled,
    }


def bundle_datalist(
    data_list_file: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    key: str,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> list[dict[str, str]]:
    """One list of a bundle's training data: from its datalist file when there is one, else found in ``dataset_dir``.

    With ``data_list_file`` present this is MONAI's ``load_decathlon_datalist`` (paths relative to ``dataset_dir``).
    Without it, the cases are ``dataset_dir/images`` paired with ``dataset_dir/labels`` by name, and a fifth of them
    (``val_fraction``, at least one) validate, chosen at random with ``seed``, as :func:`build_datalist` splits a
    folder; so ``python -m monai.bundle run --config_file configs/train.json --dataset_dir D`` trains from ``D`` as
    Model Zoo bundles do.

    Args:
        data_list_file: a Decathlon-style datalist JSON (it need not exist).
        dataset_dir: the data folder.
        key: ``"training"``, ``"validation"`` or ``"unlabelled"`` (images without labels for mean-teacher
            training, :mod:`covid_monai.consistency`: only from a datalist file, empty when it has none).
        seed: seed of the split.
        val_fraction: share of cases validating when the folder is split.

    Returns:
        ``[{"image": path, "label": path}]`` (``[{"image": path}]`` for ``"unlabelled"``).

    Raises:
        DataCheckError: neither a datalist file nor ``images/`` and ``labels/`` that pair up in ``dataset_dir``.

    Example:
        >>> bundle_datalist("configs/datalist.json", "/data/covid19_ct", "validation", seed=0)  # doctest: +SKIP
        [{'image': '/data/covid19_ct/images/case_3.nii.gz', 'label': '/data/covid19_ct/labels/case_3.nii.gz'}]
    """
    if key not in ("training", "validation", "unlabelled"):
        raise ValueError(f"datalist key {key!r}: use 'training', 'validation' or 'unlabelled'")
    if Path(data_list_file).is_file():
        from monai.data import load_decathlon_datalist

        if key == "unlabelled" and key not in json.loads(Path(data_list_file).read_text()):
            return []  # the one optional list
        return load_decathlon_datalist(str(data_list_file), data_list_key=key, base_dir=str(dataset_dir))
    try:
        return build_datalist(Path(dataset_dir), val_fraction=val_fraction, seed=seed).get(key, [])
    except DataCheckError as exc:
        message = f"no datalist file {data_list_file}, and no training data in {dataset_dir}:\n{exc}"
        raise DataCheckError(message) from exc


def _absolute(item: Mapping[str, Any], base: Path, keys: Sequence[str] = ("image", "label")) -> dict[str, str]:
    """The item's ``keys`` as absolute paths (relative ones resolved against ``base``)."""
    if not isinstance(item, Mapping) or any(k not in item for k in keys):
        raise DataCheckError(f"datalist item {item!r}: needs {' and '.join(repr(k) for k in keys)}")
    return {k: str((base / str(item[k])).resolve()) for k in keys}


def check_training_data(
    datalist: Mapping[str, Sequence[Mapping[str, str]]],
    label_values: Sequence[int] = (0, 1),
    atol: float = 1e-3,
    soft_labels: bool = False,
) -> None:
    """Check every training and validation case before training starts; report all problems together.

    Checks: files exist and load; image and label are 3D with the same shape and affine; label values within
    ``label_values``; the training set is not entirely empty of infection. The images of an ``unlabelled`` list
    (mean-teacher training) must exist, load and be 3D.

    Args:
        datalist: from :func:`build_datalist`.
        label_values: allowed label values (0 background, 1 infection; 255 is accepted and binarised by
            nothing, so it is reported).
        atol: tolerance on affine differences (mm).
        soft_labels: a label stored as floating point may also be a soft target (e.g. a teacher model's
            probability map): any value from the lowest to the highest of ``label_values`` (binary training).

    Raises:
        DataCheckError: one line per problem, each naming the case file.
    """
    problems: list[str] = []
    positives = 0
    for split, items in datalist.items():
        if split == "unlabelled":
            _check_unlabelled(items, problems)
            continue
        for item in items:
            image_path, label_path = Path(item["image"]), Path(item["label"])
            missing = [str(p) for p in (image_path, label_path) if not p.is_file()]
            if missing:
                problems += [f"{p}: file missing ({split})" for p in missing]
                continue
            loaded = [_load_or_report(p, problems) for p in (image_path, label_path)]
            if None in loaded:
                continue
            image, label = loaded
            label_data = np.asanyarray(label.dataobj)
            image_shape, label_shape = _shape3(image.shape), _shape3(label.shape)
            if image_shape is None:
                problems.append(f"{image_path}: not a 3D image (shape {image.shape})")
            if label_shape is None:
                problems.append(f"{label_path}: not a 3D label (shape {label.shape})")
            if image_shape and label_shape and image_shape != label_shape:
                problems.append(f"{label_path}: shape {label.shape} differs from its image {image.shape}")
            elif not np.allclose(image.affine, label.affine, atol=atol):
                problems.append(f"{label_path}: affine differs from its image's (max diff "
                                f"{np.abs(image.affine - label.affine).max():.3g} mm)")
            values = np.unique(label_data)
            if soft_labels and np.issubdtype(label.get_data_dtype(), np.floating):
                bad = [v for v in values.tolist() if not min(label_values) <= v <= max(label_values)]
            else:
                bad = [v for v in values.tolist() if v not in label_values]
            if bad:
                problems.append(f"{label_path}: label values {bad[:5]} outside the expected {list(label_values)}")
            if split == "training" and np.any(label_data > 0):
                positives += 1
    if datalist.get("training") and positives == 0 and not problems:
        problems.append("training set: no case has any infection voxel; nothing to learn")
    if problems:
        raise DataCheckError("\n".join(problems))


def check_bundle_training_data(
    datalist: Mapping[str, Sequence[Mapping[str, str]]], knobs: Mapping[str, Any] | None = None
) -> None:
    """:func:`check_training_data` with the label values that a bundle with these knobs trains on.

    ``labels: multiclass`` takes label maps 0/1/2; binary bundles take 0/1 masks or soft targets in [0, 1].

    Args:
        datalist: from :func:`build_datalist`.
        knobs: the bundle's top-level settings (only ``labels`` matters here).

    Raises:
        DataCheckError: listing every problem found.
    """
    multiclass = (knobs or {}).get("labels") == "multiclass"
    check_training_data(datalist, label_values=(0, 1, 2) if multiclass else (0, 1), soft_labels=not multiclass)


def _check_unlabelled(items: Sequence[Mapping[str, str]], problems: list[str]) -> None:
    """Add a problem for every unlabelled image that is missing, unreadable or not 3D."""
    for item in items:
        path = Path(item["image"])
        if not path.is_file():
            problems.append(f"{path}: file missing (unlabelled)")
            continue
        image = _load_or_report(path, problems)
        if image is not None and _shape3(image.shape) is None:
            problems.append(f"{path}: not a 3D image (shape {image.shape})")


def _load_or_report(path: Path, problems: list[str]) -> nib.Nifti1Image | None:
    """Load a NIfTI header and data proxy, or record why it cannot be read."""
    try:
        image = nib.load(str(path))
        np.asanyarray(image.dataobj)  # reads the voxels: a truncated or corrupt file fails here, not mid-training
        return image
    except Exception as exc:  # noqa: BLE001 - collected and reported with the file name
        problems.append(f"{path}: cannot be read ({' '.join(str(exc).split())[:200]})")
        return None


def _shape3(shape: Sequence[int]) -> tuple[int, ...] | None:
    """The 3D shape, allowing trailing singleton dimensions; ``None`` when the image is not 3D."""
    if len(shape) < 3 or any(int(s) != 1 for s in shape[3:]):
        return None
    return tuple(int(s) for s in shape[:3])


def write_datalist(datalist: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a datalist JSON atomically."""
    atomic_write_text(path, json.dumps(datalist, indent=2) + "\n")

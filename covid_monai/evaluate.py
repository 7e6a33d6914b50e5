"""Metrics per case with MONAI metrics, folder evaluation and summary tables.

Metrics (binary: infection vs everything else, computed on the whole volume):

* ``dice``, ``iou``: ``monai.metrics.DiceMetric`` / ``MeanIoU`` with ``ignore_empty=False``;
* ``accuracy`` (pixel accuracy), ``sensitivity``, ``specificity``: ``monai.metrics.ConfusionMatrixMetric``;
* ``hd95``: 95th-percentile symmetric Hausdorff distance in mm, ``monai.metrics.HausdorffDistanceMetric`` with
  ``percentile=95`` and the voxel spacing.

Empty masks (a case without infection is common):

=====================  ======  =====  ===========  ===========  =====
case                   dice    iou    sensitivity  specificity  hd95
=====================  ======  =====  ===========  ===========  =====
both empty             1.0     1.0    NaN          1.0          0.0
label empty, pred not  0.0     0.0    NaN          < 1          NaN
pred empty, label not  0.0     0.0    0.0          1.0          NaN
=====================  ======  =====  ===========  ===========  =====

NaN means "undefined" (sensitivity without positives in the label; a distance to an empty surface). MONAI itself
returns NaN for Dice/IoU with an empty label unless ``ignore_empty=False``, and NaN for HD95 when both are empty;
both are mapped as above. Summaries (mean, std, ...) are over the cases where a metric is defined, and the ``n`` row
says how many those are.

Multi-class masks (0 background, 1 ground glass, 2 consolidation; bundles with ``labels: multiclass``): the metrics
above are those of the union of the classes (infection), and ``dice_ggo`` and ``dice_consolidation``
(:data:`CLASS_METRICS`) follow, the Dice of each class on its own with the same empty-case conventions.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import ConfusionMatrixMetric, DiceMetric, HausdorffDistanceMetric, MeanIoU

from covid_monai.io import atomic_path

__all__ = [
    "CLASS_LABELS",
    "CLASS_METRICS",
    "METRICS",
    "SUMMARY_STATS",
    "SpacingHausdorffDistanceMetric",
    "compute_case_metrics",
    "evaluate_folders",
    "format_table",
    "write_metrics_tables",
]

METRICS = ("dice", "iou", "accuracy", "sensitivity", "specificity", "hd95")
"""Metric names, in the order of the CSV columns."""
CLASS_LABELS = {"ggo": 1, "consolidation": 2}
"""Labels of multi-class masks by class name: ground-glass opacity and consolidation."""
CLASS_METRICS = tuple(f"dice_{name}" for name in CLASS_LABELS)
"""Per-class columns of multi-class evaluations, after :data:`METRICS` (which then score the union)."""
SUMMARY_STATS = ("mean", "std", "median", "min", "max", "n")
"""Summary rows: statistics over the cases where the metric is defined; ``n`` is the number of those cases."""

_AFFINE_ATOL = 1e-4


class SpacingHausdorffDistanceMetric(HausdorffDistanceMetric):
    """``HausdorffDistanceMetric`` that reads the voxel spacing (mm) from the MetaTensor ``y_pred``.

    When no ``spacing`` keyword is given and ``y_pred`` is a MetaTensor, the spacing comes from its affine (one
    spacing per item of a collated batch), so an ignite ``IgniteMetricHandler`` (which calls the metric with lists of
    channel-first tensors and no keywords) reports distances in mm instead of voxels. Otherwise it behaves exactly
    like ``HausdorffDistanceMetric``.

    Args:
        args: as ``monai.metrics.HausdorffDistanceMetric``.
        kwargs: as ``monai.metrics.HausdorffDistanceMetric``.

    Example:
        >>> from monai.handlers import IgniteMetricHandler, from_engine
        >>> handler = IgniteMetricHandler(
        ...     metric_fn=SpacingHausdorffDistanceMetric(include_background=True, percentile=95),
        ...     output_transform=from_engine(["pred", "label"]),
        ... )
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if kwargs.get("spacing") is None and isinstance(y_pred, MetaTensor):
            spatial = y_pred.ndim - 2
            affine = y_pred.affine
            if affine.ndim == 3:  # collated batch: one affine per item
                spacing: Any = [affine_to_spacing(a, r=spatial).tolist() for a in affine]
            else:
                spacing = affine_to_spacing(affine, r=spatial).tolist()
            kwargs = {**kwargs, "spacing": spacing}
        return super()._compute_tensor(y_pred, y, **kwargs)


def _volume(array: Any, name: str) -> torch.Tensor:
    """(X, Y, Z) or (1, X, Y, Z) array -> the (X, Y, Z) tensor of its values."""
    t = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array.detach().cpu())
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise ValueError(f"{name} must be a 3D volume (or (1, X, Y, Z)), got shape {tuple(t.shape)}.")
    return t


def _binary_5d(array: Any, name: str) -> torch.Tensor:
    """(X, Y, Z) or (1, X, Y, Z) array -> float tensor (1, 1, X, Y, Z) of 0/1 (> 0 is foreground)."""
    return (_volume(array, name) > 0).to(torch.float32)[None, None]


def _class_dice(pred: Any, label: Any, classes: Mapping[str, int]) -> dict[str, float]:
    """``{"dice_<name>": Dice of (pred == value) and (label == value)}`` for every class, one MONAI call."""
    values = list(classes.values())
    y_pred = torch.stack([_volume(pred, "pred") == v for v in values]).to(torch.float32)[None]
    y = torch.stack([_volume(label, "label") == v for v in values]).to(torch.float32)[None]
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(y_pred, y)
    return {f"dice_{name}": float(d) for name, d in zip(classes, dice.reshape(-1).tolist(), strict=True)}


def _scalar(value: torch.Tensor) -> float:
    return float(value.reshape(-1)[0].item())


def compute_case_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    spacing: float | Sequence[float] = 1.0,
    classes: Mapping[str, int] | None = None,
) -> dict:
    """Dice, IoU, pixel accuracy, sensitivity, specificity and HD95 (mm) of one binary prediction.

    Both masks are binarised (> 0). See the module docstring for the values when a mask is empty
    (both empty: dice = iou = 1, hd95 = 0; one empty: dice = iou = 0, hd95 = NaN; no positives in the label:
    sensitivity = NaN). With ``classes`` (label maps, e.g. :data:`CLASS_LABELS`) the Dice of each class follows.

    Args:
        pred: predicted mask, 3D or ``(1, X, Y, Z)``.
        label: reference mask of the same shape.
        spacing: voxel size in mm along the array axes (one number for isotropic voxels).
        classes: ``{name: label value}``: also ``dice_<name>``, the Dice of ``pred == value`` and ``label == value``.

    Returns:
        dict ``{"dice", "iou", "accuracy", "sensitivity", "specificity", "hd95"}`` (then ``dice_<name>`` per class)
        of Python floats (NaN where undefined).

    Example:
        >>> p = np.zeros((4, 4, 4)); p[1:3, 1:3, 1:3] = 1
        >>> compute_case_metrics(p, p, spacing=(1.0, 1.0, 2.0))["dice"]
        1.0
    """
    y_pred, y = _binary_5d(pred, "pred"), _binary_5d(label, "label")
    if y_pred.shape != y.shape:
        raise ValueError(f"pred shape {tuple(y_pred.shape[2:])} differs from label shape {tuple(y.shape[2:])}.")
    spacing_list = [float(spacing)] * 3 if np.isscalar(spacing) else [float(s) for s in spacing]  # type: ignore[arg-type]
    if len(spacing_list) != 3:
        raise ValueError(f"spacing must have 3 values, got {spacing}.")
    pred_empty, label_empty = not bool(y_pred.any()), not bool(y.any())

    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
    confusion = ConfusionMatrixMetric(
        include_background=True, metric_name=["accuracy", "sensitivity", "specificity"], reduction="none"
    )
    result = {"dice": _scalar(dice(y_pred, y)), "iou": _scalar(iou(y_pred, y))}
    confusion(y_pred, y)
    accuracy, sensitivity, specificity = (_scalar(v) for v in confusion.aggregate())
    result.update(accuracy=accuracy, sensitivity=sensitivity, specificity=specificity)
    if pred_empty and label_empty:
        result["hd95"] = 0.0
    elif pred_empty or label_empty:
        result["hd95"] = math.nan
    else:
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = _scalar(hd(y_pred, y, spacing=spacing_list))
        result["hd95"] = value if math.isfinite(value) else math.nan
    return {**{k: float(result[k]) for k in METRICS}, **(_class_dice(pred, label, classes) if classes else {})}


def _case_name(path: Path) -> str | None:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext) and not name.startswith("."):
            return name[: -len(ext)]
    return None


def _find(directory: Path, stem: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        path = directory / f"{stem}{ext}"
        if path.is_file():
            return path
    return None


def _write_csv_atomic(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write a CSV to a temporary file in the same folder, then rename it over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6f}"
    return str(value)


def _columns(rows: Sequence[dict]) -> list[str]:
    """The metric columns of the rows: :data:`METRICS`, then the per-class ones when the rows have them."""
    return [*METRICS, *(m for m in CLASS_METRICS if rows and m in rows[0])]


def _summarise(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {stat: {} for stat in SUMMARY_STATS}
    for metric in _columns(rows):
        values = np.array([r[metric] for r in rows], dtype=np.float64)
        values = values[np.isfinite(values)]
        n = int(values.size)
        summary["n"][metric] = n
        if n == 0:
            for stat in ("mean", "std", "median", "min", "max"):
                summary[stat][metric] = math.nan
            continue
        summary["mean"][metric] = float(values.mean())
        summary["std"][metric] = float(values.std(ddof=1)) if n > 1 else 0.0
        summary["median"][metric] = float(np.median(values))
        summary["min"][metric] = float(values.min())
        summary["max"][metric] = float(values.max())
    return summary


def evaluate_folders(
    pred_dir: str | os.PathLike,
    label_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    pred_suffix: str = "_infection",
    multiclass: bool | None = None,
) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Compare every label in ``label_dir`` with its prediction in ``pred_dir`` and summarise.

    ``label_dir/<case>.nii.gz`` (or ``.nii``) is paired with ``pred_dir/<case><pred_suffix>.nii.gz`` (or ``.nii``).
    Both are binarised (> 0). Each pair must have the same shape and affine (``atol=1e-4``); the voxel spacing for
    HD95 comes from the label's affine. Predictions without a label are ignored. Multi-class masks and labels
    (1 ground glass, 2 consolidation) also get the Dice of each class (:data:`CLASS_METRICS`) after the metrics of
    their union.

    Args:
        pred_dir: folder of predicted masks.
        label_dir: folder of reference masks.
        out_dir: when given, ``metrics.csv`` (one row per case: case, dice, iou, accuracy, sensitivity, specificity,
            hd95) and ``metrics_summary.csv`` (rows mean, std (sample, ddof=1), median, min, max, n; NaN values
            excluded) are written there, each atomically (temporary file + rename).
        pred_suffix: suffix of the prediction file names after the case name.
        multiclass: score the classes too; ``None`` (default): when ``pred_dir/labels.ctbl`` names label 2
            ``consolidation``, as ``covid-monai infer`` writes it for a multi-class bundle.

    Returns:
        ``(rows, summary)``: one dict per case (``case`` and the metrics, sorted by case) and
        ``summary[stat][metric]``.

    Raises:
        ValueError: no label found; predictions missing for some labels (all listed); a prediction whose shape or
            affine differs from its label's (naming the file and the mismatch).

    Example:
        >>> rows, summary = evaluate_folders("out/masks", "data/labels", out_dir="out")  # doctest: +SKIP
        >>> print(format_table(rows, summary))  # doctest: +SKIP
    """
    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    if multiclass is None:
        multiclass = _names_consolidation(pred_dir / "labels.ctbl")
    labels: dict[str, Path] = {}
    for path in sorted(label_dir.iterdir()) if label_dir.is_dir() else []:
        case = _case_name(path)
        if case is None or not path.is_file():
            continue
        if case in labels:
            raise ValueError(f"{path}: case '{case}' has two label files ({labels[case].name} and {path.name}).")
        labels[case] = path
    if not labels:
        raise ValueError(f"{label_dir}: no .nii.gz / .nii label files found.")
    pairs = {case: _find(pred_dir, f"{case}{pred_suffix}") for case in labels}
    missing = [case for case, path in pairs.items() if path is None]
    if missing:
        raise ValueError(
            f"{pred_dir}: no prediction '<case>{pred_suffix}.nii.gz' for {len(missing)} of {len(labels)} "
            f"label(s): {', '.join(missing)}"
        )

    rows: list[dict] = []
    for case, label_path in labels.items():
        pred_path = pairs[case]
        assert pred_path is not None
        label_img, pred_img = nib.load(label_path), nib.load(pred_path)
        if pred_img.shape != label_img.shape:
            raise ValueError(f"{pred_path}: shape {pred_img.shape} differs from label {label_path} {label_img.shape}.")
        if not np.allclose(pred_img.affine, label_img.affine, atol=_AFFINE_ATOL):
            diff = float(np.abs(pred_img.affine - label_img.affine).max())
            raise ValueError(
                f"{pred_path}: affine differs from label {label_path} (max abs difference {diff:.6g}):\n"
                f"prediction\n{np.array2string(pred_img.affine, precision=4)}\n"
                f"label\n{np.array2string(label_img.affine, precision=4)}"
            )
        pred, label = np.asanyarray(pred_img.dataobj), np.asanyarray(label_img.dataobj)
        if not multiclass:
            pred, label = pred > 0, label > 0
        spacing = affine_to_spacing(label_img.affine, suppress_zeros=False)[: label.ndim]
        rows.append({"case": case, **compute_case_metrics(pred, label, spacing, CLASS_LABELS if multiclass else None)})

    summary = _summarise(rows)
    if out_dir is not None:
        write_metrics_tables(rows, out_dir, summary)
    return rows, summary


def _names_consolidation(color_table: Path) -> bool:
    """Whether a 3D Slicer colour table names label 2 ``consolidation`` (the masks beside it are multi-class)."""
    try:
        lines = color_table.read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[:2] == ["2", "consolidation"] for line in lines if not line.startswith("#"))


def write_metrics_tables(
    rows: Sequence[dict], out_dir: str | os.PathLike, summary: dict[str, dict[str, float]] | None = None
) -> dict[str, dict[str, float]]:
    """Write ``metrics.csv`` (one row per case) and ``metrics_summary.csv`` (mean, std, median, min, max, n).

    Args:
        rows: per-case dicts with ``case`` and every metric of :data:`METRICS` (and of :data:`CLASS_METRICS`).
        out_dir: output folder (created); both files are written atomically.
        summary: precomputed summary; computed from ``rows`` when omitted.

    Returns:
        ``summary[stat][metric]``.
    """
    summary = summary or _summarise(rows)
    columns = _columns(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv_atomic(out / "metrics.csv", ["case", *columns], [[_fmt(r[k]) for k in ("case", *columns)] for r in rows])
    _write_csv_atomic(
        out / "metrics_summary.csv",
        ["statistic", *columns],
        [[stat, *(_fmt(summary[stat][m]) for m in columns)] for stat in SUMMARY_STATS],
    )
    return summary


def format_table(rows: Sequence[dict], summary: dict[str, dict[str, float]] | None = None) -> str:
    """Fixed-width text table of per-case metrics, followed by the summary rows.

    Args:
        rows: per-case dicts as returned by :func:`evaluate_folders`.
        summary: ``summary[stat][metric]`` as returned by :func:`evaluate_folders` (optional).

    Returns:
        The table as one string (no trailing newline); NaN is shown as ``-``.

    Example:
        >>> print(format_table([{"case": "a", "dice": 0.5, "iou": 1 / 3, "accuracy": 0.9, "sensitivity": 1.0,
        ...                      "specificity": 0.8, "hd95": float("nan")}]))
        case  dice    iou     accuracy  sensitivity  specificity  hd95
        a     0.5000  0.3333  0.9000    1.0000       0.8000       -
    """

    def cell(metric: str, value: Any) -> str:
        if metric == "n":
            return str(int(value))
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.2f}" if metric == "hd95" else f"{value:.4f}"

    columns = _columns(rows)
    table = [["case", *columns]]
    table += [[str(r["case"]), *(cell(m, r[m]) for m in columns)] for r in rows]
    n_cases = len(table)
    if summary:
        for stat in SUMMARY_STATS:
            if stat in summary:
                table.append([stat, *(cell("n" if stat == "n" else m, summary[stat][m]) for m in columns)])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table]
    if summary:
        lines.insert(n_cases, "-" * len(lines[0]))
    return "\n".join(lines)

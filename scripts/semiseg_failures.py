"""Where a cross-validated real-slice model fails: per-image Dice by lesion size and type, and the worst slices.

Reads a finished ``scripts/bench_semiseg.py`` run (``OUT/results.json``, the converted slices in ``OUT/nifti`` and each
fold's written masks in ``OUT/fold<k>/pred``) and the dataset's multi-class masks (``DATA/masks_multiclass``: 1 ground
glass, 2 consolidation) and writes into ``--out``:

* ``failures.json`` and ``failures.md``: the mean per-image mask Dice by lesion size (share of the slice's pixels that
  are infection) and by lesion type (ground glass or consolidation making up at least two thirds of the infection,
  else mixed), with the count of slices in each group;
* ``worst.png``: the ``--worst`` slices with the lowest mask Dice, one row each: the image, the doctor's mask and the
  written mask, each outline drawn over the image (green truth, red prediction).

Example:
    python scripts/semiseg_failures.py --run runs/semiseg --data ../shared/data/covid_semiseg/train --out docs/failures
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.convert_slices import read_class_labels  # noqa: E402

SIZE_BINS = ((0.0, 0.01, "< 1 %"), (0.01, 0.05, "1–5 %"), (0.05, 0.15, "5–15 %"), (0.15, 1.01, "≥ 15 %"))
"""Lesion size groups: the share of a slice's pixels that the doctor marked as infection."""


def lesion_type(classes: np.ndarray) -> str:
    """``ground glass`` or ``consolidation`` when that class is at least two thirds of the infection, else ``mixed``
    (``none`` without infection).

    Example:
        >>> lesion_type(np.array([0, 1, 1, 1, 2]))
        'ground glass'
    """
    ggo, consolidation = int((classes == 1).sum()), int((classes == 2).sum())
    total = ggo + consolidation
    if total == 0:
        return "none"
    if ggo >= 2 * total / 3:
        return "ground glass"
    if consolidation >= 2 * total / 3:
        return "consolidation"
    return "mixed"


def size_group(fraction: float) -> str:
    """The :data:`SIZE_BINS` label of an infected fraction of the slice."""
    return next(label for low, high, label in SIZE_BINS if low <= fraction < high)


def slice_rows(run: Path, data: Path) -> list[dict[str, Any]]:
    """One row per cross-validated slice: case, fold, mask Dice, infected fraction, size group and lesion type."""
    result = json.loads((run / "results.json").read_text())
    rows = []
    for image in result["per_image"]:
        label = np.asarray(nib.load(str(run / "nifti" / "labels" / f"{image['case']}.nii.gz")).dataobj)[:, :, 0] > 0
        classes_path = data / "masks_multiclass" / f"{image['case']}.png"
        classes = read_class_labels(classes_path).T if classes_path.is_file() else label.astype(np.uint8)
        fraction = float(label.mean())
        rows.append({"case": image["case"], "fold": image["fold"], "mask_dice": image["mask_dice"],
                     "infected_fraction": fraction, "size": size_group(fraction), "type": lesion_type(classes)})
    return rows


def group_table(rows: Sequence[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Mean and minimum mask Dice and the slice count per value of ``key``, in first-seen order of the groups."""
    order = list(dict.fromkeys(r[key] for r in rows))
    if key == "size":
        order = [label for _, _, label in SIZE_BINS if label in order]
    table = []
    for value in order:
        dice = [r["mask_dice"] for r in rows if r[key] == value]
        table.append({key: value, "slices": len(dice), "mean_dice": float(np.mean(dice)), "min_dice": float(min(dice))})
    return table


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def worst_picture(run: Path, rows: Sequence[dict[str, Any]], n: int, path: Path, height: int = 200) -> list[str]:
    """Draw the ``n`` lowest-Dice slices (image | truth | prediction, outlines over the image) into ``path``."""
    worst = sorted(rows, key=lambda r: r["mask_dice"])[:n]
    panels = []
    for row in worst:
        name = row["case"]
        image = np.asarray(nib.load(str(run / "nifti" / "images" / f"{name}.nii.gz")).dataobj)[:, :, 0].T
        truth = np.asarray(nib.load(str(run / "nifti" / "labels" / f"{name}.nii.gz")).dataobj)[:, :, 0].T > 0
        mask_path = run / f"fold{row['fold']}" / "pred" / f"{name}_infection.nii.gz"
        pred = np.asarray(nib.load(str(mask_path)).dataobj)[:, :, 0].T > 0
        grey = np.clip(image, 0, 255).astype(np.uint8)
        tiles = []
        for mask, colour in ((None, None), (truth, (0, 230, 0)), (pred, (255, 40, 40))):
            rgb = np.stack([grey] * 3, axis=-1)
            if mask is not None:
                rgb[_outline(mask)] = colour
            tile = Image.fromarray(rgb)
            tiles.append(tile.resize((max(1, round(tile.width * height / tile.height)), height)))
        row_image = Image.new("RGB", (sum(t.width for t in tiles) + 8 * len(tiles), height + 16), "white")
        x = 0
        for tile in tiles:
            row_image.paste(tile, (x, 16))
            x += tile.width + 8
        ImageDraw.Draw(row_image).text((2, 2), f"slice {name}: Dice {row['mask_dice']:.3f}, {row['type']}, "
                                                f"{100 * row['infected_fraction']:.1f} % infected", fill="black")
        panels.append(row_image)
    sheet = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    y = 0
    for panel in panels:
        sheet.paste(panel, (0, y))
        y += panel.height
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(64).save(path, optimize=True)  # a palette keeps the picture small for the docs
    return [r["case"] for r in worst]


def main(argv: Sequence[str] | None = None) -> int:
    """Write the tables and the picture; print the tables as Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished bench_semiseg.py output folder")
    parser.add_argument("--data", type=Path, required=True, help="the dataset folder (with masks_multiclass/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--worst", type=int, default=5, help="slices in worst.png (default 5)")
    args = parser.parse_args(argv)
    rows = slice_rows(args.run, args.data)
    by_size, by_type = group_table(rows, "size"), group_table(rows, "type")
    worst = worst_picture(args.run, rows, args.worst, args.out / "worst.png")
    lines = ["| infected share of the slice | slices | mean mask Dice | lowest |", "|---|---:|---:|---:|"]
    lines += [f"| {g['size']} | {g['slices']} | {g['mean_dice']:.3f} | {g['min_dice']:.3f} |" for g in by_size]
    lines += ["", "| dominant lesion type | slices | mean mask Dice | lowest |", "|---|---:|---:|---:|"]
    lines += [f"| {g['type']} | {g['slices']} | {g['mean_dice']:.3f} | {g['min_dice']:.3f} |" for g in by_type]
    markdown = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "failures.md").write_text(markdown)
    document = {"run": str(args.run), "by_size": by_size, "by_type": by_type, "worst": worst, "slices": rows}
    (args.out / "failures.json").write_text(json.dumps(document, indent=1) + "\n")
    print(markdown + f"worst slices: {', '.join(worst)} -> {args.out / 'worst.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

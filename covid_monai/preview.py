"""Quick-look PNG of a segmented scan: axial and coronal slices in lung window with the infection overlaid."""

from __future__ import annotations

import os

import numpy as np
from monai.data.utils import affine_to_spacing
from nibabel.orientations import apply_orientation, io_orientation

from covid_monai.io import atomic_path

__all__ = [
    "LUNG_WINDOW",
    "MULTICLASS_LABELS_TABLE",
    "SLICER_COLOR_TABLES",
    "render_preview",
    "save_preview",
    "slicer_color_tables",
]

LUNG_WINDOW = (-1350.0, 150.0)
"""HU range shown from black to white (level -600, width 1500)."""

SLICER_COLOR_TABLES = {
    "labels.ctbl": "# covid-monai infection mask labels (3D Slicer color table)\n"
    "0 background 0 0 0 0\n1 infection 230 60 40 255\n",
    "lungs.ctbl": "# covid-monai lung mask labels (3D Slicer color table)\n"
    "0 background 0 0 0 0\n1 left_lung 80 160 230 255\n2 right_lung 120 200 120 255\n",
}
"""3D Slicer colour tables naming the labels of the infection and lung masks, written beside the outputs."""

MULTICLASS_LABELS_TABLE = (
    "# covid-monai infection mask labels (3D Slicer color table)\n"
    "0 background 0 0 0 0\n1 ground_glass 250 200 60 255\n2 consolidation 200 40 40 255\n"
)
"""``labels.ctbl`` of a multi-class bundle's masks: 1 ground-glass opacity, 2 consolidation."""


def slicer_color_tables(multiclass: bool = False) -> dict[str, str]:
    """The colour tables to write beside masks: :data:`SLICER_COLOR_TABLES`, multi-class labels if ``multiclass``.

    Args:
        multiclass: the masks hold 1 ground glass and 2 consolidation (a bundle with ``labels: multiclass``).

    Returns:
        ``{file name: content}``.

    Example:
        >>> "2 consolidation" in slicer_color_tables(multiclass=True)["labels.ctbl"]
        True
    """
    return {**SLICER_COLOR_TABLES, "labels.ctbl": MULTICLASS_LABELS_TABLE} if multiclass else dict(SLICER_COLOR_TABLES)


def _to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder a volume to RAS array axes; returns it with its voxel sizes along those axes."""
    ornt = io_orientation(affine)
    spacing = affine_to_spacing(np.asarray(affine), suppress_zeros=False)
    return apply_orientation(array, ornt), spacing[ornt[:, 0].astype(int)]


def render_preview(
    image: np.ndarray, mask: np.ndarray, affine: np.ndarray, height: int = 256, n_axial: int = 3
) -> np.ndarray:
    """Compose axial slices and one coronal slice, radiological convention, infection in red.

    Axial slices are taken at the quartiles of the infection's extent along z (of the volume when there is no
    infection); the coronal slice through the infection's centre. Each panel is scaled to ``height`` pixels with
    the true physical aspect ratio. Patient's right is on the left of each panel, anterior / superior on top.

    Args:
        image: CT in HU, storage order ``(X, Y, Z)``.
        mask: infection mask of the same shape.
        affine: voxel-to-RAS affine of both.
        height: panel height in pixels.
        n_axial: number of axial panels.

    Returns:
        An RGB uint8 array ``(height, width, 3)``.

    Example:
        >>> rgb = render_preview(ct, mask, affine)
    """
    from PIL import Image

    ct, spacing = _to_ras(np.asarray(image, dtype=np.float32), affine)
    infection, _ = _to_ras(np.asarray(mask) > 0, affine)
    low, high = LUNG_WINDOW
    grey = np.clip((ct - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)
    if infection.any():
        zs = np.nonzero(infection.any(axis=(0, 1)))[0]
        ys = np.nonzero(infection.any(axis=(0, 2)))[0]
        z_picks = np.quantile(zs, np.linspace(0.2, 0.8, n_axial)).round().astype(int)
        y_pick = int(np.median(ys))
    else:
        z_picks = np.linspace(0.3, 0.7, n_axial) * (ct.shape[2] - 1)
        z_picks = z_picks.round().astype(int)
        y_pick = ct.shape[1] // 2
    panels = []
    for z in z_picks:  # rows: anterior at top; columns: patient's right on the left
        panels.append((grey[::-1, ::-1, z].T, infection[::-1, ::-1, z].T, spacing[1], spacing[0]))
    panels.append((grey[::-1, y_pick, ::-1].T, infection[::-1, y_pick, ::-1].T, spacing[2], spacing[0]))
    rendered = []
    for grey_2d, mask_2d, row_mm, col_mm in panels:
        rgb = np.repeat(grey_2d[..., None], 3, axis=2).astype(np.float32)
        rgb[mask_2d] = 0.45 * rgb[mask_2d] + 0.55 * np.array([230.0, 60.0, 40.0])
        rows, cols = grey_2d.shape
        width = max(1, int(round(height * (cols * col_mm) / max(rows * row_mm, 1e-6))))
        rendered.append(np.asarray(Image.fromarray(rgb.astype(np.uint8)).resize((width, height), Image.BILINEAR)))
    gap = np.zeros((height, 4, 3), dtype=np.uint8)
    parts = []
    for panel in rendered:
        parts += [panel, gap]
    return np.concatenate(parts[:-1], axis=1)


def save_preview(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """Write :func:`render_preview` as a PNG, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(render_preview(image, mask, affine)).save(tmp, format="PNG")

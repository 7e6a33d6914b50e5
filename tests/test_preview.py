"""Preview PNGs: radiological orientation, overlay, physical aspect ratio, atomic write."""

from __future__ import annotations

import numpy as np
from PIL import Image

from covid_monai.preview import SLICER_COLOR_TABLES, render_preview, save_preview


def _volume():
    image = np.full((40, 30, 10), -1000.0, dtype=np.float32)
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[30:38, 22:28, 3:7] = 1  # high x and high y: the patient's right, anterior
    return image, mask


def test_panels_follow_radiological_convention_and_aspect(tmp_path):
    image, mask = _volume()
    affine = np.diag([2.0, 2.0, 5.0, 1.0])  # RAS: +x towards the patient's right, +y anterior
    rgb = render_preview(image, mask, affine, height=60, n_axial=1)
    axial_width = int(round(60 * (40 * 2.0) / (30 * 2.0)))  # 80 mm wide, 60 mm high
    axial = rgb[:, :axial_width]
    red = (axial[..., 0] > 100) & (axial[..., 1] < 100)
    rows, cols = np.nonzero(red)
    # the lesion sits at the patient's right (+x) and anterior (+y): shown on the viewer's left, at the top
    assert cols.mean() < axial_width / 2 and rows.mean() < 30
    coronal_width = int(round(60 * (40 * 2.0) / (10 * 5.0)))
    assert rgb.shape == (60, axial_width + 4 + coronal_width, 3)


def test_storage_orientation_does_not_change_the_picture():
    image, mask = _volume()
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    flipped_affine = affine.copy()
    flipped_affine[0, 0], flipped_affine[0, 3] = -2.0, 78.0  # same world grid stored right-to-left
    a = render_preview(image, mask, affine, height=40)
    b = render_preview(image[::-1], mask[::-1], flipped_affine, height=40)
    np.testing.assert_array_equal(a, b)


def test_save_preview_and_color_tables(tmp_path):
    image, mask = _volume()
    save_preview(image, mask, np.eye(4), tmp_path / "case_preview.png")
    assert Image.open(tmp_path / "case_preview.png").format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["case_preview.png"]
    assert "1 infection" in SLICER_COLOR_TABLES["labels.ctbl"]
    assert "1 left_lung" in SLICER_COLOR_TABLES["lungs.ctbl"] and "2 right_lung" in SLICER_COLOR_TABLES["lungs.ctbl"]

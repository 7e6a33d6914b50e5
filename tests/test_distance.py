"""Distance transforms (covid_monai.distance) against scipy's and a brute-force definition."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from covid_monai.distance import nearest_label, squared_distance_to, within_distance


def _blobs(shape: tuple[int, ...], seed: int, fraction: float = 0.02) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.binary_dilation(rng.random(shape) < fraction, iterations=2)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 0.7, 2.5), (0.5, 0.9, 5.0)])
@pytest.mark.parametrize("threads", [1, 2])
def test_within_distance_matches_scipy(spacing: tuple[float, ...], threads: int) -> None:
    mask = _blobs((60, 50, 24), seed=3, fraction=0.002)
    reference = ndimage.distance_transform_edt(~mask, sampling=spacing)
    limits = [0.0, 3.0, 7.5, 30.0]
    for got, limit in zip(within_distance(mask, spacing, limits, threads=threads), limits, strict=True):
        np.testing.assert_array_equal(got, reference <= limit, err_msg=f"limit {limit} mm")
    squared = squared_distance_to(mask, spacing, threads=threads)
    np.testing.assert_allclose(np.sqrt(squared), reference, rtol=1e-5, atol=1e-4)


def test_within_distance_of_an_empty_mask_is_empty_and_squared_distance_refuses() -> None:
    empty = np.zeros((5, 6, 7), dtype=bool)
    assert not any(m.any() for m in within_distance(empty, (1, 1, 1), [1.0, 100.0]))
    with pytest.raises(ValueError, match="empty"):
        squared_distance_to(empty, (1, 1, 1))


def test_within_distance_takes_views_of_larger_arrays() -> None:
    mask = _blobs((40, 40, 40), seed=5, fraction=0.001)
    view = mask[5:30, ::2, 10:35]  # not contiguous
    reference = ndimage.distance_transform_edt(~view, sampling=(1.0, 2.0, 1.0)) <= 4.0
    np.testing.assert_array_equal(within_distance(view, (1.0, 2.0, 1.0), [4.0])[0], reference)


def test_nearest_label_is_the_label_of_the_closest_voxel_in_mm() -> None:
    rng = np.random.default_rng(0)
    labels = np.zeros((14, 12, 6), dtype=np.uint8)
    labels[rng.random(labels.shape) < 0.01] = 1
    labels[rng.random(labels.shape) < 0.01] = 2
    labels[0, 0, 0], labels[-1, -1, -1] = 1, 2
    spacing = (0.8, 1.1, 3.0)
    got = nearest_label(labels, spacing)
    points = np.argwhere(labels > 0) * spacing
    values = labels[labels > 0]
    for index in np.ndindex(labels.shape):
        d = ((points - np.asarray(index) * spacing) ** 2).sum(1)
        closest = set(values[np.isclose(d, d.min())])  # any label at the smallest distance is right
        assert got[index] in closest, index
    assert (got[labels > 0] == labels[labels > 0]).all()


def test_nearest_label_refuses_a_map_without_labels() -> None:
    with pytest.raises(ValueError, match="no voxel"):
        nearest_label(np.zeros((3, 3), dtype=np.uint8))

"""Slab-wise work on several threads: same results as one thread, in order, errors raised."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from scipy import ndimage

from covid_monai.lungs import _fill_holes_axial
from covid_monai.parallel import map_in_threads, map_slabs, worker_threads


def test_results_keep_order_and_use_several_threads() -> None:
    seen: set[str] = set()
    barrier = threading.Barrier(2, timeout=10)

    def work(i: int) -> int:
        seen.add(threading.current_thread().name)
        if i < 2:
            barrier.wait()  # only passes when two items run at the same time
        return i * i

    assert map_in_threads(work, range(7), threads=2) == [i * i for i in range(7)]
    assert len(seen) == 2


def test_one_thread_runs_in_the_caller() -> None:
    names = map_in_threads(lambda _: threading.current_thread().name, range(3), threads=1)
    assert names == [threading.current_thread().name] * 3


def test_first_error_is_raised() -> None:
    def work(i: int) -> int:
        if i == 3:
            raise ValueError("slab 3 failed")
        return i

    with pytest.raises(ValueError, match="slab 3 failed"):
        map_in_threads(work, range(6), threads=2)


def test_slabs_cover_the_range_once_in_order() -> None:
    covered = np.zeros(23, dtype=int)

    def mark(part: slice) -> tuple[int, int]:
        covered[part] += 1
        return part.start, part.stop

    assert map_slabs(mark, 23, 5, start=3, threads=2) == [(3, 8), (8, 13), (13, 18), (18, 23)]
    assert covered.tolist() == [0] * 3 + [1] * 20
    assert map_slabs(mark, 4, 0, threads=1) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # size < 1 means 1
    assert map_slabs(mark, 0, 8) == []


def test_worker_threads_follows_torch() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert worker_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_slab_hole_filling_equals_whole_volume() -> None:
    """Hole filling per slab (threads) = one in-plane labelling of the whole volume, slab edges included."""
    rng = np.random.default_rng(0)
    mask = rng.random((40, 36, 75)) > 0.35  # dense: many enclosed background voxels and some open ones
    expected = np.stack([ndimage.binary_fill_holes(mask[..., z]) for z in range(mask.shape[-1])], axis=-1)
    assert (expected != mask).any() and (~expected).any()  # holes to fill and background that stays
    for slab in (1, 8, 32, 100):
        np.testing.assert_array_equal(_fill_holes_axial(mask, slab=slab), expected)

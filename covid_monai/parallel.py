"""Run independent slab-wise numpy / scipy steps on several cores.

The full-resolution steps around the network (resampling, lung distance maps, closing, thresholding) work in slabs
of slices that are independent of each other. numpy's gathers and arithmetic and scipy.ndimage's transforms and
labelling release the GIL, so a thread pool runs slabs side by side without copying any array (the distance
transforms of :mod:`covid_monai.distance` hold it but use every thread themselves).
The number of threads follows PyTorch's (``torch.get_num_threads()``: the cores of this process, or what
``OMP_NUM_THREADS`` / ``torch.set_num_threads`` set), so one setting governs the whole pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["map_in_threads", "map_slabs", "worker_threads"]

Item = TypeVar("Item")
Result = TypeVar("Result")


def worker_threads() -> int:
    """Threads for slab-wise work: PyTorch's intra-op thread count (at least 1)."""
    return max(int(torch.get_num_threads()), 1)


def map_in_threads(
    function: Callable[[Item], Result], items: Iterable[Item], threads: int | None = None
) -> list[Result]:
    """``[function(item) for item in items]``, run on up to ``threads`` threads (default :func:`worker_threads`).

    Results keep the order of ``items``; the first exception raised by ``function`` is raised here. With one
    thread or one item everything runs in the calling thread. ``function`` must only write to places no other
    item writes to (e.g. its own slab of a shared output array).

    Example:
        >>> map_in_threads(lambda x: x * x, [1, 2, 3], threads=2)
        [1, 4, 9]
    """
    todo = list(items)
    threads = min(worker_threads() if threads is None else max(int(threads), 1), len(todo))
    if threads <= 1:
        return [function(item) for item in todo]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="covid-monai-slab") as pool:
        return list(pool.map(function, todo))


def map_slabs(
    function: Callable[[slice], Result], stop: int, size: int, start: int = 0, threads: int | None = None
) -> list[Result]:
    """:func:`map_in_threads` over consecutive slabs: ``function(slice(a, b))`` for slices of at most ``size`` that
    cover ``start`` to ``stop`` (e.g. the slices of an array's last axis).

    Example:
        >>> map_slabs(lambda part: (part.start, part.stop), 10, 4, threads=1)
        [(0, 4), (4, 8), (8, 10)]
    """
    size = max(int(size), 1)
    parts = [slice(first, min(first + size, stop)) for first in range(start, stop, size)]
    return map_in_threads(function, parts, threads)

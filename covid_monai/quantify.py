"""Per-case numbers from masks: infected volume, lesion count, lung volumes and % of lung involved.

Volumes come from the voxel volume |det(affine[:3, :3])| (mm³) / 1000, so they are right for any storage orientation,
anisotropic or oblique voxels, as long as ``affine`` is the masks' voxel-to-world affine in mm.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from covid_monai.parallel import map_slabs
from covid_monai.transforms import LEFT_LUNG, RIGHT_LUNG, bounding_box

__all__ = ["count_components", "quantify_case", "voxel_volume_ml"]

_COUNT_SLAB = 32  # slices of the last axis per counting step


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL: |det(affine[:3, :3])| mm³ / 1000.

    Args:
        affine: 4x4 (or 3x3) voxel-to-world affine in mm.

    Returns:
        The voxel volume in millilitres.

    Example:
        >>> voxel_volume_ml(np.diag([0.5, 0.5, 2.0, 1.0]))
        0.0005
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape not in ((4, 4), (3, 3)):
        raise ValueError(f"affine must be 4x4 or 3x3, got {affine.shape}.")
    return float(abs(np.linalg.det(affine[:3, :3])) / 1000.0)


def _squeeze_channel(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"{name} must be a 3D volume (or (1, X, Y, Z)), got shape {array.shape}.")
    return array


def quantify_case(
    infection: np.ndarray, affine: np.ndarray, lungs: np.ndarray | None = None
) -> dict[str, float | int | None]:
    """Infected volume, lesion count, lung volumes and percentage of lung involved for one case.

    What is counted:

    * ``voxel_ml``: volume of one voxel (mL), |det(affine[:3, :3])| / 1000;
    * ``infection_ml``: all voxels with ``infection > 0`` (inside the lungs or not) times ``voxel_ml``;
    * ``lesions``: number of 3D connected components of ``infection > 0`` with 26-connectivity (voxels touching by a
      face, an edge or a corner are one lesion); no size filter (remove small components before, e.g. with MONAI's
      ``RemoveSmallObjectsd``);
    * ``lung_left_ml`` / ``lung_right_ml``: voxels labelled 1 (left lung) / 2 (right lung) in ``lungs``, the
      COVID-19-CT-Seg convention written by :func:`covid_monai.transforms.lung_mask_from_hu`;
      ``lung_ml``: all voxels with ``lungs > 0`` (so a binary 0/1 lung mask counts as "left" plus total);
    * ``pct_left`` / ``pct_right`` / ``pct_lungs``: infected voxels inside that lung (both lungs) divided by the
      voxels of that lung (both lungs), times 100. Infection outside the lung mask is not in the percentages.

    Lung volumes are ``None`` when ``lungs`` is ``None``; a percentage is ``None`` when ``lungs`` is ``None`` or that
    lung has no voxel (never NaN).

    Args:
        infection: infection mask, 3D (or channel-first ``(1, X, Y, Z)``); any value > 0 is infection.
        affine: 4x4 voxel-to-world affine (mm) of the masks.
        lungs: optional lung mask of the same shape: 0 background, 1 left lung, 2 right lung.

    Returns:
        dict with keys ``voxel_ml``, ``infection_ml``, ``lesions``, ``lung_left_ml``, ``lung_right_ml``, ``lung_ml``,
        ``pct_left``, ``pct_right``, ``pct_lungs`` (floats, an int for ``lesions``, or ``None`` as above).

    Example:
        >>> inf = np.zeros((10, 10, 10), np.uint8); inf[2:4, 2:4, 2:4] = 1
        >>> lungs = np.zeros_like(inf); lungs[:5] = 1; lungs[5:] = 2
        >>> q = quantify_case(inf, np.diag([2.0, 2.0, 2.0, 1.0]), lungs)
        >>> round(q["infection_ml"], 6), q["lesions"], q["pct_left"], q["pct_right"]
        (0.064, 1, 1.6, 0.0)
    """
    inf = _squeeze_channel(infection, "infection")  # every step below looks at it slab by slab (> 0)
    if inf.dtype != bool and inf.dtype.kind != "u":  # signed or float values: only those > 0 are infection
        inf = inf > 0
    voxel_ml = voxel_volume_ml(affine)
    n_inf = int(np.count_nonzero(inf))
    lesions = count_components(inf) if n_inf else 0
    result: dict[str, float | int | None] = {
        "voxel_ml": voxel_ml,
        "infection_ml": n_inf * voxel_ml,
        "lesions": int(lesions),
        "lung_left_ml": None,
        "lung_right_ml": None,
        "lung_ml": None,
        "pct_left": None,
        "pct_right": None,
        "pct_lungs": None,
    }
    if lungs is None:
        return result
    lung = _squeeze_channel(lungs, "lungs")
    if lung.shape != inf.shape:
        raise ValueError(f"lungs shape {lung.shape} differs from infection shape {inf.shape}.")

    # voxels of each lung and infected voxels of each lung, counted slab by slab (side by side): slab-sized
    # temporaries only
    def count_slab(part: slice) -> np.ndarray:
        labels, infected = lung[..., part], inf[..., part] > 0
        regions = (labels == LEFT_LUNG, labels == RIGHT_LUNG, labels > 0)
        return np.array([np.count_nonzero(r) for r in regions] + [np.count_nonzero(r & infected) for r in regions])

    counts = sum(map_slabs(count_slab, lung.shape[-1], _COUNT_SLAB), np.zeros(6, dtype=np.int64))
    n_left, n_right, n_all, infected_left, infected_right, infected_all = (int(c) for c in counts)

    def pct(n: int, infected: int) -> float | None:
        return float(100.0 * infected / n) if n else None

    result["pct_left"] = pct(n_left, infected_left)
    result["pct_right"] = pct(n_right, infected_right)
    result["pct_lungs"] = pct(n_all, infected_all)
    result["lung_left_ml"] = n_left * voxel_ml
    result["lung_right_ml"] = n_right * voxel_ml
    result["lung_ml"] = n_all * voxel_ml
    return result


def count_components(mask: np.ndarray, slab: int = 64) -> int:
    """Number of 26-connected components of a 3D mask (any value > 0), counted slab by slab.

    Slabs of ``slab`` slices of the last axis are labelled side by side (:func:`map_slabs`), each inside its
    own bounding box, without a full-size copy of the mask; the components that continue across a slab face
    (26-connectivity: the 3x3 neighbours in the next slice) are joined with a union-find over the labels of the two
    face planes. The count equals ``scipy.ndimage.label``'s on the whole mask, with one slab's labels in memory per
    thread instead of the whole mask's.

    Example:
        >>> m = np.zeros((4, 4, 6), bool); m[0, 0, :3] = True; m[1, 1, 3:] = True; m[3, 3, 0] = True
        >>> count_components(m, slab=3)  # the first two touch diagonally across the slab face
        2
    """
    if mask.ndim != 3:
        raise ValueError(f"count_components expects a 3D mask, got shape {mask.shape}.")
    structure = np.ones((3, 3, 3), dtype=bool)
    nx, ny = mask.shape[:2]

    def label_slab(slab_slices: slice) -> tuple[int, np.ndarray | None, np.ndarray | None]:
        """Components of one slab (labelled in its own box) and the labels on its first and last planes."""
        part = mask[..., slab_slices] > 0
        box = bounding_box(part[None])
        if box[0].stop <= box[0].start:
            return 0, None, None
        labels, n = ndimage.label(part[box], structure=structure)
        faces = []
        for touches, plane in ((box[2].start == 0, 0), (box[2].stop == part.shape[2], -1)):
            face = np.zeros((nx, ny), dtype=labels.dtype) if touches else None
            if face is not None:
                face[box[:2]] = labels[..., plane]
            faces.append(face)
        return int(n), faces[0], faces[1]

    parts = map_slabs(label_slab, mask.shape[-1], slab)
    offsets = np.cumsum([0] + [n for n, _, _ in parts])
    parent = np.arange(int(offsets[-1]) + 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    joined = 0
    base = int(offsets[-1]) + 1
    for k in range(len(parts) - 1):
        last, first = parts[k][2], parts[k + 1][1]
        if last is None or first is None:  # nothing crosses this slab face
            continue
        pairs = []
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):  # voxel (x, y) of the last plane touches (x + dx, y + dy) of the next slab's first
                a = last[max(-dx, 0) : nx - max(dx, 0), max(-dy, 0) : ny - max(dy, 0)]
                b = first[max(dx, 0) : nx - max(-dx, 0), max(dy, 0) : ny - max(-dy, 0)]
                both = (a > 0) & (b > 0)  # each touching pair as one int64 key, so np.unique stays 1D and fast
                pairs.append(np.unique((a[both] + offsets[k]).astype(np.int64) * base + (b[both] + offsets[k + 1])))
        for key in np.unique(np.concatenate(pairs)):
            ri, rj = root(int(key // base)), root(int(key % base))
            if ri != rj:
                parent[ri] = rj
                joined += 1
    return int(offsets[-1]) - joined

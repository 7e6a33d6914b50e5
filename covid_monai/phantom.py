"""Synthetic chest-CT phantoms with COVID-19-like lesions, for the demo and the tests.

A phantom is built in a canonical RAS grid (array axis 0 towards the patient's right, axis 1 towards anterior, axis
2 towards superior), with the anatomy placed in millimetres in-plane and scaled along z to the stored field of view,
so that every phantom shows the chest from the lower neck to the upper abdomen whatever its slice count. It is then
stored in the requested orientation by flipping/permuting the array axes and adjusting the affine, so the world
(RAS, NIfTI convention) position of every anatomical point is the same in every storage orientation.

Content (HU): air -1000; skin and muscle ~+40/+50; subcutaneous fat ~-100; ribs as a broken ring, sternum and spine
(bone +420...+1000, discs +80, spinal canal +15); mediastinal fat, heart/aorta (+40), trachea (air); liver below the
right hemidiaphragm (~+55); a patient table; two lungs (~-850, denser posteriorly) with thin branching vessels
(+20...+60); 1-5 lesions per case inside the lungs, ground-glass opacities (-700...-300) or consolidations
(-100...+40), preferably peripheral and posterior. Gaussian noise (15-25 HU) after a slight partial-volume blur.

Example:
    >>> from covid_monai.phantom import make_phantom
    >>> ph = make_phantom((64, 64, 24), seed=1, orientation="LPS")
    >>> ph.image.dtype, ph.image.shape, int(ph.infection.max())
    (dtype('int16'), (64, 64, 24), 1)
"""

from __future__ import annotations

import gzip
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

__all__ = [
    "HU_CLIP",
    "LESION_HU",
    "ORIENTATIONS",
    "TISSUE",
    "Lesion",
    "Phantom",
    "make_phantom",
    "save_nifti",
    "to_nifti",
    "write_phantoms",
]

ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS", "RPI", "oblique")
"""Storage orientations of the tests; any 3-letter axis code (e.g. ``"PIL"``) is accepted too."""

WRITE_ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS", "RPI")
"""Orientations cycled through by :func:`write_phantoms` by default."""

LESION_HU: dict[str, tuple[float, float]] = {"ggo": (-700.0, -300.0), "consolidation": (-100.0, 40.0)}
"""HU range of the lesion cores by kind (lesion edges blend into the surrounding lung)."""

HU_CLIP: tuple[int, int] = (-1024, 3071)

TISSUE: dict[str, int] = {
    "air": 0,
    "fat": 1,
    "soft": 2,
    "bone": 3,
    "lung": 4,
    "vessel": 5,
    "lesion": 6,
    "airway": 7,
    "table": 8,
}
"""Labels of :attr:`Phantom.tissue` (the dominant tissue of each voxel before blur and noise)."""

_H = 150.0  # nominal half-height (mm) of the anatomy along z: the stored z range maps to [-_H, _H]
_CHUNK_VOXELS = 4_000_000  # voxels rendered at once (bounds the float32 work arrays)
_BLUR_SIGMA = 0.4  # partial-volume blur, in voxels
_BLUR_TRUNCATE = 4.0
_HALO = int(_BLUR_TRUNCATE * _BLUR_SIGMA + 0.5)  # radius of the blur kernel, rows of halo per chunk
_AIRWAY_R = 9.0  # trachea radius (mm)
_BRONCHUS_R = 6.0


@dataclass(frozen=True)
class Lesion:
    """One simulated lesion.

    Attributes:
        kind: ``"ggo"`` (ground-glass opacity) or ``"consolidation"``.
        hu: HU of the lesion core (edges blend into the lung).
        side: lung that holds the centre, 1 = left, 2 = right.
        radius_mm: nominal radius of the main blob (mm).
        center_voxel: centre as a (float) index into the stored arrays.
        center_world: centre in RAS world coordinates (mm).
    """

    kind: str
    hu: float
    side: int
    radius_mm: float
    center_voxel: tuple[float, float, float]
    center_world: tuple[float, float, float]


@dataclass
class Phantom:
    """A synthetic chest CT with its labels, stored in one orientation.

    Attributes:
        image: int16 HU volume, shape (X, Y, Z) of the stored arrays.
        infection: uint8 mask, 1 = lesion (always inside the lungs).
        lungs: uint8 mask, 1 = left lung, 2 = right lung (lesions included), as in COVID-19-CT-Seg.
        affine: 4x4 float64 voxel-to-RAS-world affine (NIfTI convention).
        spacing: voxel size (mm) along the stored array axes.
        tissue: uint8 tissue labels (see :data:`TISSUE`), same shape as ``image``.
        lesions: the simulated lesions.
        orientation: the storage orientation asked for.
        seed: the seed that generated the phantom.
    """

    image: np.ndarray
    infection: np.ndarray
    lungs: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    tissue: np.ndarray | None = None
    lesions: tuple[Lesion, ...] = ()
    orientation: str = "RAS"
    seed: int = 0


@dataclass
class _Anatomy:
    """Random anatomy of one case, in nominal coordinates (x, y mm from the body centre; t in [-1, 1] along z)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    k: float  # size of the body relative to an adult chest in a 350 mm field of view: scales the fixed-mm parts
    body_dx: float
    body_dy: float
    a: float
    b: float
    skin: float
    fat0: float
    muscle_t: float
    rib_t: float
    rib_period: float
    rib_slope: float
    rib_phase: float
    vb_rx: float
    vb_ry: float
    y_vb: float
    canal_r: float
    disc_period: float
    disc_phase: float
    heart_c: tuple[float, float, float]
    heart_r: tuple[float, float, float]
    heart_angle: float
    aorta_r: float
    mw: float
    lung_cx: float
    lung_cy: float
    lung_ax: tuple[float, float]  # left, right
    lung_ay: float
    lung_n: float
    dome: tuple[float, float]  # left, right (in t units)
    base_t: float
    taper_t: float
    apex_t: float
    hu_lung: float
    lung_grad: float
    hu_fat: float
    hu_soft: float
    hu_muscle: float
    hu_liver: float
    hu_marrow: float
    hu_cortex: float
    hu_vessel: float
    hu_table: float
    table_y: float
    noise: float

    @property
    def wall_d(self) -> float:
        """Depth (mm) from the skin to the inner surface of the chest wall (lateral)."""
        return self.skin + self.fat0 + self.muscle_t + self.rib_t + 2.0 * self.k

    @property
    def y_trachea(self) -> float:
        return self.y_vb + self.vb_ry + 24.0 * self.k

    def to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """Nominal coordinates (..., 3) with z in nominal mm -> float canonical voxel indices (..., 3)."""
        nx, ny, nz = self.shape
        sx, sy, _ = self.spacing
        out = np.empty(np.shape(xyz), dtype=np.float64)
        out[..., 0] = (xyz[..., 0] + self.body_dx) / sx + (nx - 1) / 2.0
        out[..., 1] = (xyz[..., 1] + self.body_dy) / sy + (ny - 1) / 2.0
        out[..., 2] = (xyz[..., 2] / _H + 1.0) / 2.0 * (nz - 1)
        return out

    def from_voxel(self, ijk: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_voxel`."""
        nx, ny, nz = self.shape
        sx, sy, _ = self.spacing
        out = np.empty(np.shape(ijk), dtype=np.float64)
        out[..., 0] = (ijk[..., 0] - (nx - 1) / 2.0) * sx - self.body_dx
        out[..., 1] = (ijk[..., 1] - (ny - 1) / 2.0) * sy - self.body_dy
        out[..., 2] = (ijk[..., 2] / (nz - 1) * 2.0 - 1.0) * _H
        return out

    @property
    def voxel_mm(self) -> tuple[float, float, float]:
        """Voxel size in nominal mm (z is scaled to the nominal anatomy)."""
        return self.spacing[0], self.spacing[1], 2.0 * _H / (self.shape[2] - 1)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _draw_anatomy(rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, ...]) -> _Anatomy:
    nx, ny, _ = shape
    fov_x, fov_y = nx * spacing[0], ny * spacing[1]
    a = fov_x * _u(rng, 0.40, 0.44)
    b = a * _u(rng, 0.62, 0.72)
    if b > 0.40 * fov_y:  # keep the body inside a non-square field of view
        a, b = a * 0.40 * fov_y / b, 0.40 * fov_y
    k = a / 147.0
    vb_ry = _u(rng, 13, 17) * k
    return _Anatomy(
        shape=shape,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        k=k,
        body_dx=_u(rng, -0.03, 0.03) * fov_x,
        body_dy=_u(rng, -0.06, 0.01) * fov_y,
        a=a,
        b=b,
        skin=2.0 * k,
        fat0=_u(rng, 0.04, 0.13) * a,
        muscle_t=_u(rng, 0.05, 0.08) * a,
        rib_t=_u(rng, 0.05, 0.065) * a,
        rib_period=_u(rng, 24, 30),
        rib_slope=_u(rng, 12, 22),
        rib_phase=_u(rng, 0, 2 * np.pi),
        vb_rx=_u(rng, 0.11, 0.14) * a,
        vb_ry=vb_ry,
        y_vb=-b + _u(rng, 0.58, 0.66) * b,
        canal_r=_u(rng, 7, 9) * k,
        disc_period=_u(rng, 26, 32),
        disc_phase=_u(rng, 0, 30),
        heart_c=(_u(rng, 0.12, 0.2) * a, _u(rng, 0.1, 0.2) * b, _u(rng, -0.5, -0.38)),
        heart_r=(_u(rng, 0.36, 0.42) * a, _u(rng, 0.38, 0.46) * b, _u(rng, 0.3, 0.38)),
        heart_angle=np.deg2rad(_u(rng, 25, 45)),
        aorta_r=_u(rng, 10, 13) * k,
        mw=_u(rng, 9, 14) * k,
        lung_cx=0.47 * a,
        lung_cy=-0.08 * b,
        lung_ax=(0.42 * a * _u(rng, 0.95, 1.0), 0.45 * a * _u(rng, 0.97, 1.03)),
        lung_ay=0.86 * b,
        lung_n=_u(rng, 2.2, 2.8),
        dome=(_u(rng, 0.30, 0.40), _u(rng, 0.38, 0.48)),
        base_t=_u(rng, -0.92, -0.85),
        taper_t=_u(rng, 0.25, 0.4),
        apex_t=_u(rng, 0.88, 0.95),
        hu_lung=_u(rng, -870, -830),
        lung_grad=_u(rng, 15, 35),
        hu_fat=_u(rng, -115, -90),
        hu_soft=_u(rng, 35, 45),
        hu_muscle=_u(rng, 45, 55),
        hu_liver=_u(rng, 50, 62),
        hu_marrow=_u(rng, 420, 500),
        hu_cortex=_u(rng, 800, 1000),
        hu_vessel=_u(rng, 20, 60),
        hu_table=_u(rng, 50, 150),
        table_y=-b - _u(rng, 8, 25) * k,
        noise=_u(rng, 15, 25),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Anatomy as functions of broadcastable nominal coordinates X, Y (mm) and T (-1..1): one source of truth for rendering
# the volume and for placing lesions.


def _body_scale(T: np.ndarray) -> np.ndarray:
    return 1.0 - 0.06 * T * T


def _depth(an: _Anatomy, X: np.ndarray, Y: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Approximate depth (mm) under the skin of the elliptical body; negative outside."""
    theta = np.arctan2(Y, X)
    radius = an.a * an.b / np.sqrt((an.b * np.cos(theta)) ** 2 + (an.a * np.sin(theta)) ** 2)
    return _body_scale(T) * radius - np.sqrt(X * X + Y * Y)


def _heart_q(an: _Anatomy, X: np.ndarray, Y: np.ndarray, T: np.ndarray) -> np.ndarray:
    (hx, hy, ht), (rx, ry, rt) = an.heart_c, an.heart_r
    c, s = np.cos(an.heart_angle), np.sin(an.heart_angle)
    dx, dy = X - hx, Y - hy
    u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    w = (T - ht) / rt
    return u * u + v * v + w * w


def _aorta_xy(an: _Anatomy) -> tuple[float, float]:
    return an.vb_rx + an.aorta_r - 2.0 * an.k, an.y_vb + 0.6 * an.vb_ry


def _airway(an: _Anatomy, X: np.ndarray, Y: np.ndarray, T: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Trachea (t > 0.3) and main bronchi (0.12 < t <= 0.3) with an optional margin (mm)."""
    yt, k = an.y_trachea, an.k
    trachea = (T > 0.3) & ((X * X + (Y - yt) ** 2) < (k * (_AIRWAY_R + margin)) ** 2)
    bx = k * (6.0 + np.clip((0.3 - T) / 0.18, 0.0, 1.0) * 24.0)
    in_t = (T > 0.12) & (T <= 0.3)
    r2 = (k * (_BRONCHUS_R + margin)) ** 2
    dy2 = (Y - (yt - 4.0 * k)) ** 2
    bronchi = in_t & ((((X - bx) ** 2 + dy2) < r2) | (((X + bx) ** 2 + dy2) < r2))
    return trachea | bronchi


def _lung_labels(an: _Anatomy, X: np.ndarray, Y: np.ndarray, T: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Lung labels (1 left, 2 right) at the broadcast points, lesions included; drawn with +x towards the left."""
    cavity = depth >= an.wall_d
    taper = np.clip((T - an.taper_t) / (an.apex_t - an.taper_t), 0.0, None)
    apex = np.sqrt(np.clip(1.0 - taper * taper, 0.0, None))
    ax_, ay_ = _aorta_xy(an)
    k = an.k
    spine = ((X / (an.vb_rx + 8.0 * k)) ** 2 + ((Y - an.y_vb) / (an.vb_ry + 8.0 * k)) ** 2 < 1.0) | (
        (np.abs(X) < an.vb_rx + 22.0 * k) & (Y < an.y_vb + an.vb_ry)
    )
    aorta = ((X - ax_) ** 2 + (Y - ay_) ** 2 < (an.aorta_r + 4.0 * k) ** 2) & (T < 0.55)
    keep = cavity & ~spine & ~aorta & (_heart_q(an, X, Y, T) > 1.15**2) & ~_airway(an, X, Y, T, margin=4.0)
    out = np.zeros(np.broadcast_shapes(np.shape(X), np.shape(Y), np.shape(T), np.shape(depth)), dtype=np.uint8)
    n = an.lung_n
    for side, sign, ax, dome in ((1, 1.0, an.lung_ax[0], an.dome[0]), (2, -1.0, an.lung_ax[1], an.dome[1])):
        dx, dy = (X - sign * an.lung_cx) / ax, (Y - an.lung_cy) / an.lung_ay
        p = (np.abs(dx) ** n + np.abs(dy) ** n) ** (1.0 / n)
        diaphragm = an.base_t + dome * np.clip(1.0 - (dx * dx + dy * dy) / 0.7, 0.0, None)
        out[keep & (p <= apex) & (T >= diaphragm) & (sign * X >= an.mw)] = side
    return out


def _diaphragm(an: _Anatomy, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Height (t units) of the diaphragm: the abdomen lies below it."""
    dy = (Y - an.lung_cy) / an.lung_ay
    out = None
    for sign, ax, dome in ((1.0, an.lung_ax[0], an.dome[0]), (-1.0, an.lung_ax[1], an.dome[1])):
        dx = (X - sign * an.lung_cx) / ax
        d = an.base_t + dome * np.clip(1.0 - (dx * dx + dy * dy) / 0.7, 0.0, None)
        out = d if out is None else np.maximum(out, d)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Vessels and lesions


def _rotate_away(rng: np.random.Generator, d: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Two child directions at +-angle (radians) from ``d`` in a random plane."""
    perp = np.cross(d, rng.normal(size=3))
    perp /= np.linalg.norm(perp) + 1e-12
    c1 = np.cos(angle) * d + np.sin(angle) * perp
    a2 = angle * rng.uniform(0.7, 1.3)
    c2 = np.cos(a2) * d - np.sin(a2) * perp
    return c1 / np.linalg.norm(c1), c2 / np.linalg.norm(c2)


def _vessel_indices(an: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Sorted flat canonical indices of vessel voxels (before clipping to the lungs)."""
    radii = (1.5, 1.2, 1.0, 0.6, 0.5)
    vx = an.voxel_mm
    step = 0.5 * min(vx)
    pts: list[np.ndarray] = []
    rad: list[np.ndarray] = []
    for sign in (1.0, -1.0):
        hilum = np.array([sign * (an.mw + 12.0 * an.k), an.y_trachea - 8.0 * an.k, 0.1 * _H])
        for base in ((0.5, 0.0, 0.85), (0.7, 0.6, -0.2), (0.55, -0.35, -0.75), (0.8, -0.5, 0.1)):
            d = np.array([sign * base[0], base[1], base[2]]) + rng.normal(0.0, 0.15, 3)
            stack = [(hilum, d / np.linalg.norm(d), _u(rng, 30, 45) * an.k, 0)]
            while stack:
                p0, d, length, level = stack.pop()
                p1 = p0 + d * length
                n = max(2, int(np.ceil(length / step)) + 1)
                t = np.linspace(0.0, 1.0, n)[:, None]
                pts.append(p0 + t * (p1 - p0))
                rad.append(np.full(n, radii[level]))
                if level + 1 < len(radii):
                    for child in _rotate_away(rng, d, np.deg2rad(_u(rng, 18, 38))):
                        stack.append((p1, child, length * _u(rng, 0.7, 0.85), level + 1))
    vox = np.rint(an.to_voxel(np.concatenate(pts))).astype(np.int64)
    r = np.concatenate(rad)
    nx, ny, nz = an.shape
    flat: list[np.ndarray] = []
    grid = np.stack(np.meshgrid(*(np.arange(-1, 2),) * 3, indexing="ij"), -1).reshape(-1, 3)
    for radius in np.unique(r):
        offsets = grid[(grid * grid).sum(1) <= radius * radius]
        v = (vox[r == radius][:, None, :] + offsets[None]).reshape(-1, 3)
        ok = (v >= 0).all(1) & (v[:, 0] < nx) & (v[:, 1] < ny) & (v[:, 2] < nz)
        v = v[ok]
        flat.append((v[:, 0] * ny + v[:, 1]) * nz + v[:, 2])
    return np.unique(np.concatenate(flat))


@dataclass
class _LesionSpec:
    kind: str
    hu: float
    side: int
    radius: float
    centers: np.ndarray  # (k, 3) float canonical voxel
    sigmas: np.ndarray  # (k, 3) voxels
    amps: np.ndarray  # (k,)
    lo: np.ndarray  # (3,) bbox, int
    hi: np.ndarray


def _lung_point(an: _Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """A random voxel centre (nominal coordinates) in a lung, preferring lower, posterior, peripheral positions.

    Snapping to a voxel centre guarantees that the lesion's centre voxel is sampled, whatever the grid.
    """
    for _ in range(100):
        side = 2 if rng.random() < 0.55 else 1
        sign = 1.0 if side == 1 else -1.0
        t = an.base_t + (an.apex_t - an.base_t) * rng.beta(1.6, 2.2)
        psi = np.deg2rad(rng.normal(55.0, 45.0))  # 0 = lateral, 90 deg = posterior
        direction = np.array([sign * np.cos(psi), -np.sin(psi)])
        r = np.linspace(0.0, 1.3 * max(an.lung_ax[side - 1], an.lung_ay), 96)
        X = sign * an.lung_cx + r * direction[0]
        Y = an.lung_cy + r * direction[1]
        T = np.full_like(r, t)
        inside = _lung_labels(an, X, Y, T, _depth(an, X, Y, T)) == side
        if not inside.any():
            continue
        k = int(np.argmin(np.abs(r - rng.uniform(0.55, 0.88) * r[inside].max())))
        p = an.from_voxel(np.rint(an.to_voxel(np.array([X[k], Y[k], t * _H]))))
        X, Y, T = p[:1], p[1:2], p[2:] / _H
        if _lung_labels(an, X, Y, T, _depth(an, X, Y, T))[0] == side:
            return p, side
    # fallback: any lung voxel of a coarse sub-grid
    axes = [np.unique(np.linspace(0, n - 1, min(n, 48)).round()) for n in an.shape]
    vox = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    p = an.from_voxel(vox)
    X, Y, T = p[:, 0], p[:, 1], p[:, 2] / _H
    lab = _lung_labels(an, X, Y, T, _depth(an, X, Y, T))
    found = np.flatnonzero(lab)
    if not len(found):
        raise ValueError(f"no lung in the field of view of this phantom (shape {an.shape}, spacing {an.spacing})")
    j = int(found[rng.integers(len(found))])
    return p[j], int(lab[j])


def _draw_lesions(an: _Anatomy, rng: np.random.Generator) -> list[_LesionSpec]:
    vx = np.array(an.voxel_mm)
    shape = np.array(an.shape)
    specs = []
    for i in range(int(rng.integers(1, 6))):
        kind = "ggo" if rng.random() < 0.65 else "consolidation"
        hu = _u(rng, -650, -350) if kind == "ggo" else _u(rng, -80, 30)
        radius = _u(rng, 22, 34) if i == 0 else _u(rng, 10, 28)  # mm for an adult chest
        center, side = _lung_point(an, rng)
        k = int(rng.integers(2, 6))
        scale = np.array([an.k, an.k, 1.0])  # in-plane sizes follow the body; z is nominal already
        offs = rng.normal(size=(k, 3))
        offs /= np.linalg.norm(offs, axis=1, keepdims=True)
        offs *= rng.uniform(0.3, 0.8, (k, 1)) * radius * scale
        offs[0] = 0.0
        sig = radius / 1.18 * rng.uniform(0.45, 0.8, k)  # a gaussian thresholded at 0.5 has radius 1.18 sigma
        sig[0] = radius / 1.18
        amps = rng.uniform(0.7, 1.0, k)
        amps[0] = 1.0
        centers = an.to_voxel(center[None] + offs)
        sigmas = np.maximum(sig[:, None] * scale[None] / vx[None], 0.7)  # at least ~1 voxel across on coarse grids
        lo = np.clip(np.floor((centers - 3 * sigmas).min(0)), 0, shape).astype(int)
        hi = np.clip(np.ceil((centers + 3 * sigmas).max(0)) + 1, 0, shape).astype(int)
        specs.append(_LesionSpec(kind, hu, side, radius * an.k, centers, sigmas, amps, lo, hi))
    return specs


def _lesion_field(spec: _LesionSpec, x0: int, x1: int) -> np.ndarray:
    """Sum of the lesion's gaussian blobs over its bbox restricted to canonical rows [x0, x1)."""
    axes = [np.arange(x0, x1), np.arange(spec.lo[1], spec.hi[1]), np.arange(spec.lo[2], spec.hi[2])]
    f = np.zeros([len(a) for a in axes], dtype=np.float32)
    for c, s, amp in zip(spec.centers, spec.sigmas, spec.amps, strict=True):
        e = [np.exp(-0.5 * ((ax - ci) / si) ** 2).astype(np.float32) for ax, ci, si in zip(axes, c, s, strict=True)]
        f += amp * e[0][:, None, None] * e[1][None, :, None] * e[2][None, None, :]
    return f


# ----------------------------------------------------------------------------------------------------------------------
# Rendering


def _render(
    an: _Anatomy, lo: int, hi: int, vessels: np.ndarray, lesions: list[_LesionSpec]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free HU, lung labels, infection and tissue for canonical rows [lo, hi)."""
    nx, ny, nz = an.shape
    sx, sy, _ = an.spacing
    f32, k = np.float32, an.k
    X = ((np.arange(lo, hi) - (nx - 1) / 2.0) * sx - an.body_dx).astype(f32)[:, None, None]
    Y = ((np.arange(ny) - (ny - 1) / 2.0) * sy - an.body_dy).astype(f32)[None, :, None]
    T = np.linspace(-1.0, 1.0, nz, dtype=f32)[None, None, :]
    Zn = T * f32(_H)
    shape3 = (hi - lo, ny, nz)
    img = np.full(shape3, -1000.0, dtype=f32)
    tis = np.zeros(shape3, dtype=np.uint8)

    def paint(mask: np.ndarray, hu: float | np.ndarray, label: str) -> None:
        mask = np.broadcast_to(mask, shape3)
        img[mask] = np.broadcast_to(hu, shape3)[mask] if isinstance(hu, np.ndarray) else hu
        tis[mask] = TISSUE[label]

    depth = _depth(an, X, Y, T)
    theta = np.arctan2(Y, X)
    body = depth >= 0
    fat_t = an.fat0 * (1.0 + 0.3 * np.cos(2.0 * theta))
    rib0 = an.skin + fat_t + an.muscle_t
    cavity = depth >= rib0 + an.rib_t + 2.0 * k
    below = T < _diaphragm(an, X, Y)

    # table, body wall
    table = (Y >= an.table_y - 6.0 * k) & (Y < an.table_y) & (np.abs(X) < 0.85 * an.a)
    paint(table & ~body, an.hu_table, "table")
    paint(body, an.hu_soft, "soft")
    paint((depth >= an.skin) & (depth < an.skin + fat_t), an.hu_fat, "fat")
    paint((depth >= an.skin + fat_t) & ~cavity, an.hu_muscle, "soft")
    # ribs: a broken ring whose arcs move with z like obliquely cut ribs; none at the sternum
    phi = np.abs(np.arctan2(X, -Y))  # 0 = posterior midline, pi = anterior midline
    u = (depth - rib0) / an.rib_t
    ring = (u >= 0) & (u < 1) & (phi > 0.3) & (phi < np.pi - 0.45)
    ring &= np.cos(2 * np.pi * (Zn + an.rib_slope * phi) / an.rib_period + an.rib_phase) > 0.3
    paint(ring, an.hu_marrow + (an.hu_cortex - an.hu_marrow) * (2 * u - 1) ** 2, "bone")
    # thoracic cavity: mediastinal fat above the diaphragm, liver (right) / soft tissue below
    paint(cavity & ~below, an.hu_fat, "fat")
    paint(cavity & below, np.where(X < 30.0 * k, f32(an.hu_liver), f32(an.hu_soft)), "soft")
    # paraspinal muscles and spine
    yc = an.y_vb - an.vb_ry - 2.0 * k - an.canal_r
    back = (X / (an.vb_rx + 32.0 * k)) ** 2 + ((Y - yc) / (yc + an.b)) ** 2 < 1.0
    paint(back & (Y < an.y_vb) & (depth >= an.skin + fat_t), an.hu_muscle, "soft")
    q = np.sqrt((X / an.vb_rx) ** 2 + ((Y - an.y_vb) / an.vb_ry) ** 2)
    disc = np.cos(2 * np.pi * (Zn - an.disc_phase) / an.disc_period) > 0.85
    paint((q < 1) & ~disc, an.hu_marrow + (an.hu_cortex - an.hu_marrow) * q**6, "bone")
    paint((q < 1) & disc, 80.0, "soft")
    rc = np.sqrt(X * X + (Y - yc) ** 2)
    paint((rc >= an.canal_r) & (rc < an.canal_r + 5.0 * k) & (Y < yc + 3.0 * k), an.hu_cortex * 0.8, "bone")
    spinous = (X / (4.5 * k)) ** 2 + ((Y - (yc - an.canal_r - 14.0 * k)) / (14.0 * k)) ** 2 < 1.0
    paint(spinous & (depth > an.skin + fat_t), an.hu_cortex * 0.8, "bone")
    paint(rc < an.canal_r, 15.0, "soft")
    # sternum
    ys = an.b * _body_scale(T) - an.skin - an.fat0 * 0.7 - 7.0 * k
    paint(((X / (13.0 * k)) ** 2 + ((Y - ys) / (5.5 * k)) ** 2 < 1.0) & (T > -0.3) & (T < 0.85), an.hu_marrow, "bone")
    # mediastinum: heart, descending aorta, oesophagus, airways
    paint(cavity & (_heart_q(an, X, Y, T) < 1.0), an.hu_soft, "soft")
    ax_, ay_ = _aorta_xy(an)
    paint(((X - ax_) ** 2 + (Y - ay_) ** 2 < an.aorta_r**2) & (T < 0.55) & body, an.hu_soft, "soft")
    paint(
        (X * X + (Y - an.y_vb - an.vb_ry - 8.0 * k) ** 2 < (7.0 * k) ** 2) & (T > an.base_t) & body,
        an.hu_muscle,
        "soft",
    )
    paint(_airway(an, X, Y, T, margin=2.0) & body, an.hu_soft, "soft")
    airway = _airway(an, X, Y, T) & body
    paint(airway, -1000.0, "airway")
    # lungs (denser posteriorly), vessels, lesions
    lungs = _lung_labels(an, X, Y, T, depth)
    in_lung = lungs > 0
    parenchyma = an.hu_lung - an.lung_grad * np.clip(Y / an.b, -1.0, 1.0)
    paint(in_lung, parenchyma, "lung")
    n_row = ny * nz
    i0, i1 = np.searchsorted(vessels, [lo * n_row, hi * n_row])
    vmask = np.zeros(shape3, dtype=bool)
    vmask.reshape(-1)[vessels[i0:i1] - lo * n_row] = True
    paint(vmask & in_lung, an.hu_vessel, "vessel")
    infection = np.zeros(shape3, dtype=np.uint8)
    for spec in lesions:
        x0, x1 = max(lo, int(spec.lo[0])), min(hi, int(spec.hi[0]))
        if x0 >= x1:
            continue
        f = _lesion_field(spec, x0, x1)
        sl = (slice(x0 - lo, x1 - lo), slice(spec.lo[1], spec.hi[1]), slice(spec.lo[2], spec.hi[2]))
        lung_sub = in_lung[sl]
        w = np.clip((f - 0.35) / 0.3, 0.0, 1.0)
        w = w * w * (3.0 - 2.0 * w)  # soft edge: 50 % of the lesion contrast at the mask border (f = 0.5)
        base = np.broadcast_to(parenchyma, shape3)[sl]
        lesion_hu = base + (f32(spec.hu) - base) * w
        img[sl] = np.where(lung_sub, np.maximum(img[sl], lesion_hu), img[sl])
        m = (f > 0.5) & lung_sub
        infection[sl][m] = 1
        tis[sl][m] = TISSUE["lesion"]
    return img, lungs, infection, tis


def _render_volume(
    an: _Anatomy, rng_noise: np.random.Generator, vessels: np.ndarray, lesions: list[_LesionSpec]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    nx, ny, nz = an.shape
    image = np.empty(an.shape, dtype=np.int16)
    lungs = np.empty(an.shape, dtype=np.uint8)
    infection = np.empty(an.shape, dtype=np.uint8)
    tissue = np.empty(an.shape, dtype=np.uint8)
    rows = max(1, _CHUNK_VOXELS // (ny * nz))
    for lo in range(0, nx, rows):
        hi = min(nx, lo + rows)
        hlo, hhi = max(0, lo - _HALO), min(nx, hi + _HALO)
        img, lab, inf, tis = _render(an, hlo, hhi, vessels, lesions)
        ndimage.gaussian_filter(img, _BLUR_SIGMA, output=img, mode="nearest", truncate=_BLUR_TRUNCATE)
        core = slice(lo - hlo, hi - hlo)
        out = img[core]
        out += rng_noise.standard_normal(out.shape, dtype=np.float32) * np.float32(an.noise)
        np.clip(np.rint(out), *HU_CLIP, out=out)
        image[lo:hi] = out
        lungs[lo:hi], infection[lo:hi], tissue[lo:hi] = lab[core], inf[core], tis[core]
    return image, lungs, infection, tissue


# ----------------------------------------------------------------------------------------------------------------------
# Geometry


def _storage_ornt(orientation: str) -> np.ndarray:
    """Orientation transform from the canonical RAS grid to the storage axis codes."""
    code = "RAS" if orientation == "oblique" else orientation
    pairs = ("LR", "PA", "IS")
    ok = (
        isinstance(code, str)
        and len(code) == 3
        and all(c in "LRPAIS" for c in code)
        and sorted(next(i for i, p in enumerate(pairs) if c in p) for c in code) == [0, 1, 2]
    )
    if not ok:
        raise ValueError(f"unknown orientation {orientation!r}: use one of {ORIENTATIONS} or a 3-letter axis code")
    return nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(code)))


def _rotation(angle_z: float, angle_x: float) -> np.ndarray:
    cz, sz, cx, sx = np.cos(angle_z), np.sin(angle_z), np.cos(angle_x), np.sin(angle_x)
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    return rz @ rx


def make_phantom(
    shape: Sequence[int] = (128, 128, 48),
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    orientation: str = "RAS",
    origin: Sequence[float] | None = None,
) -> Phantom:
    """Generate one synthetic chest CT with COVID-19-like lesions.

    The anatomy is built in a canonical RAS grid and stored in ``orientation``: the arrays are flipped/permuted and
    the affine adjusted, so that the world (RAS) position of every anatomical point does not depend on the storage
    orientation. ``"oblique"`` stores the RAS arrays with an affine rotated by 5-15 degrees about z and 1-4 degrees
    about x (about the volume centre). World RAS: the patient's right is +x, anterior +y, superior +z; lung
    label 1 (left) is always the lung on the world -x side. The result is a function of (stored shape, spacing,
    seed, orientation, origin) only.

    Args:
        shape: stored array shape (X, Y, Z); in-plane sizes >= 16, slices >= 4.
        spacing: voxel size (mm) along the stored axes. None draws it from the seed: square in-plane pixels for a
            ~310-380 mm field of view, slices 1.5-5 mm, at least 0.3 mm different from the in-plane size.
        seed: random seed; the same arguments always give the same phantom.
        orientation: one of :data:`ORIENTATIONS` or any 3-letter axis code such as ``"PIL"``.
        origin: world RAS position (mm) of the first stored voxel, i.e. ``affine[:3, 3]``. None draws a
            scanner-like origin (tens to hundreds of mm) from the seed.

    Returns:
        A :class:`Phantom` with int16 HU image, uint8 infection mask, uint8 lung labels (1 left, 2 right), uint8
        tissue labels, the affine and the stored spacing.

    Example:
        >>> ph = make_phantom((96, 96, 32), seed=3, orientation="LPS")
        >>> nib.aff2axcodes(ph.affine)
        ('L', 'P', 'S')
        >>> bool(((ph.infection > 0) <= (ph.lungs > 0)).all())
        True
    """
    ornt = _storage_ornt(orientation)
    stored = tuple(int(s) for s in shape)
    if len(stored) != 3:
        raise ValueError(f"shape must have 3 dimensions, got {tuple(shape)}")
    perm = [int(o) for o in ornt[:, 0]]  # canonical axis i is stored axis perm[i]
    canon = (stored[perm[0]], stored[perm[1]], stored[perm[2]])
    if min(canon[:2]) < 16 or canon[2] < 4:
        raise ValueError(f"shape {stored} too small: need >= 16 voxels in-plane and >= 4 slices")
    rng_geom, rng_anat, rng_vessel, rng_lesion, rng_noise, rng_obl = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(6)
    )

    # spacing and canonical affine
    if spacing is None:
        s_in = round(350.0 / max(canon[0], canon[1]) * _u(rng_geom, 0.89, 1.08), 4)
        s_z = round(_u(rng_geom, 1.5, 5.0), 4)
        while abs(s_z - s_in) < 0.3:
            s_z = round(_u(rng_geom, 1.5, 5.0), 4)
        canon_sp = (s_in, s_in, s_z)
    else:
        if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers, got {spacing}")
        canon_sp = tuple(float(spacing[p]) for p in perm)
    extent = [(n - 1) * s for n, s in zip(canon, canon_sp, strict=True)]
    corner = (
        -extent[0] / 2 + _u(rng_geom, -30, 30),
        -extent[1] / 2 + _u(rng_geom, -60, 20),
        _u(rng_geom, -400, -60),
    )
    aff_c = np.diag([*canon_sp, 1.0])
    aff_c[:3, 3] = corner

    # anatomy, rendered in the canonical grid
    an = _draw_anatomy(rng_anat, canon, canon_sp)
    vessels = _vessel_indices(an, rng_vessel)
    specs = _draw_lesions(an, rng_lesion)
    image, lungs, infection, tissue = _render_volume(an, rng_noise, vessels, specs)
    # the anatomy is drawn with array axis 0 towards the patient's left; RAS world x grows towards the patient's
    # right (NIfTI, nibabel, MONAI, 3D Slicer), so mirror axis 0 to put the canonical grid in RAS
    image, lungs, infection, tissue = (np.ascontiguousarray(a[::-1]) for a in (image, lungs, infection, tissue))

    # storage
    to_canon = nio.inv_ornt_aff(ornt, canon)  # stored voxel -> canonical voxel
    affine = aff_c @ to_canon
    angles = (np.deg2rad(_u(rng_obl, 5, 15)) * rng_obl.choice([-1, 1]), np.deg2rad(_u(rng_obl, 1, 4)))
    if orientation == "oblique":
        centre = affine @ np.array([*((np.array(stored) - 1) / 2.0), 1.0])
        rot = np.eye(4)
        rot[:3, :3] = _rotation(*angles)
        shift, unshift = np.eye(4), np.eye(4)
        shift[:3, 3], unshift[:3, 3] = -centre[:3], centre[:3]
        affine = unshift @ rot @ shift @ affine
    if origin is not None:
        if len(origin) != 3:
            raise ValueError(f"origin must have 3 coordinates, got {origin}")
        affine[:3, 3] = [float(o) for o in origin]
    canonical = [image, infection, lungs, tissue]
    del image, infection, lungs, tissue
    arrays = []
    while canonical:  # one array at a time keeps the peak memory at one extra copy
        arrays.append(np.ascontiguousarray(nio.apply_orientation(canonical.pop(0), ornt)))
    to_stored = np.linalg.inv(to_canon)
    lesions = []
    for spec in specs:
        centre_canon = (canon[0] - 1 - spec.centers[0][0], spec.centers[0][1], spec.centers[0][2])
        v = to_stored @ np.array([*centre_canon, 1.0])
        w = affine @ v
        lesions.append(
            Lesion(spec.kind, round(spec.hu, 1), spec.side, spec.radius, tuple(v[:3].tolist()), tuple(w[:3].tolist()))
        )
    return Phantom(
        image=arrays[0],
        infection=arrays[1],
        lungs=arrays[2],
        affine=affine.astype(np.float64),
        spacing=(float(canon_sp[perm.index(0)]), float(canon_sp[perm.index(1)]), float(canon_sp[perm.index(2)])),
        tissue=arrays[3],
        lesions=tuple(lesions),
        orientation=orientation,
        seed=int(seed),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Files


def to_nifti(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """Wrap an array in a NIfTI-1 image with qform = sform = ``affine`` (both code 1, scanner) and mm units.

    Args:
        array: voxel data; its dtype is kept on disk.
        affine: 4x4 voxel-to-RAS-world affine.

    Returns:
        The image.

    Example:
        >>> img = to_nifti(np.zeros((4, 4, 4), np.uint8), np.eye(4))
        >>> int(img.header["sform_code"]), int(img.header["qform_code"])
        (1, 1)
    """
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.set_data_dtype(array.dtype)
    return img


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike[str]) -> str:
    """Write ``array`` as a gzipped NIfTI atomically: a hidden temp file in the same folder, then ``os.replace``.

    Readers never see a partial file, and a failed write leaves neither a temp file nor a changed target.

    Args:
        array: voxel data (its dtype is kept).
        affine: 4x4 voxel-to-RAS-world affine, written as both qform and sform (code 1).
        path: target file, normally ending in ``.nii.gz``.

    Returns:
        The path written.

    Example:
        >>> out = tempfile.mkdtemp()
        >>> path = save_nifti(np.zeros((4, 4, 4), np.uint8), np.eye(4), os.path.join(out, "mask.nii.gz"))
        >>> os.listdir(out)
        ['mask.nii.gz']
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    img = to_nifti(array, affine)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as gz:
                img.to_file_map(img.make_file_map({"image": gz}))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_phantoms(
    out_dir: str | os.PathLike[str],
    n: int,
    shape: Sequence[int] = (128, 128, 48),
    seed: int = 0,
    orientations: Sequence[str] | None = None,
) -> list[str]:
    """Write ``n`` phantoms as a small data set: ``images/``, ``labels/`` (infection) and ``lungs/`` NIfTI files.

    Case ``i`` is named ``phantom_{i:03d}``, uses seed ``seed + i`` and the orientation ``orientations[i % len]``
    (default: cycle through RAS, LPS, LAS, RPI, so a set mixes storage orientations). Images are int16 HU, labels
    uint8 (1 = infection), lungs uint8 (1 = left, 2 = right); qform = sform = the phantom's affine; every file is
    written atomically.

    Args:
        out_dir: output folder (created if needed).
        n: number of cases.
        shape: stored array shape of each case.
        seed: seed of the first case.
        orientations: storage orientations to cycle through.

    Returns:
        The case names, in order.

    Example:
        >>> write_phantoms(tempfile.mkdtemp(), 2, shape=(64, 64, 16))
        ['phantom_000', 'phantom_001']
    """
    orients = tuple(WRITE_ORIENTATIONS if orientations is None else orientations)
    if not orients:
        raise ValueError("orientations must not be empty")
    for o in orients:
        _storage_ornt(o)
    dirs = {k: os.path.join(os.fspath(out_dir), k) for k in ("images", "labels", "lungs")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    names = []
    for i in range(int(n)):
        name = f"phantom_{i:03d}"
        ph = make_phantom(shape, seed=seed + i, orientation=orients[i % len(orients)])
        save_nifti(ph.image, ph.affine, os.path.join(dirs["images"], f"{name}.nii.gz"))
        save_nifti(ph.infection, ph.affine, os.path.join(dirs["labels"], f"{name}.nii.gz"))
        save_nifti(ph.lungs, ph.affine, os.path.join(dirs["lungs"], f"{name}.nii.gz"))
        names.append(name)
    return names

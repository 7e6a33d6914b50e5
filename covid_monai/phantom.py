"""Synthetic chest-CT phantoms with COVID-19 lesions, for the demo and the tests.

A phantom is built in a canonical RAS grid (array axis 0 towards the patient's right, axis 1 towards anterior, axis
2 towards superior), with the anatomy placed in millimetres in-plane and scaled along z to the stored field of view,
so that every phantom shows the chest from the lower neck to the upper abdomen whatever its slice count. It is then
stored in the requested orientation by flipping/permuting the array axes and adjusting the affine, so the world
(RAS, NIfTI convention) position of every anatomical point is the same in every storage orientation.

Anatomy (HU): air -1000; skin and muscle ~+40/+50; subcutaneous fat ~-100; ribs as a broken ring, sternum and spine
(bone +420...+1000, discs +80, spinal canal +15); mediastinal fat, heart/aorta (+40), trachea (air); liver below the
right hemidiaphragm (~+55); a patient table; two lungs (-880...-820, denser posteriorly) split into lobes by fissures.

Lesions (label 1; ``Phantom.multiclass`` 1 ground glass, 2 consolidation), after the Fleischner Society glossary
and the COVID-19 CT reviews; every kind is a small function in :data:`LESION_KINDS`, every range in
:class:`PhantomSpec`:

- ``ground_glass``: patchy, mottled ground glass (-750...-300 HU) with holes and irregular, lobulated outlines;
- ``crazy_paving``: ground glass under a polygonal reticulation (thickened interlobular septa);
- ``consolidation``: -150...+50 HU with air bronchograms, often in a ground-glass rim;
- ``reversed_halo``: central ground glass ringed, fully or in part, by consolidation (atoll sign);
- ``nodule``: 3-12 mm ground-glass, solid or haloed nodules;
- ``band``: linear opacities, parenchymal bands reaching the pleura and subpleural curvilinear lines;
- ``lobar``: a whole lobe, or its peripheral rind, with patchy ground glass and dependent consolidation.

Lesions are bilateral, multifocal, peripheral and posterior predominant, 3 mm to a lobe, and may touch the pleura
and the diaphragm. Not infection (label 0): vessels and bronchi of many calibres (trees of tapered tubes), fissures,
dependent atelectasis at the bases, centrilobular emphysema, partial volume at the diaphragm and the heart border.

Scanner (:class:`Scanner`, drawn per case): noise level, smooth to sharp reconstruction kernels, slice thickness
(each slice averages the anatomy over its thickness: partial volume), field of view and patient size, streaks,
respiratory motion blur, and HU calibration offsets of a few tens of HU.

Example:
    >>> from covid_monai.phantom import make_phantom
    >>> ph = make_phantom((64, 64, 24), seed=1, orientation="LPS")
    >>> ph.image.dtype, ph.image.shape, int(ph.infection.max())
    (dtype('int16'), (64, 64, 24), 1)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from nibabel import orientations as nio
from scipy import ndimage, special
from scipy.spatial import cKDTree

__all__ = [
    "DEFAULT_SPEC",
    "HU_CLIP",
    "LESION_KINDS",
    "MULTICLASS",
    "ORIENTATIONS",
    "TISSUE",
    "Lesion",
    "Phantom",
    "PhantomSpec",
    "Scanner",
    "make_phantom",
    "save_nifti",
    "write_phantoms",
]

ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS", "RPI", "oblique")
"""Storage orientations of the tests; any 3-letter axis code (e.g. ``"PIL"``) is accepted too."""

WRITE_ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS", "RPI")
"""Orientations cycled through by :func:`write_phantoms` by default."""

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
    "bronchus": 9,
    "atelectasis": 10,
    "emphysema": 11,
}
"""Labels of :attr:`Phantom.tissue` (the dominant tissue of each voxel before blur and noise). ``airway`` is the
trachea and main bronchi; ``bronchus`` the wall and lumen of the bronchi inside the lungs."""

MULTICLASS: dict[str, int] = {"ground_glass": 1, "consolidation": 2}
"""Values of :attr:`Phantom.multiclass` and of ``labels_multiclass/`` (0 is background)."""

_H = 150.0  # nominal half-height (mm) of the anatomy along z: the stored z range maps to [-_H, _H]
_CHUNK_VOXELS = 3_000_000  # voxels rendered at once, counting the sub-slices (bounds the float32 work arrays)
_BLUR_SIGMA = 0.4  # in-plane point-spread of the scanner, in voxels
_AIRWAY_R = 9.0  # trachea radius (mm)
_BRONCHUS_R = 6.0
_SIZEABLE = ("ground_glass", "crazy_paving", "consolidation", "reversed_halo", "lobar")  # kinds a case can start with


def _ranges(**kw: tuple[float, float]) -> Callable[[], dict[str, tuple[float, float]]]:
    return lambda: dict(kw)


@dataclass(frozen=True)
class PhantomSpec:
    """The generator's parameter space: every random draw of a phantom comes from one of these ranges.

    Ranges are ``(low, high)``, drawn uniformly per case or per lesion; probabilities are per case. A part of the
    space (lesion kinds held out, other scanners) is ``dataclasses.replace(DEFAULT_SPEC, ...)``.

    Attributes:
        kinds: lesion kinds drawn from (keys of :data:`LESION_KINDS`), in proportion to ``kind_weights``.
        kind_weights: relative frequency of each kind.
        lesions: lesions per case (inclusive); the first is one of the larger kinds when ``kinds`` has one.
        size_mm: per kind, the diameter (``band``: length; ``lobar``: depth of the involved peripheral rind).
        ggo_hu: ground-glass density.
        consolidation_hu: consolidation density.
        band_hu: density of linear and subpleural bands.
        mottle: texture amplitude, a fraction of the lesion's contrast (0 = uniform).
        texture_mm: size of the mottles.
        margin_mm: width of a lesion's edge, from sharp to ill-defined.
        holes: share of ground-glass lesions with holes of spared lung.
        peripheral: radial position of a lesion's centre, 0 = middle of the lung, 1 = on the pleura.
        diaphragm: share of lesions placed on the diaphragm.
        lung_hu: aerated lung.
        emphysema: share of cases with centrilobular emphysema (upper zones).
        atelectasis: share of cases with dependent atelectasis at the lung bases.
        fissures: share of cases with visible fissures.
        noise_hu: image noise (standard deviation after the kernel).
        kernel: reconstruction kernel, -1 smooth (soft tissue) ... 0 standard ... +1 sharp (lung, edge-enhancing).
        slice_thickness_mm: each slice averages the anatomy over this thickness (anatomical mm).
        slice_spacing_mm: stored slice spacing when ``make_phantom`` draws the spacing.
        fov_mm: in-plane field of view when ``make_phantom`` draws the spacing.
        body_fraction: body width over the field of view (patient size).
        hu_offset: calibration offset added to every voxel.
        hu_gain: calibration gain.
        motion: share of cases with respiratory motion blur over a range of slices.
        streaks: share of cases with streak artefacts over a range of slices.
    """

    kinds: tuple[str, ...] = (
        "ground_glass",
        "crazy_paving",
        "consolidation",
        "reversed_halo",
        "nodule",
        "band",
        "lobar",
    )
    kind_weights: Mapping[str, float] = field(
        default_factory=lambda: {
            "ground_glass": 3.0,
            "crazy_paving": 1.0,
            "consolidation": 1.5,
            "reversed_halo": 0.6,
            "nodule": 1.0,
            "band": 0.8,
            "lobar": 0.6,
        }
    )
    lesions: tuple[int, int] = (1, 8)
    size_mm: Mapping[str, tuple[float, float]] = field(
        default_factory=_ranges(
            ground_glass=(8.0, 80.0),
            crazy_paving=(20.0, 80.0),
            consolidation=(10.0, 60.0),
            reversed_halo=(15.0, 50.0),
            nodule=(3.0, 12.0),
            band=(15.0, 60.0),
            lobar=(15.0, 60.0),
        )
    )
    ggo_hu: tuple[float, float] = (-750.0, -300.0)
    consolidation_hu: tuple[float, float] = (-150.0, 50.0)
    band_hu: tuple[float, float] = (-550.0, -100.0)
    mottle: tuple[float, float] = (0.0, 0.7)
    texture_mm: tuple[float, float] = (1.0, 5.0)
    margin_mm: tuple[float, float] = (0.5, 4.0)
    holes: float = 0.5
    peripheral: tuple[float, float] = (0.45, 1.0)
    diaphragm: float = 0.2
    lung_hu: tuple[float, float] = (-880.0, -820.0)
    emphysema: float = 0.2
    atelectasis: float = 0.5
    fissures: float = 0.7
    noise_hu: tuple[float, float] = (8.0, 45.0)
    kernel: tuple[float, float] = (-1.0, 1.0)
    slice_thickness_mm: tuple[float, float] = (0.6, 5.0)
    slice_spacing_mm: tuple[float, float] = (1.5, 5.0)
    fov_mm: tuple[float, float] = (300.0, 460.0)
    body_fraction: tuple[float, float] = (0.36, 0.44)
    hu_offset: tuple[float, float] = (-30.0, 30.0)
    hu_gain: tuple[float, float] = (0.98, 1.02)
    motion: float = 0.2
    streaks: float = 0.25

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds) - set(LESION_KINDS))
        if unknown or not self.kinds:
            raise ValueError(f"unknown or no lesion kinds {unknown or list(self.kinds)}: use {sorted(LESION_KINDS)}")
        if not 1 <= self.lesions[0] <= self.lesions[1]:
            raise ValueError(f"lesions must be (low, high) with 1 <= low <= high, got {self.lesions}")


@dataclass(frozen=True)
class Scanner:
    """How one phantom was 'scanned' (drawn from a :class:`PhantomSpec`).

    Attributes:
        noise_hu: standard deviation of the image noise after the kernel.
        kernel: -1 smooth ... +1 sharp.
        slice_thickness_mm: thickness each slice averages over (anatomical mm).
        hu_offset: calibration offset (HU).
        hu_gain: calibration gain.
        motion_mm: length of the respiratory motion blur (anterior-posterior), 0 for none.
        motion_z: range of slices blurred (nominal mm, -150 = first slice, +150 = last).
        streaks: streak artefacts: (z_low, z_high, x, y, angle, amplitude HU, width mm) per streak.
    """

    noise_hu: float
    kernel: float
    slice_thickness_mm: float
    hu_offset: float
    hu_gain: float
    motion_mm: float = 0.0
    motion_z: tuple[float, float] = (0.0, 0.0)
    streaks: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True)
class Lesion:
    """One simulated lesion.

    Attributes:
        kind: the lesion kind (a key of :data:`LESION_KINDS`).
        hu: HU of the lesion's core (ground glass, or consolidation for solid kinds; edges blend into the lung).
        side: lung that holds the centre, 1 = left, 2 = right.
        radius_mm: nominal radius (half the drawn size).
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
        multiclass: uint8 lesion type, 1 = ground glass, 2 = consolidation (see :data:`MULTICLASS`).
        scanner: the scanner settings of this phantom.
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
    multiclass: np.ndarray | None = None
    scanner: Scanner | None = None


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


def _draw_anatomy(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, ...], spec: PhantomSpec
) -> _Anatomy:
    nx, ny, _ = shape
    fov_x, fov_y = nx * spacing[0], ny * spacing[1]
    a = fov_x * _u(rng, *spec.body_fraction)
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
        hu_lung=_u(rng, *spec.lung_hu),
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


def _lung_margin(
    an: _Anatomy, X: np.ndarray, Y: np.ndarray, T: np.ndarray, side: int, costal: bool = False
) -> np.ndarray:
    """Approximate distance (mm) from a point to the surface of lung ``side``: positive inside, about zero on it.

    The smallest of the distances to the chest wall, the lung's outline and apex, the diaphragm and (unless
    ``costal``) the mediastinum and the heart; a few mm off near corners, exact enough for subpleural placement.
    """
    sign = 1.0 if side == 1 else -1.0
    ax, dome = (an.lung_ax[0], an.dome[0]) if side == 1 else (an.lung_ax[1], an.dome[1])
    taper = np.clip((T - an.taper_t) / (an.apex_t - an.taper_t), 0.0, None)
    apex = np.sqrt(np.clip(1.0 - taper * taper, 0.0, None))
    dx, dy = (X - sign * an.lung_cx) / ax, (Y - an.lung_cy) / an.lung_ay
    p = (np.abs(dx) ** an.lung_n + np.abs(dy) ** an.lung_n) ** (1.0 / an.lung_n)
    out = np.minimum(_depth(an, X, Y, T) - an.wall_d, (apex - p) * min(ax, an.lung_ay))
    diaphragm = an.base_t + dome * np.clip(1.0 - (dx * dx + dy * dy) / 0.7, 0.0, None)
    out = np.minimum(out, (T - diaphragm) * _H)
    if not costal:
        (rx, ry, _) = an.heart_r
        heart = (np.sqrt(_heart_q(an, X, Y, T)) - 1.15) * min(rx, ry)
        out = np.minimum(np.minimum(out, sign * X - an.mw), heart)
    return out


@dataclass(frozen=True)
class _Fissures:
    """The lobes: an oblique (major) fissure in each lung, a horizontal (minor) one in the right lung.

    A major fissure runs from high at the back to the diaphragm at the front: the lower lobe lies behind and below
    it. The minor fissure separates the right upper lobe from the middle lobe. Distances are in mm (z nominal).
    """

    major: tuple[tuple[float, float, float, float], tuple[float, float, float, float]]  # per side: y0, z0, y1, z1
    minor: tuple[float, float]  # z at the lung's centre, slope dz/dy
    tilt: float  # the major fissure lies further back laterally: y shifts by tilt * (|x| - lung centre)
    lung_cx: float
    visible: bool
    thickness: float
    hu: float

    def major_distance(self, side: int, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
        """Signed distance to the major fissure, > 0 on the upper-lobe side."""
        y0, z0, y1, z1 = self.major[side - 1]
        length = float(np.hypot(y1 - y0, z1 - z0))
        Y = Y + self.tilt * (np.abs(X) - self.lung_cx)
        return (-(z1 - z0) * (Y - y0) + (y1 - y0) * (Z - z0)) / length

    def minor_distance(self, Y: np.ndarray, Z: np.ndarray, y_centre: float) -> np.ndarray:
        """Signed distance to the minor fissure, > 0 above it."""
        z0, slope = self.minor
        return (Z - z0 - slope * (Y - y_centre)) / float(np.hypot(1.0, slope))

    def lobe_distance(
        self, side: int, lobe: str, X: np.ndarray, Y: np.ndarray, Z: np.ndarray, y_centre: float
    ) -> np.ndarray:
        """Signed distance (mm, > 0 inside) to the fissures that bound ``lobe`` (upper, middle, lower)."""
        major = self.major_distance(side, X, Y, Z)
        if lobe == "lower":
            return -major
        if side == 1:
            return major
        minor = self.minor_distance(Y, Z, y_centre)
        return np.minimum(major, minor if lobe == "upper" else -minor)

    def lobe_of(self, side: int, x: float, y: float, z: float, y_centre: float) -> str:
        """The lobe holding a point of lung ``side``."""
        if float(self.major_distance(side, np.float64(x), np.float64(y), np.float64(z))) < 0:
            return "lower"
        if side == 1 or float(self.minor_distance(np.float64(y), np.float64(z), y_centre)) > 0:
            return "upper"
        return "middle"


def _draw_fissures(an: _Anatomy, rng: np.random.Generator, spec: PhantomSpec) -> _Fissures:
    major = tuple(
        (
            an.lung_cy - an.lung_ay,
            _u(rng, 0.1, 0.35) * _H,
            an.lung_cy + an.lung_ay,
            (an.base_t + _u(rng, 0.1, 0.25)) * _H,
        )
        for _ in range(2)
    )
    return _Fissures(
        major=major,  # type: ignore[arg-type]
        minor=(_u(rng, -0.1, 0.15) * _H, _u(rng, -0.3, 0.3)),
        tilt=_u(rng, 0.3, 0.7),
        lung_cx=an.lung_cx,
        visible=bool(rng.random() < spec.fissures),
        thickness=_u(rng, 0.3, 0.8),
        hu=_u(rng, -400.0, -200.0),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks of lesions. Every field is a function of 1D grid axes x, y, z (nominal mm) evaluated on their
# outer product, so that a lesion renders the same whatever block of the volume asks for it.


def _grid(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return x[:, None, None], y[None, :, None], z[None, None, :]


def _smooth(u: np.ndarray) -> np.ndarray:
    """Smoothstep of ``u`` clipped to [0, 1]."""
    u = np.clip(u, 0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


class _Noise:
    """A smooth random field of unit variance with features about ``scale`` mm across, defined everywhere.

    A periodic lattice (cells of scale / 2) of smoothed white noise, interpolated linearly along each axis.
    """

    _N = 32

    def __init__(self, rng: np.random.Generator, scale: float) -> None:
        self.cell = scale / 2.0
        lattice = ndimage.gaussian_filter(rng.standard_normal((self._N,) * 3).astype(np.float32), 1.0, mode="wrap")
        self.lattice = lattice / lattice.std()
        self.phase = rng.uniform(0.0, self._N, 3)

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = self.lattice
        for axis, c in enumerate((x, y, z)):
            u = np.asarray(c, np.float64) / self.cell + self.phase[axis]
            i = np.floor(u)
            shape = [1, 1, 1]
            shape[axis] = -1
            f = (u - i).astype(np.float32).reshape(shape)
            i = i.astype(np.int64) % self._N
            out = np.take(out, i, axis=axis) * (1.0 - f) + np.take(out, (i + 1) % self._N, axis=axis) * f
        return np.clip(out, -2.5, 2.5)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


@dataclass
class _Blobs:
    """An outline: a union of rotated ellipsoids, lobulated and roughened by smooth noise.

    Calling it gives an approximate signed distance (mm, > 0 inside) on the grid of axes x, y, z.
    """

    centers: np.ndarray  # (k, 3) mm
    to_unit: np.ndarray  # (k, 3, 3): offset (mm) -> coordinates in which the ellipsoid is the unit ball
    sizes: np.ndarray  # (k,) mean semi-axis (mm)
    lo: np.ndarray
    hi: np.ndarray
    lobulation: _Noise | None = None
    lob_amp: float = 0.0
    roughness: _Noise | None = None
    rough_amp: float = 0.0

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        g = None
        for c, m, size in zip(self.centers, self.to_unit, self.sizes, strict=True):
            d = _grid(x - c[0], y - c[1], z - c[2])
            rho2 = sum((m[i, 0] * d[0] + m[i, 1] * d[1] + m[i, 2] * d[2]) ** 2 for i in range(3))
            gi = (size * (1.0 - np.sqrt(rho2))).astype(np.float32)
            g = gi if g is None else np.maximum(g, gi)
        if self.lobulation is not None:
            g = g + self.lob_amp * self.lobulation(x, y, z)
        if self.roughness is not None:
            g = g + self.rough_amp * self.roughness(x, y, z)
        return g


@dataclass
class _Holes:
    """A region with holes of spared lung (where smooth noise is high), none within ``keep_mm`` of ``keep``."""

    region: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    noise: _Noise
    level: float
    scale: float
    keep: np.ndarray
    keep_mm: float

    @property
    def lo(self) -> np.ndarray:
        return self.region.lo  # type: ignore[attr-defined]

    @property
    def hi(self) -> np.ndarray:
        return self.region.hi  # type: ignore[attr-defined]

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        d = _grid(x - self.keep[0], y - self.keep[1], z - self.keep[2])
        near = np.clip(self.keep_mm - np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2), 0.0, None)
        holes = (self.level - self.noise(x, y, z)) * (0.3 * self.scale) + 10.0 * near
        return np.minimum(self.region(x, y, z), holes)


@dataclass
class _Grown:
    """A region grown by ``mm`` (a rim around it)."""

    region: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    mm: float

    @property
    def lo(self) -> np.ndarray:
        return self.region.lo - self.mm  # type: ignore[attr-defined]

    @property
    def hi(self) -> np.ndarray:
        return self.region.hi + self.mm  # type: ignore[attr-defined]

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.region(x, y, z) + self.mm


@dataclass
class _Ribbon:
    """A flat band ``thickness`` x ``width`` mm along ``axis`` from ``-0.3 length`` to ``0.7 length`` of ``center``."""

    center: np.ndarray
    axis: np.ndarray
    normal: np.ndarray
    length: float
    thickness: float
    width: float
    lo: np.ndarray
    hi: np.ndarray

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        d = _grid(x - self.center[0], y - self.center[1], z - self.center[2])
        side = np.cross(self.axis, self.normal)

        def dot(v: np.ndarray) -> np.ndarray:
            return v[0] * d[0] + v[1] * d[1] + v[2] * d[2]

        along = 0.5 * self.length - np.abs(dot(self.axis) - 0.2 * self.length)
        across = 0.5 * self.thickness - np.abs(dot(self.normal))
        wide = 0.5 * self.width - np.abs(dot(side))
        return np.minimum(np.minimum(along, across), wide).astype(np.float32)


@dataclass
class _Subpleural:
    """A curvilinear line ``depth`` mm under the pleura (parallel to it), within ``extent`` mm of ``center``."""

    an: _Anatomy
    side: int
    center: np.ndarray
    depth: float
    thickness: float
    extent: float
    lo: np.ndarray
    hi: np.ndarray

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        X, Y, Z = _grid(x, y, z)
        margin = _lung_margin(self.an, X, Y, Z / _H, self.side, costal=True)
        d = _grid(x - self.center[0], y - self.center[1], z - self.center[2])
        reach = self.extent - np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
        return np.minimum(0.5 * self.thickness - np.abs(margin - self.depth), reach).astype(np.float32)


@dataclass
class _Lobe:
    """A lobe of lung ``side``, or its outer rind ``depth`` mm deep with an irregular inner edge."""

    an: _Anatomy
    fissures: _Fissures
    side: int
    lobe: str
    depth: float | None
    edge: _Noise
    edge_amp: float
    lo: np.ndarray
    hi: np.ndarray

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        X, Y, Z = _grid(x, y, z)
        g = self.fissures.lobe_distance(self.side, self.lobe, X, Y, Z, self.an.lung_cy)
        if self.depth is not None:
            rind = self.depth - _lung_margin(self.an, X, Y, Z / _H, self.side, costal=True)
            g = np.minimum(g, rind + self.edge_amp * self.edge(x, y, z))
        return g.astype(np.float32)


@dataclass
class _Ring:
    """A rim of consolidation ``thickness`` mm inside a lesion's outline, open where it faces ``gap_dir``."""

    thickness: float
    hu: float
    center: np.ndarray
    gap_dir: np.ndarray | None = None
    gap_cos: float = 1.0


@dataclass
class _Septa:
    """Thin walls between random polygonal cells (thickened interlobular septa): a partial-volume occupancy 0...1."""

    tree: cKDTree
    seeds: np.ndarray
    thickness: float
    voxel: float

    @classmethod
    def draw(
        cls, rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, cell: float, thickness: float, voxel: float
    ):
        axes = [np.arange(a - cell, b + cell, cell) for a, b in zip(lo, hi, strict=True)]
        seeds = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        seeds = seeds + rng.uniform(-0.4, 0.4, seeds.shape) * cell
        return cls(cKDTree(seeds), seeds, thickness, voxel)

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        pts = np.stack(np.meshgrid(x, y, z, indexing="ij"), -1).reshape(-1, 3)
        d, i = self.tree.query(pts, k=2)
        gap = np.linalg.norm(self.seeds[i[:, 1]] - self.seeds[i[:, 0]], axis=1)
        dist = (d[:, 1] ** 2 - d[:, 0] ** 2) / (2.0 * gap)  # distance to the wall between the two nearest cells
        v, t = self.voxel, self.thickness
        occ = min(1.0, t / v) * np.clip((0.5 * max(t, v) + 0.5 * v - dist) / v, 0.0, 1.0)
        return occ.reshape(len(x), len(y), len(z)).astype(np.float32)


@dataclass
class _Layer:
    """One layer of a lesion: where it is (``region``: signed distance, mm) and how it looks there.

    Rendering gives the opacity ``w`` (0 = lung, 1 = the layer's HU), the HU it tends to, the label (region >= 0)
    and the type (1 ground glass, 2 consolidation) per voxel.
    """

    region: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    hu: float
    cls: int
    margin: float
    texture: _Noise | None = None
    mottle: float = 0.0
    ring: _Ring | None = None
    septa: _Septa | None = None
    septa_hu: float = 0.0
    dependent: tuple[float, float, float] | None = None  # (y below which, ramp width mm, HU): dependent consolidation

    @property
    def lo(self) -> np.ndarray:
        return self.region.lo - self.margin  # type: ignore[attr-defined]

    @property
    def hi(self) -> np.ndarray:
        return self.region.hi + self.margin  # type: ignore[attr-defined]

    def render(
        self, x: np.ndarray, y: np.ndarray, z: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        g = self.region(x, y, z)
        edge = _smooth(g / self.margin + 0.5)
        w = edge if self.texture is None else edge * np.clip(1.0 + self.mottle * self.texture(x, y, z), 0.1, 1.3)
        hu = np.full(g.shape, self.hu, np.float32)
        cls = np.full(g.shape, self.cls, np.uint8)
        if self.ring is not None:
            r = self.ring
            rim = _smooth((r.thickness - g) / self.margin + 0.5) * edge
            if r.gap_dir is not None:
                d = _grid(x - r.center[0], y - r.center[1], z - r.center[2])
                norm = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + 1e-6
                cos = (r.gap_dir[0] * d[0] + r.gap_dir[1] * d[1] + r.gap_dir[2] * d[2]) / norm
                rim = rim * _smooth((r.gap_cos - cos) / 0.15 + 0.5)
            hu += rim * (r.hu - hu)
            w = np.maximum(w, rim)
            cls[rim >= 0.5] = MULTICLASS["consolidation"]
        if self.dependent is not None:
            y_level, width, dep_hu = self.dependent
            dep = _smooth((y_level - y[None, :, None]) / width + 0.5) * edge
            hu += dep * (dep_hu - hu)
            w = np.maximum(w, dep)
            cls[dep >= 0.5] = MULTICLASS["consolidation"]
        if self.septa is not None:
            hu += self.septa(x, y, z) * (self.septa_hu - hu)
        return w, hu, g >= 0, cls


# ----------------------------------------------------------------------------------------------------------------------
# Lesion kinds: one small function each, from a site (where, how big) to layers (and air bronchograms).


@dataclass
class _Site:
    """Where a lesion grows: centre (nominal mm), lung side, drawn size (mm) and what the kind may need."""

    an: _Anatomy
    fissures: _Fissures
    rng: np.random.Generator
    spec: PhantomSpec
    center: np.ndarray
    side: int
    size: float

    @property
    def voxel(self) -> float:
        return self.an.spacing[0]

    def u(self, lo: float, hi: float) -> float:
        return _u(self.rng, lo, hi)

    def margin(self) -> float:
        return self.u(*self.spec.margin_mm)

    def ggo(self, lo: float = 0.0, hi: float = 1.0) -> float:
        """A ground-glass HU from the ``lo``...``hi`` fraction of the spec's range."""
        a, b = self.spec.ggo_hu
        return self.u(a + lo * (b - a), a + hi * (b - a))

    def consolidation(self) -> float:
        return self.u(*self.spec.consolidation_hu)

    def texture(self, scale: float = 1.0) -> dict[str, object]:
        """A mottled texture (noise and amplitude), fainter when the mottles are smaller than a voxel."""
        mm = self.u(*self.spec.texture_mm)
        amp = self.u(*self.spec.mottle) * scale * min(1.0, mm / self.voxel)
        return {"texture": _Noise(self.rng, mm), "mottle": amp}

    def outline(self, radius: float, blobs: int = 1, lobulation: float = 0.15, roughness: float = 0.05) -> _Blobs:
        """A lobulated, rough union of ``blobs`` ellipsoids about ``radius`` mm."""
        rng, k = self.rng, max(1, int(blobs))
        offsets = rng.normal(size=(k, 3))
        offsets *= rng.uniform(0.3, 0.8, (k, 1)) * radius / np.linalg.norm(offsets, axis=1, keepdims=True)
        offsets[0] = 0.0
        sizes = radius * rng.uniform(0.45, 0.8, k)
        sizes[0] = radius
        to_unit, means, reach = [], [], []
        for size in sizes:
            axes = rng.uniform(0.6, 1.0, 3)
            axes = size * axes / axes.max()
            to_unit.append((_random_rotation(rng) / axes[None, :]).T)
            means.append(axes.mean())
            reach.append(axes.max())
        centers = self.center[None] + offsets
        slack = 1.0 + 2.5 * (lobulation + roughness)
        lo = (centers - np.array(reach)[:, None] * slack).min(0)
        hi = (centers + np.array(reach)[:, None] * slack).max(0)
        return _Blobs(
            centers,
            np.array(to_unit),
            np.array(means),
            lo,
            hi,
            _Noise(rng, radius * self.u(0.5, 1.0)),
            lobulation * float(np.mean(means)),
            _Noise(rng, self.u(2.0, 4.0)),
            roughness * float(np.mean(means)),
        )

    def holes(self, region: _Blobs | _Lobe, radius: float) -> _Holes:
        """Holes of spared lung covering 10-30 % of ``region``, none near the centre."""
        scale = self.u(2.5, 6.0)
        level = float(special.ndtri(1.0 - self.u(0.1, 0.3)))
        return _Holes(region, _Noise(self.rng, scale), level, scale, self.center, 0.35 * radius)


@dataclass
class _Drawn:
    layers: list[_Layer]
    hu: float
    airways: np.ndarray = field(default_factory=lambda: np.zeros((0, 8)))


def _ground_glass(s: _Site) -> _Drawn:
    """Patchy ground glass: hazy, mottled, vessels still seen through it; holes and irregular, lobulated outlines."""
    r = 0.5 * s.size
    region = s.outline(r, blobs=int(s.rng.integers(1, 6)), lobulation=s.u(0.08, 0.2), roughness=s.u(0.02, 0.1))
    hu = s.ggo()
    holey = s.holes(region, r) if s.rng.random() < s.spec.holes else region
    return _Drawn([_Layer(holey, hu, MULTICLASS["ground_glass"], s.margin(), **s.texture())], hu)


def _crazy_paving(s: _Site) -> _Drawn:
    """Crazy paving: ground glass under a polygonal reticulation of thickened interlobular septa."""
    r = 0.5 * s.size
    region = s.outline(r, blobs=int(s.rng.integers(1, 4)), lobulation=s.u(0.05, 0.15), roughness=s.u(0.02, 0.06))
    hu = s.ggo(0.3, 1.0)
    septa = _Septa.draw(s.rng, region.lo, region.hi, s.u(4.0, 10.0), s.u(0.7, 2.0), s.voxel)
    septa_hu = min(hu + s.u(150.0, 400.0), -50.0)
    layer = _Layer(region, hu, MULTICLASS["ground_glass"], s.margin(), septa=septa, septa_hu=septa_hu, **s.texture(0.4))
    return _Drawn([layer], hu)


def _hilum(s: _Site) -> np.ndarray:
    sign = 1.0 if s.side == 1 else -1.0
    return np.array([sign * (s.an.mw + 12.0 * s.an.k), s.an.y_trachea - 8.0 * s.an.k, 0.1 * _H])


def _consolidation(s: _Site) -> _Drawn:
    """Consolidation (vessels obscured) with air bronchograms, often inside a rim of ground glass."""
    r = 0.5 * s.size
    core = s.outline(r, blobs=int(s.rng.integers(1, 4)), lobulation=s.u(0.05, 0.2), roughness=s.u(0.02, 0.08))
    hu = s.consolidation()
    layers = [_Layer(core, hu, MULTICLASS["consolidation"], s.u(0.5, 1.5), **s.texture(0.15))]
    if s.rng.random() < 0.7:
        rim = _Grown(core, s.u(2.0, 10.0))
        layers.append(_Layer(rim, s.ggo(0.2, 1.0), MULTICLASS["ground_glass"], s.margin(), **s.texture()))
    airways = np.zeros((0, 8))
    if s.rng.random() < 0.8:  # bronchi entering from the hilar side and branching towards the periphery
        out = s.center - _hilum(s)
        out /= np.linalg.norm(out)
        start = s.center - out * 0.9 * r
        roots = []
        for _ in range(int(s.rng.integers(1, 3))):
            d = out + s.rng.normal(0.0, 0.3, 3)
            roots.append((start, d / np.linalg.norm(d)))
        r0 = s.u(1.0, 2.2)
        airways = _tree(s.rng, roots, (r0, 0.75 * r0, 0.55 * r0), (0.6 * r, 0.9 * r))
    return _Drawn(layers, hu, airways)


def _reversed_halo(s: _Site) -> _Drawn:
    """Reversed halo (atoll) sign: central ground glass ringed, fully or in part, by consolidation."""
    r = 0.5 * s.size
    region = s.outline(r, lobulation=s.u(0.0, 0.1), roughness=s.u(0.02, 0.06))
    gap = None
    if s.rng.random() < 0.35:
        gap = s.rng.normal(size=3)
        gap /= np.linalg.norm(gap)
    ring = _Ring(s.u(2.0, max(2.5, 0.3 * r)), s.consolidation(), s.center.copy(), gap, s.u(0.2, 0.7))
    hu = s.ggo(0.0, 0.6)
    return _Drawn([_Layer(region, hu, MULTICLASS["ground_glass"], s.margin(), ring=ring, **s.texture(0.5))], hu)


def _nodule(s: _Site) -> _Drawn:
    """A small nodule, 3-12 mm: ground glass or solid, a solid one sometimes in a ground-glass halo."""
    r = 0.5 * s.size
    region = s.outline(r, lobulation=s.u(0.0, 0.1), roughness=s.u(0.0, 0.05))
    if s.rng.random() < 0.4:
        hu = s.consolidation()
        layers = [_Layer(region, hu, MULTICLASS["consolidation"], s.u(0.3, 1.0))]
        if s.rng.random() < 0.4:  # the halo sign
            layers.append(_Layer(_Grown(region, s.u(2.0, 5.0)), s.ggo(), MULTICLASS["ground_glass"], s.margin()))
        return _Drawn(layers, hu)
    hu = s.ggo()
    return _Drawn([_Layer(region, hu, MULTICLASS["ground_glass"], s.u(0.3, 2.0), **s.texture(0.5))], hu)


def _band(s: _Site) -> _Drawn:
    """A linear opacity: a parenchymal band reaching the pleura, or a curvilinear line parallel to the pleura."""
    an, c = s.an, s.center
    thick, hu = s.u(1.5, 4.0), s.u(*s.spec.band_hu)
    dense = hu > 0.5 * (s.spec.ggo_hu[1] + s.spec.consolidation_hu[0])
    cls = MULTICLASS["consolidation" if dense else "ground_glass"]
    depth = float(_lung_margin(an, c[0], c[1], c[2] / _H, s.side, costal=True))
    reach = np.full(3, 0.6 * s.size + 5.0)
    if s.rng.random() < 0.5 and 1.0 <= depth <= 12.0:
        region = _Subpleural(an, s.side, c, depth, thick, 0.5 * s.size, c - reach, c + reach)
    else:
        sign = 1.0 if s.side == 1 else -1.0
        axis = np.array([c[0] - sign * an.lung_cx, c[1] - an.lung_cy, 0.0])  # outwards, to the pleura
        axis = axis / (np.linalg.norm(axis) + 1e-9) + s.rng.normal(0.0, 0.3, 3) * np.array([1.0, 1.0, 0.5])
        axis /= np.linalg.norm(axis)
        normal = np.cross(axis, s.rng.normal(size=3))
        normal /= np.linalg.norm(normal)
        region = _Ribbon(c, axis, normal, s.size, thick, s.u(4.0, 15.0), c - reach, c + reach)
    return _Drawn([_Layer(region, hu, cls, min(s.margin(), 0.5 * thick), **s.texture(0.3))], hu)


def _lobar(s: _Site) -> _Drawn:
    """A lobe (or its peripheral rind) with patchy ground glass, holes, and often dependent consolidation."""
    an, c = s.an, s.center
    lobe = s.fissures.lobe_of(s.side, c[0], c[1], c[2], an.lung_cy)
    depth = None
    if s.rng.random() < 0.65:  # peripheral: the outer rind, deep enough to hold the site
        here = float(_lung_margin(an, c[0], c[1], c[2] / _H, s.side, costal=True))
        depth = max(s.size, here + 8.0)
    sign = 1.0 if s.side == 1 else -1.0
    xs = sorted((sign * an.mw, sign * (an.lung_cx + max(an.lung_ax))))
    lo = np.array([xs[0], an.lung_cy - an.lung_ay, an.base_t * _H])
    hi = np.array([xs[1], an.lung_cy + an.lung_ay, an.apex_t * _H])
    region = _Lobe(an, s.fissures, s.side, lobe, depth, _Noise(s.rng, s.u(8.0, 20.0)), s.u(2.0, 6.0), lo, hi)
    hu = s.ggo()
    dependent = None
    if s.rng.random() < 0.4:
        dependent = (an.lung_cy - an.lung_ay * s.u(0.3, 0.7), s.u(5.0, 15.0), s.consolidation())
    holey = s.holes(region, 20.0) if s.rng.random() < s.spec.holes else region
    layer = _Layer(holey, hu, MULTICLASS["ground_glass"], s.margin(), dependent=dependent, **s.texture())
    return _Drawn([layer], hu)


LESION_KINDS: dict[str, Callable[[_Site], _Drawn]] = {
    "ground_glass": _ground_glass,
    "crazy_paving": _crazy_paving,
    "consolidation": _consolidation,
    "reversed_halo": _reversed_halo,
    "nodule": _nodule,
    "band": _band,
    "lobar": _lobar,
}
"""The lesion kinds by name: each function draws one lesion's layers at a site."""

DEFAULT_SPEC = PhantomSpec()
"""The whole parameter space (every kind, every scanner)."""


# ----------------------------------------------------------------------------------------------------------------------
# Vessels, bronchi, placement: the content of one case


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _rotate_away(rng: np.random.Generator, d: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Two child directions at +-angle (radians) from ``d`` in a random plane."""
    perp = _cross(d, rng.normal(size=3))
    perp /= np.linalg.norm(perp) + 1e-12
    c1 = np.cos(angle) * d + np.sin(angle) * perp
    a2 = angle * rng.uniform(0.7, 1.3)
    c2 = np.cos(a2) * d - np.sin(a2) * perp
    return c1 / np.linalg.norm(c1), c2 / np.linalg.norm(c2)


def _tree(
    rng: np.random.Generator,
    roots: Sequence[tuple[np.ndarray, np.ndarray]],
    radii: Sequence[float],
    length: tuple[float, float],
) -> np.ndarray:
    """Branching trees of tapered tubes: segments (n, 8) = start xyz, end xyz, start and end radius (mm).

    Every segment splits in two (18-38 degrees apart from it) until the last of ``radii``; children are 70-86 % as
    long as their parent.
    """
    segments = []
    for p0, d0 in roots:
        stack = [(np.asarray(p0, float), np.asarray(d0, float), _u(rng, *length), 0)]
        while stack:
            p, d, seg_len, level = stack.pop()
            q = p + d * seg_len
            r1 = radii[level + 1] if level + 1 < len(radii) else 0.8 * radii[level]
            segments.append([*p, *q, radii[level], r1])
            if level + 1 < len(radii):
                for child in _rotate_away(rng, d, np.deg2rad(_u(rng, 18, 38))):
                    stack.append((q, child, seg_len * _u(rng, 0.7, 0.86), level + 1))
    return np.array(segments, dtype=np.float64).reshape(-1, 8)


def _vessel_tree(an: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Pulmonary arteries and veins: six trees per lung from the hilum, 10 mm down to 2.4 mm across (the
    small vessels are a network, see ``_paint_lungs``)."""
    k = an.k
    roots = []
    for sign in (1.0, -1.0):
        hilum = np.array([sign * (an.mw + 12.0 * k), an.y_trachea - 8.0 * k, 0.1 * _H])
        for base in (
            (0.5, 0.0, 0.85),
            (0.7, 0.6, -0.2),
            (0.55, -0.35, -0.75),
            (0.8, -0.5, 0.1),
            (0.6, 0.4, 0.5),
            (0.5, -0.6, -0.4),
        ):
            d = np.array([sign * base[0], base[1], base[2]]) + rng.normal(0.0, 0.15, 3)
            roots.append((hilum, d / np.linalg.norm(d)))
    return _tree(rng, roots, tuple(r * k for r in (5.0, 3.5, 2.4, 1.7, 1.2)), (35.0 * k, 50.0 * k))


def _bronchial_tree(an: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Bronchi from the ends of the main bronchi: four trees per lung, lumen 9 mm down to 3 mm across."""
    k = an.k
    roots = []
    for sign in (1.0, -1.0):
        start = np.array([sign * 30.0 * k, an.y_trachea - 4.0 * k, 0.12 * _H])
        for base in ((0.5, 0.1, 0.8), (0.7, 0.5, -0.3), (0.5, -0.4, -0.8), (0.8, -0.4, 0.1)):
            d = np.array([sign * base[0], base[1], base[2]]) + rng.normal(0.0, 0.15, 3)
            roots.append((start, d / np.linalg.norm(d)))
    return _tree(rng, roots, tuple(r * k for r in (4.5, 3.2, 2.2, 1.5)), (30.0 * k, 40.0 * k))


def _inside(an: _Anatomy, p: np.ndarray, side: int) -> bool:
    X, Y, T = p[:1], p[1:2], p[2:] / _H
    return bool(_lung_labels(an, X, Y, T, _depth(an, X, Y, T))[0] == side)


def _snap(an: _Anatomy, p: np.ndarray) -> np.ndarray:
    """The voxel centre nearest to ``p``: a lesion's centre voxel is then sampled whatever the grid."""
    return an.from_voxel(np.rint(an.to_voxel(p)))


def _lung_point(
    an: _Anatomy, rng: np.random.Generator, side: int, radial: tuple[float, float], diaphragm: float
) -> tuple[np.ndarray, int]:
    """A random voxel centre (nominal mm) in a lung, preferring lower, posterior, peripheral positions.

    ``radial`` is the range of positions along a ray from the middle of the lung (0) to the pleura (1);
    ``diaphragm`` the chance to move the point down onto the diaphragm.
    """
    for attempt in range(100):
        if attempt == 50:
            side = 3 - side
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
        last = r[inside].max()
        j = int(np.argmin(np.abs(r - rng.uniform(*radial) * last)))
        p = _snap(an, np.array([X[j], Y[j], t * _H]))
        if rng.random() < diaphragm:
            dx = (p[0] - sign * an.lung_cx) / an.lung_ax[side - 1]
            dy = (p[1] - an.lung_cy) / an.lung_ay
            dome = an.base_t + an.dome[side - 1] * max(0.0, 1.0 - (dx * dx + dy * dy) / 0.7)
            low = _snap(an, np.array([p[0], p[1], (dome + 0.03) * _H]))
            if _inside(an, low, side):
                p = low
        if _inside(an, p, side):
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


@dataclass
class _Case:
    """Everything random about one phantom's content (the scanner aside)."""

    an: _Anatomy
    fissures: _Fissures
    vessels: np.ndarray
    bronchi: np.ndarray
    airways: np.ndarray  # air bronchograms: lumens without walls
    layers: list[_Layer]
    lesions: list[tuple[str, float, int, float, np.ndarray]]  # kind, HU, side, radius, centre (nominal mm)
    network: tuple[_Noise, _Noise, float, float]  # small vessels: two fields, their scale (mm) and tube radius (mm)
    emphysema: tuple[_Noise, float, float] | None  # noise, level, lowest t of the zone
    atelectasis: tuple[float, float, float, float] | None  # thickness mm, HU at the pleura, top t, posterior start


def _draw_lesions(
    an: _Anatomy, fissures: _Fissures, rng: np.random.Generator, spec: PhantomSpec
) -> tuple[list[_Layer], list[tuple[str, float, int, float, np.ndarray]], np.ndarray]:
    """The lesions of one case: bilateral and multifocal, the first one of the larger kinds."""
    layers: list[_Layer] = []
    lesions = []
    airways = [np.zeros((0, 8))]
    sizeable = [k for k in spec.kinds if k in _SIZEABLE] or list(spec.kinds)
    side = int(rng.integers(1, 3))
    for i in range(int(rng.integers(spec.lesions[0], spec.lesions[1] + 1))):
        pool = sizeable if i == 0 else list(spec.kinds)
        weights = np.array([spec.kind_weights.get(k, 1.0) for k in pool], dtype=float)
        kind = pool[int(rng.choice(len(pool), p=weights / weights.sum()))]
        lo, hi = spec.size_mm[kind]
        size = _u(rng, lo + 0.5 * (hi - lo) if i == 0 else lo, hi)
        side = 3 - side if rng.random() < 0.7 else int(rng.integers(1, 3))
        radial = (max(0.9, spec.peripheral[0]), 1.0) if kind == "band" else spec.peripheral
        if i == 0:  # the first lesion well inside the lung, so that every case has a sizeable one
            radial = (radial[0], min(radial[1], max(radial[0], 0.8)))
        center, side = _lung_point(an, rng, side, radial, spec.diaphragm if i else 0.0)
        drawn = LESION_KINDS[kind](_Site(an, fissures, rng, spec, center, side, size))
        layers += drawn.layers
        airways.append(drawn.airways)
        lesions.append((kind, drawn.hu, side, 0.5 * size, center))
    return layers, lesions, np.concatenate(airways)


def _draw_case(an: _Anatomy, rngs: Sequence[np.random.Generator], spec: PhantomSpec) -> _Case:
    rng_vessel, rng_lesion, rng_lung = rngs
    fissures = _draw_fissures(an, rng_lung, spec)
    layers, lesions, airways = _draw_lesions(an, fissures, rng_lesion, spec)
    emphysema = atelectasis = None
    if rng_lung.random() < spec.emphysema:
        emphysema = (
            _Noise(rng_lung, _u(rng_lung, 3.0, 7.0)),
            float(special.ndtri(1 - _u(rng_lung, 0.04, 0.15))),
            _u(rng_lung, -0.4, 0.2),
        )
    if rng_lung.random() < spec.atelectasis:
        atelectasis = (
            _u(rng_lung, 5.0, 15.0),
            _u(rng_lung, -400.0, -50.0),
            _u(rng_lung, -0.55, -0.2),
            _u(rng_lung, 0.1, 0.4),
        )
    vessels = _vessel_tree(an, rng_vessel)
    bronchi = _bronchial_tree(an, rng_vessel)
    scale = _u(rng_vessel, 5.0, 9.0)
    network = (_Noise(rng_vessel, scale), _Noise(rng_vessel, scale), scale, _u(rng_vessel, 0.7, 1.4) * an.k)
    return _Case(an, fissures, vessels, bronchi, airways, layers, lesions, network, emphysema, atelectasis)


def _draw_scanner(rng: np.random.Generator, spec: PhantomSpec) -> Scanner:
    motion = rng.random() < spec.motion
    motion_z = (_u(rng, -_H, 0.0), 0.0)
    motion_z = (motion_z[0], motion_z[0] + _u(rng, 30.0, 120.0))
    streaks: list[tuple[float, ...]] = []
    if rng.random() < spec.streaks:
        z0 = _u(rng, -_H, 0.6 * _H)
        z1 = z0 + _u(rng, 20.0, 90.0)
        cx, cy = _u(rng, -40.0, 40.0), _u(rng, -40.0, 20.0)
        for _ in range(int(rng.integers(3, 10))):
            streaks.append(
                (
                    z0,
                    z1,
                    cx,
                    cy,
                    _u(rng, 0.0, np.pi),
                    _u(rng, 20.0, 90.0) * float(rng.choice([-1.0, 1.0])),
                    _u(rng, 1.0, 3.0),
                )
            )
    return Scanner(
        noise_hu=_u(rng, *spec.noise_hu),
        kernel=_u(rng, *spec.kernel),
        slice_thickness_mm=_u(rng, *spec.slice_thickness_mm),
        hu_offset=_u(rng, *spec.hu_offset),
        hu_gain=_u(rng, *spec.hu_gain),
        motion_mm=_u(rng, 3.0, 8.0) if motion else 0.0,
        motion_z=motion_z if motion else (0.0, 0.0),
        streaks=tuple(streaks),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Rendering: the body, then the lungs' content on sub-slices, averaged over each slice's thickness


def _paint_body(
    an: _Anatomy, X: np.ndarray, Y: np.ndarray, T: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free HU, tissue and lung labels of the body at broadcast points, and the lungs' own HU."""
    f32, k = np.float32, an.k
    Zn = T * f32(_H)
    shape3 = np.broadcast_shapes(X.shape, Y.shape, T.shape)
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
    paint(_airway(an, X, Y, T) & body, -1000.0, "airway")
    # lungs, denser posteriorly (their content is painted by _paint_lungs)
    lungs = _lung_labels(an, X, Y, T, depth)
    parenchyma = np.broadcast_to(an.hu_lung - an.lung_grad * np.clip(Y / an.b, -1.0, 1.0), shape3).astype(f32)
    paint(lungs > 0, parenchyma, "lung")
    return img, tis, lungs, parenchyma


def _block(lo: np.ndarray, hi: np.ndarray, axes: Sequence[np.ndarray]) -> tuple[slice, slice, slice] | None:
    """Index slices of the sorted grid axes inside the box [lo, hi] (mm), or None when it misses the grid."""
    out = []
    for a, b, axis in zip(lo, hi, axes, strict=True):
        i0, i1 = np.searchsorted(axis, [a, b])
        if i1 <= i0:
            return None
        out.append(slice(int(i0), int(i1)))
    return out[0], out[1], out[2]


def _paint_tubes(
    segments: np.ndarray,
    axes: Sequence[np.ndarray],
    voxel: float,
    targets: Sequence[tuple[np.ndarray, float, float]],
) -> None:
    """Max-composite the partial-volume occupancy (0...1) of tapered tubes into each target array.

    A target is ``(array, a, b)``: the tubes grown by ``a + b * radius`` mm (a bronchial wall), or as they are
    (``0, 0``). A tube thinner than a voxel gets its area's share of the voxel, not a full voxel.
    """
    if not len(segments):
        return
    grow = max(a + b * float(segments[:, 6:].max()) for _, a, b in targets)
    reach = segments[:, 6:].max(1) + grow + voxel
    lo = np.minimum(segments[:, :3], segments[:, 3:6]) - reach[:, None]
    hi = np.maximum(segments[:, :3], segments[:, 3:6]) + reach[:, None]
    bounds = [(np.searchsorted(a, lo[:, i]), np.searchsorted(a, hi[:, i])) for i, a in enumerate(axes)]
    keep = np.flatnonzero((bounds[0][1] > bounds[0][0]) & (bounds[1][1] > bounds[1][0]) & (bounds[2][1] > bounds[2][0]))
    f32 = np.float32
    for n in keep:
        blk = tuple(slice(int(b[0][n]), int(b[1][n])) for b in bounds)
        ax, ay, az, bx, by, bz, r0, r1 = segments[n]
        X, Y, Z = _grid(*(axis[s].astype(f32) - f32(c) for axis, s, c in zip(axes, blk, (ax, ay, az), strict=True)))
        dx, dy, dz = f32(bx - ax), f32(by - ay), f32(bz - az)
        t = np.clip((X * dx + Y * dy + Z * dz) * f32(1.0 / max(dx * dx + dy * dy + dz * dz, 1e-9)), 0.0, 1.0)
        dist = np.sqrt((X - t * dx) ** 2 + (Y - t * dy) ** 2 + (Z - t * dz) ** 2)
        radius = f32(r0) + t * f32(r1 - r0)
        for array, a, b in targets:
            r = radius * f32(1.0 + b) + f32(a)
            r_eff = np.maximum(r, f32(0.5 * voxel))
            occ = np.minimum(f32(1.0), (r / r_eff) ** 2) * np.clip((r_eff - dist) * f32(1.0 / voxel) + 0.5, 0.0, 1.0)
            view = array[blk]
            np.maximum(view, occ, out=view)


def _paint_lungs(
    case: _Case,
    axes: Sequence[np.ndarray],
    T: np.ndarray,
    img: np.ndarray,
    tis: np.ndarray,
    lungs: np.ndarray,
    parenchyma: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint the lungs' content into ``img``/``tis``: emphysema, atelectasis, fissures, lesions, vessels, bronchi.

    Returns the lesion label and the lesion type on the same grid.
    """
    an, f32 = case.an, np.float32
    x, y, z = axes
    X, Y, _ = _grid(x, y, z)
    in_lung = lungs > 0
    sx = an.spacing[0]
    P = parenchyma.copy()
    if case.emphysema is not None:  # centrilobular: lucencies without walls, upper zones
        noise, level, t0 = case.emphysema
        e = _smooth((noise(x, y, z) - level) / 0.5 + 0.5) * _smooth((T - t0) / 0.4)
        P += e * (f32(-990.0) - P)
        tis[in_lung & (e >= 0.5)] = TISSUE["emphysema"]
    if case.atelectasis is not None:  # dependent: a band along the posterior pleura of the bases, denser outwards
        thick, hu, t_top, post = case.atelectasis
        dependent = _smooth(((an.lung_cy - Y) / an.lung_ay - post) / 0.3 + 0.5) * _smooth((t_top - T) / 0.15 + 0.5)
        jy, kz = np.flatnonzero(dependent.any(2)[0]), np.flatnonzero(dependent.any(1)[0])
        for side, rows in ((1, np.flatnonzero(x > 0)), (2, np.flatnonzero(x <= 0))):
            if not (len(rows) and len(jy) and len(kz)):
                continue
            blk = (slice(rows[0], rows[-1] + 1), slice(jy[0], jy[-1] + 1), slice(kz[0], kz[-1] + 1))
            margin = _lung_margin(an, X[blk[0]], Y[:, blk[1]], T[:, :, blk[2]], side, costal=True)
            a = np.clip(1.0 - margin / thick, 0.0, 1.0) ** 0.7 * dependent[:, blk[1], blk[2]]
            P[blk] += a * (f32(hu) - P[blk])
            tis[blk][in_lung[blk] & (a >= 0.5)] = TISSUE["atelectasis"]
    fis = case.fissures
    if fis.visible:  # thin pleural planes between the lobes
        Z = z[None, None, :]
        dist = np.where(X > 0, np.abs(fis.major_distance(1, X, Y, Z)), np.abs(fis.major_distance(2, X, Y, Z)))
        minor = np.abs(fis.minor_distance(Y, Z, an.lung_cy)) + np.where(
            (X < 0) & (fis.major_distance(2, X, Y, Z) > 0), 0.0, 1e3
        )
        dist = np.minimum(dist, minor)
        v, t = sx, fis.thickness
        occ = min(1.0, t / v) * np.clip((0.5 * max(t, v) + 0.5 * v - dist) / v, 0.0, 1.0)
        P += occ.astype(f32) * (f32(fis.hu) - P)
    # lesions: in each voxel the layer that raises the HU most wins (and gives the type)
    best = np.zeros(img.shape, f32)
    label = np.zeros(img.shape, bool)
    kind = np.zeros(img.shape, np.uint8)
    for layer in case.layers:
        blk = _block(layer.lo, layer.hi, axes)
        if blk is None:
            continue
        w, hu, lab, cls = layer.render(x[blk[0]], y[blk[1]], z[blk[2]])
        lab &= in_lung[blk]
        gain = w * (hu - P[blk])
        b, c = best[blk], kind[blk]
        take = lab & ((gain > b) | (c == 0))
        c[take] = cls[take]
        np.maximum(b, gain, out=b)
        label[blk] |= lab
    hu_lung = P + best
    # vessels over everything (seen through ground glass); bronchial walls, then air in the lumens (bronchograms)
    vessel, wall, lumen = (np.zeros(img.shape, f32) for _ in range(3))
    _paint_tubes(case.vessels, axes, sx, [(vessel, 0.0, 0.0)])
    n1, n2, scale, radius = case.network  # small vessels: tubes where two smooth fields are both near zero
    width = 1.55 * radius / scale  # field distance of the tube's edge (the fields change by ~1.55 per scale mm)
    spread = max(1.0, 0.5 * sx / radius)  # a tube thinner than a voxel: wider and fainter, its area's share
    rho = np.sqrt(n1(x, y, z) ** 2 + n2(x, y, z) ** 2)
    small = _smooth((width * spread - rho) / (0.5 * width * spread) + 0.5) * f32(min(1.0, 1.0 / spread**2))
    np.maximum(vessel, small, out=vessel)
    _paint_tubes(case.bronchi, axes, sx, [(wall, 0.3, 0.2), (lumen, 0.0, 0.0)])
    if len(case.airways):
        _paint_tubes(case.airways, axes, sx, [(lumen, 0.0, 0.0)])
    hu_lung += vessel * np.maximum(f32(an.hu_vessel) - hu_lung, 0.0)
    hu_lung += wall * np.maximum(f32(an.hu_soft - 30.0) - hu_lung, 0.0)
    hu_lung += lumen * (f32(-1000.0) - hu_lung)
    img[in_lung] = hu_lung[in_lung]
    tis[in_lung & (vessel >= 0.5)] = TISSUE["vessel"]
    tis[in_lung & (wall >= 0.5)] = TISSUE["bronchus"]
    tis[label] = TISSUE["lesion"]
    return label, kind


def _sub_slices(nz: int, thickness: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Sorted nominal z of the sub-slices, the order that lists them slice by slice, and sub-slices per slice.

    A slice averages its thickness: one sample for thin slices, three across thicker ones.
    """
    m = 1 if thickness < 2.0 else 3
    centres = np.linspace(-_H, _H, nz)
    pos = (centres[:, None] + (np.arange(m) - (m - 1) / 2.0)[None, :] * thickness / m).ravel()
    order = np.argsort(pos, kind="stable")
    return pos[order], np.argsort(order, kind="stable"), m


def _render(
    case: _Case, lo: int, hi: int, zf: np.ndarray, by_slice: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free HU, lung labels, infection, lesion type and tissue of canonical rows [lo, hi)."""
    an = case.an
    nx, ny, nz = an.shape
    sx, sy, _ = an.spacing
    x = (np.arange(lo, hi) - (nx - 1) / 2.0) * sx - an.body_dx
    y = (np.arange(ny) - (ny - 1) / 2.0) * sy - an.body_dy
    X, Y = x.astype(np.float32)[:, None, None], y.astype(np.float32)[None, :, None]
    T = (zf / _H).astype(np.float32)[None, None, :]
    img, tis, lungs, parenchyma = _paint_body(an, X, Y, T)
    label, kind = np.zeros(img.shape, bool), np.zeros(img.shape, np.uint8)
    found = [np.flatnonzero(lungs.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1))]
    if all(len(f) for f in found):  # the lungs' content, within the lungs' box
        b = tuple(slice(f[0], f[-1] + 1) for f in found)
        axes = (x[b[0]], y[b[1]], zf[b[2]])
        label[b], kind[b] = _paint_lungs(case, axes, T[:, :, b[2]], img[b], tis[b], lungs[b], parenchyma[b])

    def slices(a: np.ndarray) -> np.ndarray:  # (rows, ny, nz * m) sorted sub-slices -> (rows, ny, nz, m)
        return a[..., by_slice].reshape(hi - lo, ny, nz, m)

    image = slices(img).mean(-1)
    infected = slices(label).mean(-1) >= 0.5
    lung_labels = np.where(slices(lungs == 1).mean(-1) >= 0.5, 1, np.where(slices(lungs == 2).mean(-1) >= 0.5, 2, 0))
    consolidation = slices(label & (kind == MULTICLASS["consolidation"])).mean(-1)
    multiclass = np.where(infected, np.where(2 * consolidation >= slices(label).mean(-1), 2, 1), 0)
    tissue = slices(tis)[..., m // 2].copy()
    tissue[(tissue == TISSUE["lesion"]) & ~infected] = TISSUE["lung"]
    tissue[infected] = TISSUE["lesion"]
    return image, lung_labels.astype(np.uint8), infected.astype(np.uint8), multiclass.astype(np.uint8), tissue


def _kernel_sigmas(scanner: Scanner, voxel: float) -> tuple[float, float, float]:
    """In-plane blur of the image, unsharp-mask width and noise correlation (voxels) of the kernel."""
    smooth = max(-scanner.kernel, 0.0)
    blur = float(np.hypot(_BLUR_SIGMA, smooth * 1.0 / voxel))
    unsharp = max(0.8, 1.2 / voxel)
    noise = (0.3 + 0.9 * smooth) / voxel
    return blur, unsharp, noise


def _kernel_noise(noise: np.ndarray, scanner: Scanner, voxel: float) -> np.ndarray:
    """White noise shaped by the kernel: correlated (smooth kernels) or high-pass boosted (sharp ones)."""
    _, unsharp, sigma = _kernel_sigmas(scanner, voxel)
    if scanner.kernel < 0 and sigma >= 0.3:
        return ndimage.gaussian_filter(noise, (sigma, sigma, 0), mode="wrap")
    if scanner.kernel > 0:
        return noise + 1.5 * scanner.kernel * (
            noise - ndimage.gaussian_filter(noise, (unsharp, unsharp, 0), mode="wrap")
        )
    return noise


def _scan(
    img: np.ndarray, case: _Case, scanner: Scanner, rng: np.random.Generator, lo: int, hi: int, noise_gain: float
) -> np.ndarray:
    """The scanner: point spread and kernel, motion blur, streaks, noise and calibration, on canonical rows."""
    an = case.an
    nx, ny, nz = an.shape
    sx, sy, _ = an.spacing
    blur, unsharp, _ = _kernel_sigmas(scanner, sx)
    img = ndimage.gaussian_filter(img, (blur, blur * sx / sy, 0), mode="nearest", truncate=4.0)
    if scanner.kernel > 0:  # edge enhancement
        soft = ndimage.gaussian_filter(img, (unsharp, unsharp, 0), mode="nearest", truncate=4.0)
        img += 0.8 * scanner.kernel * (img - soft)
    zs = np.linspace(-_H, _H, nz)
    if scanner.motion_mm > 0:  # respiratory motion: blur along anterior-posterior over a range of slices
        sel = (zs >= scanner.motion_z[0]) & (zs <= scanner.motion_z[1])
        size = max(2, int(round(scanner.motion_mm / sy)))
        img[:, :, sel] = ndimage.uniform_filter1d(img[:, :, sel], size, axis=1, mode="nearest")
    if scanner.streaks:
        X = ((np.arange(lo, hi) - (nx - 1) / 2.0) * sx - an.body_dx)[:, None]
        Y = ((np.arange(ny) - (ny - 1) / 2.0) * sy - an.body_dy)[None, :]
        for z0, z1, cx, cy, angle, amp, width in scanner.streaks:
            sel = (zs >= z0) & (zs <= z1)
            dist = np.abs(-np.sin(angle) * (X - cx) + np.cos(angle) * (Y - cy))
            img[:, :, sel] += (amp * np.exp(-0.5 * (dist / width) ** 2)).astype(np.float32)[:, :, None]
    noise = _kernel_noise(rng.standard_normal(img.shape, dtype=np.float32), scanner, sx)
    img = img * np.float32(scanner.hu_gain) + np.float32(scanner.hu_offset)
    img += noise * np.float32(scanner.noise_hu / noise_gain)
    return img


def _render_volume(
    case: _Case, scanner: Scanner, rng_noise: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    an = case.an
    nx, ny, nz = an.shape
    zf, by_slice, m = _sub_slices(nz, scanner.slice_thickness_mm)
    probe = _kernel_noise(
        np.random.default_rng(0).standard_normal((64, 64, 4), dtype=np.float32), scanner, an.spacing[0]
    )
    noise_gain = float(probe.std())
    halo = int(np.ceil(4.0 * max(_kernel_sigmas(scanner, an.spacing[0])))) + 1
    image = np.empty(an.shape, dtype=np.int16)
    lungs, infection, multiclass, tissue = (np.empty(an.shape, dtype=np.uint8) for _ in range(4))
    rows = max(1, _CHUNK_VOXELS // (ny * len(zf)))
    for lo in range(0, nx, rows):
        hi = min(nx, lo + rows)
        hlo, hhi = max(0, lo - halo), min(nx, hi + halo)
        img, lab, inf, mc, tis = _render(case, hlo, hhi, zf, by_slice, m)
        img = _scan(img, case, scanner, rng_noise, hlo, hhi, noise_gain)
        core = slice(lo - hlo, hi - hlo)
        image[lo:hi] = np.clip(np.rint(img[core]), *HU_CLIP)
        lungs[lo:hi], infection[lo:hi], multiclass[lo:hi], tissue[lo:hi] = lab[core], inf[core], mc[core], tis[core]
    return image, lungs, infection, multiclass, tissue


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
    spec: PhantomSpec | None = None,
) -> Phantom:
    """Generate one synthetic chest CT with COVID-19 lesions.

    The anatomy is built in a canonical RAS grid and stored in ``orientation``: the arrays are flipped/permuted and
    the affine adjusted, so that the world (RAS) position of every anatomical point does not depend on the storage
    orientation. ``"oblique"`` stores the RAS arrays with an affine rotated by 5-15 degrees about z and 1-4 degrees
    about x (about the volume centre). World RAS: the patient's right is +x, anterior +y, superior +z; lung
    label 1 (left) is always the lung on the world -x side. The result is a function of (stored shape, spacing,
    seed, orientation, origin, spec) only.

    Args:
        shape: stored array shape (X, Y, Z); in-plane sizes >= 16, slices >= 4.
        spacing: voxel size (mm) along the stored axes. None draws it from the seed: square in-plane pixels for the
            spec's field of view (300-460 mm), slices the spec's spacing apart (1.5-5 mm), at least 0.3 mm different
            from the in-plane size.
        seed: random seed; the same arguments always give the same phantom.
        orientation: one of :data:`ORIENTATIONS` or any 3-letter axis code such as ``"PIL"``.
        origin: world RAS position (mm) of the first stored voxel, i.e. ``affine[:3, 3]``. None draws a
            scanner-like origin (tens to hundreds of mm) from the seed.
        spec: the parameter ranges to draw from (default :data:`DEFAULT_SPEC`: every lesion kind and scanner).

    Returns:
        A :class:`Phantom` with int16 HU image, uint8 infection mask, uint8 lesion type (1 ground glass,
        2 consolidation), uint8 lung labels (1 left, 2 right), uint8 tissue labels, the affine, the stored spacing,
        the lesions and the scanner settings.

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
    spec = DEFAULT_SPEC if spec is None else spec
    rng_geom, rng_anat, rng_vessel, rng_lesion, rng_noise, rng_obl, rng_lung, rng_scan = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(8)
    )

    # spacing and canonical affine
    if spacing is None:
        s_in = round(_u(rng_geom, *spec.fov_mm) / max(canon[0], canon[1]), 4)
        s_z = round(_u(rng_geom, *spec.slice_spacing_mm), 4)
        while abs(s_z - s_in) < 0.3:
            s_z = round(_u(rng_geom, *spec.slice_spacing_mm), 4)
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
    an = _draw_anatomy(rng_anat, canon, canon_sp, spec)
    case = _draw_case(an, (rng_vessel, rng_lesion, rng_lung), spec)
    scanner = _draw_scanner(rng_scan, spec)
    image, lungs, infection, multiclass, tissue = _render_volume(case, scanner, rng_noise)
    # the anatomy is drawn with array axis 0 towards the patient's left; RAS world x grows towards the patient's
    # right (NIfTI, nibabel, MONAI, 3D Slicer), so mirror axis 0 to put the canonical grid in RAS
    image, lungs, infection, multiclass, tissue = (
        np.ascontiguousarray(a[::-1]) for a in (image, lungs, infection, multiclass, tissue)
    )

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
    canonical = [image, infection, lungs, tissue, multiclass]
    del image, infection, lungs, tissue, multiclass
    arrays = []
    while canonical:  # one array at a time keeps the peak memory at one extra copy
        arrays.append(np.ascontiguousarray(nio.apply_orientation(canonical.pop(0), ornt)))
    to_stored = np.linalg.inv(to_canon)
    lesions = []
    for kind, hu, side, radius, centre in case.lesions:
        vox = an.to_voxel(centre)
        v = to_stored @ np.array([canon[0] - 1 - vox[0], vox[1], vox[2], 1.0])
        w = affine @ v
        lesions.append(Lesion(kind, round(hu, 1), side, radius, tuple(v[:3].tolist()), tuple(w[:3].tolist())))
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
        multiclass=arrays[4],
        scanner=scanner,
    )


# ----------------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------------
# Files


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike[str]) -> str:
    """Write ``array`` (its dtype kept) with ``affine`` as qform and sform, atomically: the project's NIfTI writer,
    :func:`covid_monai.io.save_nifti_like`.

    Returns:
        The path written.
    """
    from covid_monai.io import save_nifti_like  # the writer pulls in MONAI; generating phantoms does not need it

    save_nifti_like(array, path, affine, dtype=array.dtype)
    return os.fspath(path)


def write_phantoms(
    out_dir: str | os.PathLike[str],
    n: int,
    shape: Sequence[int] = (128, 128, 48),
    seed: int = 0,
    orientations: Sequence[str] | None = None,
    spec: PhantomSpec | None = None,
) -> list[str]:
    """Write ``n`` phantoms as a small data set: ``images/``, ``labels/`` (infection), ``labels_multiclass/`` and
    ``lungs/`` NIfTI files.

    Case ``i`` is named ``phantom_{i:03d}``, uses seed ``seed + i`` and the orientation ``orientations[i % len]``
    (default: cycle through RAS, LPS, LAS, RPI, so a set mixes storage orientations). Images are int16 HU, labels
    uint8 (1 = infection), multi-class labels uint8 (1 = ground glass, 2 = consolidation), lungs uint8 (1 = left,
    2 = right); qform = sform = the phantom's affine; every file is written atomically.

    Args:
        out_dir: output folder (created if needed).
        n: number of cases.
        shape: stored array shape of each case.
        seed: seed of the first case.
        orientations: storage orientations to cycle through.
        spec: the parameter ranges to draw from (default :data:`DEFAULT_SPEC`).

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
    dirs = {k: os.path.join(os.fspath(out_dir), k) for k in ("images", "labels", "labels_multiclass", "lungs")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    names = []
    for i in range(int(n)):
        name = f"phantom_{i:03d}"
        ph = make_phantom(shape, seed=seed + i, orientation=orients[i % len(orients)], spec=spec)
        save_nifti(ph.image, ph.affine, os.path.join(dirs["images"], f"{name}.nii.gz"))
        save_nifti(ph.infection, ph.affine, os.path.join(dirs["labels"], f"{name}.nii.gz"))
        save_nifti(ph.multiclass, ph.affine, os.path.join(dirs["labels_multiclass"], f"{name}.nii.gz"))
        save_nifti(ph.lungs, ph.affine, os.path.join(dirs["lungs"], f"{name}.nii.gz"))
        names.append(name)
    return names

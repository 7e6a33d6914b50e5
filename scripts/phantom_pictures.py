"""Pictures of the synthetic chest-CT phantoms for docs/phantoms.md: one PNG per lesion kind, and the demo's data.

Each picture is an axial slice in lung window (width 1500, level -600 HU), radiological convention (the patient's
right on the left, anterior up), shown twice: as the CT, and with the label's outline (yellow ground glass, red
consolidation).

Usage:
    python scripts/phantom_pictures.py [--out docs/phantoms]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from covid_monai.demo import DISJOINT_PART, TRAINING_PART
from covid_monai.phantom import DEFAULT_SPEC, LESION_KINDS, MULTICLASS, TISSUE, Phantom, PhantomSpec, make_phantom

YELLOW, RED = (255, 220, 0), (255, 40, 40)

# one clear scanner for the lesion pictures: standard kernel, moderate noise, 1.5 mm slices, nothing else
CLEAR_SCANNER = {
    "noise_hu": (15.0, 15.0),
    "kernel": (0.0, 0.0),
    "slice_thickness_mm": (1.5, 1.5),
    "hu_offset": (0.0, 0.0),
    "motion": 0.0,
    "streaks": 0.0,
    "emphysema": 0.0,
    "atelectasis": 0.0,
}


def axial_picture(ph: Phantom, k: int | None = None, zoom: int = 2) -> Image.Image:
    """The axial slice ``k`` (default: the one with the most infection) of a RAS phantom, plain and outlined.

    Args:
        ph: a phantom stored in RAS.
        k: slice index; None picks the slice with the most infection.
        zoom: pixels per voxel.

    Returns:
        An RGB image, the CT on the left and the CT with the label outlines on the right.
    """
    if k is None:
        k = int(np.argmax(ph.infection.sum((0, 1))))
    body = ph.image[:, :, k] > -500
    xs, ys = np.flatnonzero(body.any(1)), np.flatnonzero(body.any(0))
    box = (slice(max(xs[0] - 2, 0), xs[-1] + 3), slice(max(ys[0] - 2, 0), ys[-1] + 3))

    def display(a: np.ndarray) -> np.ndarray:  # RAS [x, y] -> rows anterior to posterior, patient's right first
        return a[box][::-1, ::-1].T

    hu = display(ph.image[:, :, k].astype(np.float32))
    grey = (np.clip((hu + 1350.0) / 1500.0, 0.0, 1.0) * 255).astype(np.uint8)
    grey = np.kron(grey, np.ones((zoom, zoom), np.uint8))
    plain = np.repeat(grey[..., None], 3, -1)
    outlined = plain.copy()
    types = np.kron(display(ph.multiclass[:, :, k]), np.ones((zoom, zoom), np.uint8))
    for value, colour in ((MULTICLASS["ground_glass"], YELLOW), (MULTICLASS["consolidation"], RED)):
        mask = types == value
        edge = mask & ~ndimage.binary_erosion(mask)
        outlined[edge] = colour
    gap = np.full((plain.shape[0], 4, 3), 255, np.uint8)
    return Image.fromarray(np.concatenate([plain, gap, outlined], 1))


def kind_spec(kind: str) -> PhantomSpec:
    """The default parameter space restricted to one lesion kind (two or three lesions) and a clear scanner."""
    return dataclasses.replace(DEFAULT_SPEC, kinds=(kind,), lesions=(2, 3), **CLEAR_SCANNER)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/phantoms"))
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 64))
    parser.add_argument("--kinds", nargs="*", help="lesion kinds to draw (default: all)")
    parser.add_argument("--no-demo", action="store_true", help="skip the pictures of demo phantoms")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = {
        "ground_glass": 3,
        "crazy_paving": 1,
        "consolidation": 2,
        "reversed_halo": 4,
        "nodule": 0,
        "band": 2,
        "lobar": 1,
    }
    for kind in args.kinds or LESION_KINDS:
        ph = make_phantom(tuple(args.shape), seed=seeds.get(kind, 0), spec=kind_spec(kind))
        axial_picture(ph).save(args.out / f"{kind}.png", optimize=True)
        print(f"{args.out / kind}.png: {[les.kind for les in ph.lesions]}")
    # not infection: emphysema and fissures (upper slice), dependent atelectasis (a basal slice)
    spec = dataclasses.replace(
        kind_spec("nodule"), lesions=(1, 1), **{**CLEAR_SCANNER, "emphysema": 1.0, "atelectasis": 1.0}, fissures=1.0
    )
    ph = make_phantom(tuple(args.shape), seed=5, spec=spec)
    upper = int(np.argmax((ph.tissue == TISSUE["emphysema"]).sum((0, 1))))
    basal = int(np.argmax((ph.tissue == TISSUE["atelectasis"]).sum((0, 1))))
    pictures = [axial_picture(ph, k) for k in (upper, basal)]
    both = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures) + 4), "white")
    both.paste(pictures[0], (0, 0))
    both.paste(pictures[1], (0, pictures[0].height + 4))
    both.save(args.out / "not_infection.png", optimize=True)
    print(f"{args.out}/not_infection.png: slices {upper} and {basal}")
    parts = {"train": TRAINING_PART, "disjoint": DISJOINT_PART}
    for seed in () if args.no_demo else (0, 1, 2):  # the demo's two parts at the demo's size
        for part, part_spec in parts.items():
            ph = make_phantom((128, 128, 48), seed=seed, spec=part_spec)
            axial_picture(ph, zoom=3).save(args.out / f"demo_{part}_{seed}.png", optimize=True)
            kinds = [les.kind for les in ph.lesions]
            print(f"{args.out}/demo_{part}_{seed}.png: {kinds}, kernel {ph.scanner.kernel:.2f}")


if __name__ == "__main__":
    main()

"""The demo's split of the phantom space: the training part and the disjoint part share nothing but the anatomy and
the scanners' other settings (the end-to-end test trains on one and scores the other)."""

from __future__ import annotations

import dataclasses

from covid_monai.demo import DISJOINT_PART, TRAINING_PART
from covid_monai.phantom import make_phantom


def test_the_parts_are_disjoint():
    assert TRAINING_PART.kinds and DISJOINT_PART.kinds
    assert not set(TRAINING_PART.kinds) & set(DISJOINT_PART.kinds)
    assert TRAINING_PART.kernel[0] >= DISJOINT_PART.kernel[1]  # no reconstruction kernel in both
    for seed in range(3):
        assert {les.kind for les in make_phantom((48, 48, 16), seed=seed, spec=DISJOINT_PART).lesions} <= set(
            DISJOINT_PART.kinds
        )
        assert DISJOINT_PART.kernel[0] <= make_phantom((48, 48, 16), seed=seed, spec=DISJOINT_PART).scanner.kernel
    # apart from the split, the parts share the rest of the space
    rest = {f.name for f in dataclasses.fields(TRAINING_PART)} - {"kinds", "kernel"}
    assert all(getattr(TRAINING_PART, name) == getattr(DISJOINT_PART, name) for name in rest)

"""The last step of the bundle's post-processing: write a case's maps like its source scan, atomically.

:class:`SaveLikeSourced` is the bundle's writer (``inference.json``): the mask, and when asked the probability map
and the lung labels, each saved by :func:`covid_monai.io.save_nifti_like` in the geometry of the scan they came
from (its NIfTI header reused; for DICOM the series geometry as the affine).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from covid_monai.io import nifti_stem, save_nifti_like

__all__ = ["SaveLikeSourced", "case_name"]


def case_name(data: Mapping[Hashable, Any], key: Hashable, name_key: str = "name") -> str:
    """The name a case's outputs start with: ``data[name_key]`` when given, else the stem of the scan's file name.

    Args:
        data: one case's dictionary.
        key: the saved key; its meta data name the source (``filename_or_obj``) when ``name_key`` is absent.
        name_key: the key holding the case's name (:class:`covid_monai.inference.BatchSegmenter` sets it).

    Example:
        >>> case_name({"name": "case_7"}, "pred")
        'case_7'
    """
    if data.get(name_key):
        return str(data[name_key])
    source = getattr(data[key], "meta", {}).get("filename_or_obj")
    if not source:
        raise ValueError(f"cannot name the output of {key!r}: no {name_key!r} and no source file in its meta data")
    return nifti_stem(str(source))


class SaveLikeSourced(MapTransform):
    """Save each key's map as ``<output_dir>/<case>_<output_postfix><output_ext>``, in the source scan's geometry.

    The map must be on the scan's own voxel grid (channel first, one channel). The file is written atomically by
    :func:`covid_monai.io.save_nifti_like`: with the NIfTI scan as the reference its header is reused (qform, sform
    and their codes exactly the input's), otherwise (a DICOM series) the map's affine is written. The case is named
    by ``data[name_key]``, or by the scan's file name.

    Args:
        keys: the maps to save (e.g. ``"pred"``).
        output_dir: the folder (created).
        output_postfix: after the case name (``"infection"`` gives ``<case>_infection.nii.gz``).
        output_ext: ``".nii.gz"`` or ``".nii"``.
        output_dtype: the stored data type (``"uint8"`` masks, ``"float32"`` probabilities).
        name_key: where the case's name is, when given.
        allow_missing_keys: skip keys that are not in the data.

    Example:
        >>> saver = SaveLikeSourced("pred", output_dir="masks", output_postfix="infection")
        >>> data = saver(data)  # masks/<case>_infection.nii.gz
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        output_postfix: str = "infection",
        output_ext: str = ".nii.gz",
        output_dtype: Any = "uint8",
        name_key: str = "name",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if output_ext not in (".nii.gz", ".nii"):
            raise ValueError(f"output_ext must be .nii.gz or .nii, got {output_ext!r}")
        self.output_dir = Path(output_dir)
        self.output_postfix = output_postfix
        self.output_ext = output_ext
        self.output_dtype = np.dtype(output_dtype)
        self.name_key = name_key

    def path(self, data: Mapping[Hashable, Any], key: Hashable) -> Path:
        """Where ``data[key]`` is written."""
        return self.output_dir / f"{case_name(data, key, self.name_key)}_{self.output_postfix}{self.output_ext}"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Write the maps; ``data`` is returned unchanged."""
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            affine = np.asarray(value.affine, dtype=np.float64)
            array = np.asarray(value.detach().cpu()[0])
            source = value.meta.get("filename_or_obj")
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_nifti_like(array, self.path(d, key), affine, str(source) if source else None, self.output_dtype)
        return d

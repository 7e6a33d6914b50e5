"""Masks as segmentation objects: a 3D Slicer ``.seg.nrrd`` and a DICOM Segmentation (highdicom) for PACS.

Both carry one segment per label with its name, colour and coded meaning (SNOMED CT, as DICOM and 3D Slicer's
terminology expect), on the scan's own grid:

* binary masks: 1 ``infection``, coded like TotalSegmentator's ``lung_covid_infiltrate``: category Morphologically
  Altered Structure (SCT 49755003), type Infiltrate (SCT 47351003) with the modifier COVID-19 (SCT 840539006),
  anatomic region Lung (SCT 39607008);
* multi-class masks: 1 ``ground_glass`` (Ground glass opacity, SCT 1217294009) and 2 ``consolidation``
  (Consolidation, SCT 9656002), same category, modifier and region.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covid_monai.io import atomic_path

__all__ = ["BINARY_SEGMENTS", "MULTICLASS_SEGMENTS", "Segment", "segments_for", "write_dicom_seg", "write_seg_nrrd"]

Coding = tuple[str, str, str]
"""(coding scheme designator, code value, code meaning)."""

_ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")
_COVID = ("SCT", "840539006", "COVID-19")
_LUNG = ("SCT", "39607008", "Lung")


@dataclass(frozen=True)
class Segment:
    """One label of a mask as a segment.

    Attributes:
        label: the voxel value.
        name: segment name (also its ID in Slicer and its label in DICOM).
        color: display colour, RGB 0-255.
        category: segmented property category.
        type: segmented property type.
        modifier: segmented property type modifier, or ``None``.
        region: anatomic region.
    """

    label: int
    name: str
    color: tuple[int, int, int]
    category: Coding = _ALTERED
    type: Coding = ("SCT", "47351003", "Infiltrate")
    modifier: Coding | None = _COVID
    region: Coding = _LUNG

    def slicer_terminology(self) -> str:
        """The segment's ``TerminologyEntry`` tag as 3D Slicer writes it (context~category~type~modifier~region)."""

        def code(coding: Coding | None) -> str:
            return "^".join(coding) if coding else "^^"

        return (
            f"Segmentation category and type - DICOM master list~{code(self.category)}~{code(self.type)}~"
            f"{code(self.modifier)}~Anatomic codes - DICOM master list~{code(self.region)}~^^"
        )


BINARY_SEGMENTS = (Segment(1, "infection", (230, 60, 40)),)
"""Segments of a binary (0/1) infection mask; the colour is the one of ``labels.ctbl``."""

MULTICLASS_SEGMENTS = (
    Segment(1, "ground_glass", (250, 200, 60), type=("SCT", "1217294009", "Ground glass opacity")),
    Segment(2, "consolidation", (200, 40, 40), type=("SCT", "9656002", "Consolidation")),
)
"""Segments of a multi-class mask (1 ground glass, 2 consolidation)."""


def segments_for(multiclass: bool) -> tuple[Segment, ...]:
    """:data:`MULTICLASS_SEGMENTS` for multi-class masks, else :data:`BINARY_SEGMENTS`."""
    return MULTICLASS_SEGMENTS if multiclass else BINARY_SEGMENTS


def _extent(mask: np.ndarray, label: int) -> str:
    """Voxel bounding box of ``label`` as Slicer's ``Segment<N>_Extent`` (first last per axis; empty: 0 -1)."""
    hit = mask == label
    bounds = []
    for axis in range(3):
        along = np.flatnonzero(hit.any(axis=tuple(a for a in range(3) if a != axis)))
        bounds += [int(along[0]), int(along[-1])] if along.size else [0, -1]
    return " ".join(str(b) for b in bounds)


def write_seg_nrrd(
    mask: np.ndarray, affine: np.ndarray, path: str | os.PathLike, segments: Sequence[Segment] = BINARY_SEGMENTS
) -> None:
    """Write a mask as a 3D Slicer segmentation (``.seg.nrrd``), atomically.

    The labelmap is the mask itself (one layer; each segment's voxels carry its label value) on the scan's grid:
    ``space directions`` and ``space origin`` are the affine in LPS, as Slicer stores them. Each segment has its
    ``Segment<N>_ID``, ``_Name``, ``_Color`` (0-1), ``_LabelValue``, ``_Layer``, ``_Extent`` and a terminology tag with
    its codes. Slicer opens the file (*File > Add Data*) as a segmentation with named segments.

    Args:
        mask: uint8 labels ``(X, Y, Z)`` in the scan's storage order.
        affine: the scan's voxel-to-RAS affine (mm).
        path: the output file, ``<case>_infection.seg.nrrd``.
        segments: the labels to describe (:func:`segments_for`).

    Example:
        >>> write_seg_nrrd(mask, affine, "out/case_infection.seg.nrrd")
    """
    import nrrd

    mask = np.asarray(mask).astype(np.uint8, copy=False)
    if mask.ndim != 3:
        raise ValueError(f"a segmentation needs a 3D mask, got shape {mask.shape}")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    header: dict[str, object] = {
        "type": "unsigned char",
        "dimension": 3,
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,  # row i: the world step of voxel axis i
        "space origin": lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for n, segment in enumerate(segments):
        header.update({
            f"Segment{n}_ID": segment.name,
            f"Segment{n}_Name": segment.name,
            f"Segment{n}_NameAutoGenerated": "0",
            f"Segment{n}_Color": " ".join(f"{c / 255.0:.6g}" for c in segment.color),
            f"Segment{n}_ColorAutoGenerated": "0",
            f"Segment{n}_LabelValue": str(segment.label),
            f"Segment{n}_Layer": "0",
            f"Segment{n}_Extent": _extent(mask, segment.label),
            f"Segment{n}_Tags": f"TerminologyEntry:{segment.slicer_terminology()}|",
        })
    with atomic_path(path) as tmp:
        nrrd.write(str(tmp), mask, header, compression_level=1)


def _frame(mask: np.ndarray, dataset: object, inverse: np.ndarray) -> np.ndarray:
    """The mask's voxels under one source slice, as a ``(Rows, Columns)`` frame.

    The slice's first pixel, one row down and one column across are mapped into the mask's voxel indices (from the
    slice's ImagePositionPatient, ImageOrientationPatient and PixelSpacing, LPS, to the mask's RAS affine); each step
    must be one voxel along one axis of the mask.

    Raises:
        ValueError: the slice is not a plane of the mask's voxel grid, or reaches outside it.
    """
    name = getattr(dataset, "filename", None) or "a source slice"
    to_ras = np.array([-1.0, -1.0, 1.0])
    orientation = np.asarray(dataset.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(s) for s in dataset.PixelSpacing)
    start = inverse[:3, :3] @ (np.asarray(dataset.ImagePositionPatient, dtype=np.float64) * to_ras) + inverse[:3, 3]
    steps = (
        inverse[:3, :3] @ (orientation[3:] * to_ras * row_spacing),  # one row down
        inverse[:3, :3] @ (orientation[:3] * to_ras * column_spacing),  # one column across
    )
    axes = [int(np.argmax(np.abs(step))) for step in steps]
    if (
        axes[0] == axes[1]
        or any(not np.allclose(np.abs(s), np.eye(3)[a], atol=1e-3) for s, a in zip(steps, axes, strict=True))
        or not np.allclose(start, np.round(start), atol=1e-2)
    ):
        raise ValueError(f"{name}: not a slice of the mask's voxel grid")
    start = np.round(start).astype(int)
    slice_axis = 3 - axes[0] - axes[1]
    index = []
    for step, axis, count in zip(steps, axes, (int(dataset.Rows), int(dataset.Columns)), strict=True):
        along = start[axis] + np.sign(step[axis]).astype(int) * np.arange(count)
        if along.min() < 0 or along.max() >= mask.shape[axis]:
            raise ValueError(f"{name}: outside the mask's voxel grid")
        index.append(along)
    if not 0 <= start[slice_axis] < mask.shape[slice_axis]:
        raise ValueError(f"{name}: outside the mask's voxel grid")
    plane = np.take(mask, int(start[slice_axis]), axis=slice_axis)  # the two other axes, in order
    if axes[0] > axes[1]:
        plane = plane.T
    return plane[np.ix_(index[0], index[1])]


def _source_dataset(path: str | os.PathLike) -> object:
    """A source slice's header (no pixels), its SOP identity taken from the file meta when the dataset lacks it.

    Raises:
        ValueError: the slice has no study, series or frame of reference UID (an anonymised file), which a
            segmentation must reference.
    """
    import pydicom

    dataset = pydicom.dcmread(str(path), stop_before_pixels=True)
    meta = getattr(dataset, "file_meta", None)
    for key, meta_key in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if not str(dataset.get(key, "") or "") and meta is not None and str(meta.get(meta_key, "") or ""):
            setattr(dataset, key, meta[meta_key].value)
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID")
               if not str(dataset.get(k, "") or "")]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} (anonymised?): a DICOM-SEG must reference them")
    return dataset


def write_dicom_seg(
    mask: np.ndarray,
    affine: np.ndarray,
    source_files: Sequence[str | os.PathLike],
    path: str | os.PathLike,
    segments: Sequence[Segment] = BINARY_SEGMENTS,
    algorithm: tuple[str, str] = ("covid-monai", "0"),
    parameters: dict[str, str] | None = None,
) -> None:
    """Write a mask as a DICOM Segmentation of its source series (highdicom), atomically.

    Each frame is the mask under one source slice, found from the slice's own position, orientation and pixel
    spacing (so the frames follow the series however the mask is stored); a slice that is not a plane of the mask's
    grid is refused. The object references the source series and study (patient, study, frame of reference), and
    each segment has its codes, colour and the algorithm's name and version (automatic segmentation, family
    Artificial Intelligence).

    Args:
        mask: uint8 labels ``(X, Y, Z)`` on the series' grid (as read by ITK).
        affine: the mask's voxel-to-RAS affine (mm).
        source_files: the series' DICOM files.
        path: the output file, ``<case>_infection.seg.dcm``.
        segments: the labels to describe (:func:`segments_for`).
        algorithm: ``(name, version)`` of the algorithm.
        parameters: algorithm parameters to record (e.g. the bundle's name and version).

    Example:
        >>> write_dicom_seg(mask, affine, series_files, "out/case_infection.seg.dcm", algorithm=("covid-monai", "1"))
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    datasets = [_source_dataset(f) for f in source_files]
    if not datasets:
        raise ValueError("no source DICOM files for the segmentation")
    if len({str(d.SeriesInstanceUID) for d in datasets}) != 1:
        raise ValueError("the source files belong to more than one DICOM series")
    mask = np.asarray(mask).astype(np.uint8, copy=False)
    known = {s.label for s in segments}
    extra = sorted(set(np.unique(mask).tolist()) - known - {0})
    if extra:
        raise ValueError(f"mask labels {extra} have no segment description")
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    datasets.sort(key=lambda d: int(getattr(d, "InstanceNumber", 0) or 0))
    frames = np.stack([_frame(mask, d, inverse) for d in datasets])
    name, version = algorithm
    identification = hd.AlgorithmIdentificationSequence(
        name=name, family=codes.cid7162.ArtificialIntelligence, version=version, parameters=parameters
    )
    descriptions = []
    for segment in segments:
        description = hd.seg.SegmentDescription(
            segment_number=segment.label,
            segment_label=segment.name,
            segmented_property_category=Code(segment.category[1], segment.category[0], segment.category[2]),
            segmented_property_type=Code(segment.type[1], segment.type[0], segment.type[2]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            tracking_uid=hd.UID(),
            tracking_id=segment.name,
            anatomic_regions=[Code(segment.region[1], segment.region[0], segment.region[2])],
            display_color=hd.color.CIELabColor.from_rgb(*segment.color),
        )
        if segment.modifier:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(segment.modifier[1], segment.modifier[0], segment.modifier[2])
            ]
        descriptions.append(description)
    first = datasets[0]
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(first, "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="covid-monai",
        manufacturer_model_name=name,
        software_versions=version,
        device_serial_number="0",
        series_description="COVID-19 lung infection (covid-monai)"[:64],
        content_label="INFECTION",
        content_description="COVID-19 lung infection segmentation",
        omit_empty_frames=bool(frames.any()),
    )
    with atomic_path(Path(path)) as tmp:
        seg.save_as(str(tmp))

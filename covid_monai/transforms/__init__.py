"""Custom MONAI transforms for COVID-19 chest CT: only what MONAI itself lacks, one module per job.

* :mod:`~covid_monai.transforms.validate` -- :class:`ValidateCTd`: refuse what cannot be a CT volume (not 3D,
  NaN/Inf, constant, too large), flag non-HU data.
* :mod:`~covid_monai.transforms.lungs` -- :class:`LungMaskd`: the HU lung mask (:mod:`covid_monai.lungs`) as a new
  key, with the image's meta data.
* :mod:`~covid_monai.transforms.crop` -- :class:`AboveOrAll`, :class:`CropForegroundMMd`: crop to the body or the
  lungs with margins in millimetres, the whole scan when there is nothing to crop to.
* :mod:`~covid_monai.transforms.intensity` -- :func:`intensity_normalization`: MONAI's ``NormalizeIntensityd`` per
  volume or fixed from the HU window (the ``intensity_normalization`` knob).
* :mod:`~covid_monai.transforms.slices` -- :class:`NeighbourSlicesToChannelsd`: 2.5D input, every axial slice with
  its neighbours above and below as channels.
* :mod:`~covid_monai.transforms.classes` -- :func:`infection_classes`, :class:`InfectionClassesd`,
  :class:`InfectionProbabilityd`: multi-class bundles (``labels: multiclass``), the infection probability
  ``1 - p_background`` and the class (1 ground glass, 2 consolidation) of infected voxels.
* :mod:`~covid_monai.transforms.postprocess` -- :class:`RestrictToLungsd`, :class:`AddInfectionToLungsd`: infection
  away from the lungs removed, infection next to a lung given that lung's label.
* :mod:`~covid_monai.transforms.utils` -- :func:`bounding_box` of a mask, :func:`voxel_spacing` of a value.

Every name is importable from ``covid_monai.transforms`` itself (what the bundle configs reference).
"""

from __future__ import annotations

from covid_monai.lungs import LEFT_LUNG, RIGHT_LUNG, lung_mask_from_hu
from covid_monai.transforms.classes import InfectionClassesd, InfectionProbabilityd, infection_classes
from covid_monai.transforms.crop import AboveOrAll, CropForegroundMMd
from covid_monai.transforms.intensity import INTENSITY_NORMALIZATIONS, intensity_normalization
from covid_monai.transforms.lungs import LungMaskd
from covid_monai.transforms.postprocess import AddInfectionToLungsd, RestrictToLungsd
from covid_monai.transforms.slices import NeighbourSlicesToChannelsd
from covid_monai.transforms.utils import bounding_box, voxel_spacing
from covid_monai.transforms.validate import ValidateCTd

__all__ = [
    "INTENSITY_NORMALIZATIONS",
    "LEFT_LUNG",
    "RIGHT_LUNG",
    "AboveOrAll",
    "AddInfectionToLungsd",
    "CropForegroundMMd",
    "InfectionClassesd",
    "InfectionProbabilityd",
    "LungMaskd",
    "NeighbourSlicesToChannelsd",
    "RestrictToLungsd",
    "ValidateCTd",
    "bounding_box",
    "infection_classes",
    "intensity_normalization",
    "lung_mask_from_hu",
    "voxel_spacing",
]

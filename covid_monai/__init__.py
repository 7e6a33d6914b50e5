"""covid-monai: COVID-19 lung infection segmentation on chest CT, built on MONAI."""

from __future__ import annotations

__version__ = "0.1.0"

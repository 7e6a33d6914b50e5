"""Shared fixtures: tiny phantoms, a bundle with random weights, the shared real data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from covid_monai.bundle import create_bundle, load_config
from covid_monai.phantom import write_phantoms

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Knobs that make the bundle tiny and fast for tests (the pipeline is the real one).
TINY_KNOBS = {
    "network_width": 4,
    "pixdim": [4.0, 4.0, -1],
    "patch_size": [48, 48],
    "num_samples": 2,
    "batch_size": 2,
    "epochs": 1,
    "val_interval": 1,
    "num_workers": 0,
    "slice_batch_size": 8,
}


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test when that folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (the shared data folder sits beside the project in CI only)")
    return path


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small phantoms stored in RAS, LPS, LAS and RPI (images/, labels/, lungs/)."""
    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, n=4, shape=(64, 64, 16), seed=3)
    return out


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle folder with the tiny network's random (seeded) weights in models/model.pt."""
    out = create_bundle(tmp_path_factory.mktemp("bundle") / "bundle", TINY_KNOBS)
    torch.manual_seed(0)
    network = load_config(out, ["inference.json"], {"device": "$torch.device('cpu')"}).get_parsed_content(
        "network_def"
    )
    torch.save(network.state_dict(), out / "models" / "model.pt")
    return out


@pytest.fixture(scope="module")
def chest():
    """A synthetic chest CT in HU with its affine and true lungs (tests/test_lungs.make_chest)."""
    from tests.test_lungs import make_chest

    return make_chest()


@pytest.fixture(scope="module")
def chest_mask(chest):
    """The HU lung mask of :func:`chest`."""
    from covid_monai.lungs import lung_mask_from_hu

    hu, affine, _ = chest
    return lung_mask_from_hu(hu, affine)

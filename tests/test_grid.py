"""Mapping maps from the network's grid back to the scan's grid (covid_monai.grid)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, CropForegroundd, Invertd, Orientationd, Resized, Spacingd
from scipy import ndimage

from covid_monai.grid import RecordSourceGridd, ToSourceGridd, resample_separable, to_source_grid


def _scan(shape=(40, 36, 12), spacing=(0.7, 0.8, 2.5), seed=0) -> MetaTensor:
    """A smooth random volume stored LPS-like (flipped x and y), with an off-centre origin."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((1, 5, 5, 3)).astype(np.float32)
    volume = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None], size=shape, mode="trilinear")[0]
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [12.0, -30.0, 100.0]
    return MetaTensor(volume, affine=torch.as_tensor(affine))


def _pipeline() -> Compose:
    return Compose([
        RecordSourceGridd("image"),
        Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=[1.0, 1.0, -1], mode="bilinear", dtype=torch.float32),
        CropForegroundd("image", source_key="image", select_fn=lambda x: x > 0.45, margin=[2, 2, 0],
                        k_divisible=[16, 16, 1]),
    ])


def test_nearest_matches_monai_invertd():
    pipeline = _pipeline()
    data = pipeline({"image": _scan()})
    grid_image = data["image"]
    mask = (grid_image > 0.5).to(torch.uint8)
    data["pred"] = MetaTensor(mask.as_tensor(), affine=grid_image.affine, meta=grid_image.meta,
                              applied_operations=grid_image.applied_operations)
    monai_back = Invertd("pred", transform=pipeline, orig_keys="image", nearest_interp=True)(dict(data))["pred"]
    ours = ToSourceGridd("pred")(dict(data))["pred"]
    assert tuple(ours.shape) == (1, 40, 36, 12) == tuple(monai_back.shape)
    np.testing.assert_allclose(ours.affine.numpy(), data["source_grid"]["affine"], atol=1e-9)
    np.testing.assert_allclose(ours.affine.numpy(), monai_back.affine.numpy(), atol=1e-5)
    agree = (ours.numpy() > 0) == (monai_back.numpy() > 0.5)
    assert ours.dtype == torch.uint8
    assert agree.mean() > 0.995  # nearest-neighbour ties on sample boundaries may round the other way
    assert (ours.numpy() > 0).sum() > 100


def test_linear_map_is_exact_through_the_whole_pipeline():
    """A ramp of each source axis, resampled to the network grid (flip, spacing, crop, resize) and back, returns."""
    shape = (40, 36, 12)
    for axis in range(3):
        ramp = torch.arange(shape[axis], dtype=torch.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        image = MetaTensor(ramp.expand(*shape)[None].clone() + 1.0, affine=_scan().affine)
        pipeline = Compose([*_pipeline().transforms, Resized("image", spatial_size=[32, 32, -1], mode="bilinear")])
        data = pipeline({"image": image})
        back = ToSourceGridd("image", mode="linear")(data)["image"].numpy()[0] - 1.0
        interior = tuple(slice(2, n - 2) for n in shape)
        expected = np.broadcast_to(ramp.numpy(), shape)[interior]
        np.testing.assert_allclose(back[interior], expected, atol=0.02, err_msg=f"axis {axis}")


def test_resized_grid_maps_back_to_the_right_place():
    """After ``Resized`` the map follows the affine MONAI gives the resized image: a ramp of source x comes back."""
    ramp = torch.arange(40, dtype=torch.float32)[:, None, None].expand(40, 36, 12)[None].clone()
    image = MetaTensor(ramp, affine=torch.diag(torch.tensor([0.7, 0.8, 2.5, 1.0], dtype=torch.float64)))
    resize = Resized("image", spatial_size=[32, 32, -1], mode="bilinear")
    data = Compose([RecordSourceGridd("image"), resize])({"image": image})
    back = ToSourceGridd("image", mode="linear")(data)["image"].numpy()
    np.testing.assert_allclose(back[0, 2:-2, 5, 5], np.arange(2, 38), atol=0.02)
    nearest = ToSourceGridd("image")(data)["image"].numpy()
    assert np.abs(nearest[0, 2:-2, 5, 5] - np.arange(2, 38)).max() <= 0.65  # within half a (1.25-voxel) sample


def test_voxels_outside_the_grid_are_zero_and_identity_is_exact():
    values = np.arange(24, dtype=np.uint8).reshape(1, 2, 3, 4)
    shifted = np.eye(4)
    shifted[0, 3] = 1.0  # target voxel x maps to source x + 1
    out = resample_separable(values, shifted, (2, 3, 4))
    np.testing.assert_array_equal(out[0, 0], values[0, 1])
    assert not out[0, 1].any()
    np.testing.assert_array_equal(resample_separable(values, np.eye(4), (2, 3, 4)), values)


def test_permuted_axes():
    values = np.random.default_rng(0).random((1, 3, 4, 5)).astype(np.float32)
    swap = np.zeros((4, 4))
    swap[0, 1] = swap[1, 0] = swap[2, 2] = swap[3, 3] = 1.0  # target (i, j, k) reads source (j, i, k)
    out = resample_separable(values, swap, (4, 3, 5), mode="linear")
    np.testing.assert_allclose(out, values.transpose(0, 2, 1, 3))


def test_oblique_map_falls_back_to_monai():
    theta = np.deg2rad(20)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    assert resample_separable(np.zeros((1, 4, 4, 4)), rotation, (4, 4, 4)) is None
    pred = MetaTensor(torch.ones(1, 8, 8, 4, dtype=torch.uint8), affine=torch.as_tensor(rotation))
    data = {"pred": pred, "source_grid": {"affine": np.eye(4), "shape": (8, 8, 4)}}
    out = ToSourceGridd("pred")(data)["pred"]
    assert tuple(out.shape) == (1, 8, 8, 4) and out.dtype == torch.uint8
    assert 0 < int(out.sum()) < 8 * 8 * 4  # the rotated square covers part of the target


def test_bad_mode():
    with pytest.raises(ValueError, match="nearest"):
        resample_separable(np.zeros((1, 2, 2, 2)), np.eye(4), (2, 2, 2), mode="cubic")


@pytest.mark.filterwarnings("error:Setting affine")  # MONAI's warning when a MetaTensor gets its affine twice
def test_mask_from_source_probability_thresholds_inside_the_kept_region():
    """The final mask is the linearly mapped probability thresholded on the scan's grid, but only where the
    post-processed network-grid mask (grown by one voxel) is: a removed component stays removed."""
    from covid_monai.grid import MaskFromSourceProbabilityd

    grid_affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    probability = torch.zeros(1, 10, 10, 4)
    probability[0, 1:4, 1:4] = 0.9  # a lesion that post-processing kept
    probability[0, 6:9, 6:9] = 0.9  # one it removed (e.g. outside the lungs)
    kept = torch.zeros(1, 10, 10, 4, dtype=torch.uint8)
    kept[0, 1:4, 1:4] = 1
    source = {"affine": np.diag([1.0, 1.0, 2.0, 1.0]), "shape": (20, 20, 4)}  # the scan: twice the in-plane detail
    data = {"pred": MetaTensor(kept, affine=grid_affine), "probability": MetaTensor(probability, affine=grid_affine),
            "source_grid": source}
    for slab in (1, 3, 32):  # the scan's grid filled one slab at a time gives the same mask
        out = MaskFromSourceProbabilityd("pred", threshold=0.5, slab=slab)(data)
        assert out["probability"] is data["probability"]  # left on the network grid
        prob = to_source_grid(out["probability"], source, "linear").numpy()[0]
        mask = out["pred"].numpy()[0]
        assert mask.dtype == np.uint8 and mask.shape == (20, 20, 4) and prob.shape == (20, 20, 4)
        np.testing.assert_allclose(out["pred"].affine.numpy(), source["affine"])
        np.testing.assert_array_equal(mask > 0, (prob >= 0.5) & (np.arange(20)[:, None, None] < 10)
                                      & (np.arange(20)[None, :, None] < 10))
        assert mask[2:7, 2:7].all() and not mask[12:18, 12:18].any()
        assert 0 < prob[12:18, 12:18].min()  # the probability map itself is whole


@pytest.mark.parametrize("oblique", [False, True])
def test_mask_in_slabs_equals_the_whole_grid_map(oblique):
    """Slab by slab inside the kept region's box, or through the general fallback for an oblique network grid, the
    final mask is the whole-grid computation: linear probability >= threshold where the dilated region maps."""
    from covid_monai.grid import MaskFromSourceProbabilityd, _dilate_by_one

    rng = np.random.default_rng(3)
    network = np.diag([-1.6, 1.4, 2.5, 1.0])  # flipped, coarser than the scan, offset
    network[:3, 3] = [30.0, -4.0, 3.0]
    if oblique:
        c, s = np.cos(0.2), np.sin(0.2)
        network[:2, :2] = network[:2, :2] @ np.array([[c, -s], [s, c]])
    probability = torch.from_numpy(ndimage.gaussian_filter(rng.random((1, 24, 20, 9)), 1.5).astype(np.float32))
    probability = (probability - probability.min()) / (probability.max() - probability.min())
    kept = (probability > 0.55).to(torch.uint8)
    kept[0, :, :, 4] = 0  # a slice where post-processing removed everything
    source = {"affine": np.diag([0.7, 0.7, 1.0, 1.0]), "shape": (48, 40, 22)}
    source["affine"][:3, 3] = [4.0, -2.0, 2.0]
    data = {"pred": MetaTensor(kept, affine=torch.as_tensor(network)),
            "probability": MetaTensor(probability, affine=torch.as_tensor(network)), "source_grid": source}
    out = MaskFromSourceProbabilityd("pred", threshold=0.5, slab=5)(data)["pred"].numpy()
    region = MetaTensor(torch.from_numpy(_dilate_by_one(kept.numpy() > 0).astype(np.uint8)),
                        affine=torch.as_tensor(network))
    expected = (to_source_grid(data["probability"], source, "linear").numpy() >= 0.5) & (
        to_source_grid(region, source, "nearest").numpy() > 0)
    assert out.shape == (1, 48, 40, 22) and out.dtype == np.uint8
    assert 0 < expected.sum() < expected.size
    assert np.count_nonzero((out > 0) != expected) <= 2  # float rounding at the threshold, at most


@pytest.mark.parametrize(
    ("spacing", "pixdim"),
    [((-0.7, -0.7, 1.0), (1.0, 1.0, -1)), ((0.8, 0.75, 2.5), (1.0, 1.0, 1.0)), ((2.4981, 2.4981, 4.9), (2.5, 2.5, -1))],
)
def test_separable_spacing_equals_spacingd(spacing, pixdim):
    """Same grid, values (to float rounding) and inversion as MONAI's Spacingd, including the near-identical grid
    that eager Spacingd keeps as it is (0.0019 mm off: the scan is not resampled)."""
    from covid_monai.grid import SeparableSpacingd

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [100.0, 80.0, -50.0]
    values = ndimage.gaussian_filter(np.random.default_rng(0).random((1, 60, 50, 12)), 2).astype(np.float32) * 1000
    outputs = []
    for transform in (Spacingd, SeparableSpacingd):
        pre = Compose([Orientationd("image", axcodes="RAS"),
                       transform("image", pixdim=pixdim, mode="bilinear", dtype=torch.float32)])
        data = pre({"image": MetaTensor(torch.from_numpy(values.copy()), affine=torch.as_tensor(affine))})
        data["pred"] = data["image"].clone()
        back = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(data)["pred"]
        np.testing.assert_allclose(back.affine.numpy(), affine, atol=1e-6)
        outputs.append(data["image"])
    theirs, ours = outputs
    assert ours.shape == theirs.shape and ours.dtype == torch.float32 and not ours.has_pending_operations
    np.testing.assert_allclose(ours.affine.numpy(), theirs.affine.numpy(), atol=1e-9)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=2e-3)


@pytest.mark.parametrize(("mode", "dtype"), [("nearest", torch.float32), ("bilinear", torch.float64)])
def test_separable_spacing_falls_back_to_spacingd_itself(mode, dtype):
    """Where the gathers do not apply (here nearest, float64), the result is Spacingd's own, voxel for voxel."""
    from covid_monai.grid import SeparableSpacingd

    image = MetaTensor(torch.rand(1, 40, 36, 12), affine=torch.as_tensor(np.diag([0.7, 0.7, 2.5, 1.0])))
    ours, theirs = (
        transform("image", pixdim=(1.3, 1.1, 2.0), mode=mode, dtype=dtype)({"image": image.clone()})["image"]
        for transform in (SeparableSpacingd, Spacingd)
    )
    assert ours.shape == theirs.shape and not ours.has_pending_operations
    np.testing.assert_array_equal(ours.affine.numpy(), theirs.affine.numpy())
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


class _GridInWorker(torch.utils.data.Dataset):
    """Records the grid of a MetaTensor inside a DataLoader worker, as the batch runner's pre-processing does."""

    affine = np.array([[-0.75, 0, 0, 120.5], [0, -0.75, 0, 88.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> dict:
        image = MetaTensor(torch.zeros(1, 4, 4, 2), affine=torch.tensor(self.affine, dtype=torch.float64))
        return RecordSourceGridd("image")({"image": image})


def test_recorded_grid_survives_a_dataloader_worker():
    """The recorded affine is a copy: a worker's move of the image to shared memory must not reach it."""
    image = MetaTensor(torch.zeros(1, 4, 4, 2), affine=torch.tensor(_GridInWorker.affine, dtype=torch.float64))
    grid = RecordSourceGridd("image")({"image": image})["source_grid"]
    assert not np.shares_memory(grid["affine"], image.affine.numpy())
    loader = torch.utils.data.DataLoader(_GridInWorker(), batch_size=None, num_workers=1)
    for item in loader:
        np.testing.assert_array_equal(np.asarray(item["source_grid"]["affine"]), _GridInWorker.affine)
        np.testing.assert_array_equal(item["image"].affine.numpy(), _GridInWorker.affine)


def test_recorded_grid_needs_a_metatensor():
    with pytest.raises(ValueError, match="needs a MetaTensor 'image'"):
        RecordSourceGridd("image")({"image": torch.zeros(1, 4, 4, 2), "image_meta_dict": {"affine": np.eye(4)}})

"""The loss factory the bundle's ``loss`` entry calls: each name gives MONAI's loss with the bundle's settings."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss

from covid_monai.bundle import create_bundle, load_config
from covid_monai.losses import LOSS_NAMES, segmentation_loss


def _batch(multiclass: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3 if multiclass else 1, 32, 32, generator=generator)
    labels = torch.randint(0, 3 if multiclass else 2, (4, 1, 32, 32), generator=generator).float()
    return logits, labels


@pytest.mark.parametrize("multiclass", [False, True])
@pytest.mark.parametrize("batch", [True, False])
def test_each_name_equals_monais_loss_with_the_bundle_settings(multiclass, batch):
    settings = {"sigmoid": not multiclass, "softmax": multiclass, "to_onehot_y": multiclass,
                "smooth_nr": 1.0, "smooth_dr": 1.0, "batch": batch}
    expected = {"dice": DiceLoss(**settings), "dicece": DiceCELoss(**settings),
                "dicefocal": DiceFocalLoss(**settings, gamma=2.0)}
    logits, labels = _batch(multiclass)
    for name, reference in expected.items():
        loss = segmentation_loss(name, multiclass=multiclass, batch=batch)
        assert type(loss) is type(reference)
        torch.testing.assert_close(loss(logits, labels), reference(logits, labels))
    if not multiclass:
        torch.testing.assert_close(segmentation_loss("bce")(logits, labels),
                                   torch.nn.functional.binary_cross_entropy_with_logits(logits, labels))


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="not one of"):
        segmentation_loss("focal")
    with pytest.raises(ValueError, match="multi-class"):
        segmentation_loss("bce", multiclass=True)
    assert set(LOSS_NAMES) == {"bce", "dice", "dicece", "dicefocal"}


def test_the_bundle_builds_only_the_named_loss(tmp_path):
    bundle = create_bundle(tmp_path / "b", {"loss_name": "dicefocal", "deep_supervision": 2})
    parser = load_config(bundle, ["train.json"])
    loss = parser.get_parsed_content("loss")
    assert type(loss).__name__ == "DeepSupervisionLoss" and isinstance(loss.loss, DiceFocalLoss)
    assert "losses" not in parser  # no dictionary of every loss to build


@pytest.mark.parametrize("name", ["dice", "dicece", "dicefocal"])
def test_multiclass_dice_without_background_scores_only_the_lesion_classes(name):
    settings = {"softmax": True, "to_onehot_y": True, "smooth_nr": 1.0, "smooth_dr": 1.0, "batch": False,
                "include_background": False}
    reference = {"dice": DiceLoss, "dicece": DiceCELoss, "dicefocal": DiceFocalLoss}[name]
    reference_loss = reference(**settings, **({"gamma": 2.0} if name == "dicefocal" else {}))
    logits, labels = _batch(multiclass=True)
    loss = segmentation_loss(name, multiclass=True, batch=False, background=False)
    torch.testing.assert_close(loss(logits, labels), reference_loss(logits, labels))
    with_background = segmentation_loss(name, multiclass=True, batch=False)
    assert not torch.allclose(loss(logits, labels), with_background(logits, labels))
    # a perfect background channel no longer lowers the loss: only ground glass and consolidation count
    sign = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    background_only = torch.where(labels == 0, 20.0, -20.0).repeat(1, 3, 1, 1) * sign
    assert float(loss(background_only, labels)) > float(with_background(background_only, labels))


def test_binary_networks_ignore_the_background_setting():
    logits, labels = _batch(multiclass=False)
    torch.testing.assert_close(segmentation_loss("dicefocal", background=False)(logits, labels),
                               segmentation_loss("dicefocal")(logits, labels))


def test_the_bundle_knob_reaches_the_loss(tmp_path):
    bundle = create_bundle(tmp_path / "b", {"labels": "multiclass", "loss_name": "dicefocal", "dice_background": False})
    loss = load_config(bundle, ["train.json"]).get_parsed_content("loss")
    assert isinstance(loss, DiceFocalLoss) and not loss.dice.include_background and not loss.focal.include_background
    default = load_config(create_bundle(tmp_path / "c", {"labels": "multiclass"}), ["train.json"])
    assert default.get_parsed_content("loss").dice.include_background

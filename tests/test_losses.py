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

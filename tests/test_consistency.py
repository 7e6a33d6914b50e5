"""Mean-teacher training: the iteration's losses on mixed batches, and the bundle trained with an unlabelled list."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.inferers import SimpleInferer
from monai.losses import DiceLoss

from covid_monai.consistency import LABELLED_KEY, MeanTeacherIteration, consistency_ramp, mixed_datalist
from covid_monai.datalist import DataCheckError, check_training_data
from covid_monai.handlers import WeightAveraging, averaged_weights
from covid_monai.networks import seed_unet
from covid_monai.train import train_bundle
from tests.conftest import TINY_KNOBS


def _step(batch: dict, weight: float, noise_std: float = 0.0, deep_supervision: int = 0):
    """One mean-teacher step of a tiny U-Net (no normalisation) on ``batch``: (output, network before, after)."""
    torch.manual_seed(0)
    network = seed_unet(width=4, deep_supervision=deep_supervision)
    before = copy.deepcopy(network)
    averaging = WeightAveraging(network, decay=0.5)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch], network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1), loss_function=DiceLoss(sigmoid=True),
        inferer=SimpleInferer(), train_handlers=[averaging],
        iteration_update=MeanTeacherIteration(averaging, weight, noise_std=noise_std), amp=False, decollate=False,
    )
    trainer.run()
    return trainer.state.output, before, network


def _batch(labelled: list[int], seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    n = len(labelled)
    return {"image": torch.randn(n, 1, 32, 32, generator=generator),
            "label": (torch.rand(n, 1, 32, 32, generator=generator) > 0.7).float(),
            LABELLED_KEY: torch.tensor(labelled)}


def test_supervised_loss_reads_only_labelled_entries_and_consistency_is_the_teachers_squared_difference():
    batch = _batch([1, 0])
    output, before, after = _step(batch, weight=3.0)
    with torch.no_grad():
        student = before(batch["image"])  # the step's forward pass, before the update
        supervised = DiceLoss(sigmoid=True)(student[:1], batch["label"][:1])
        teacher = torch.sigmoid(before.eval()(batch["image"]))  # the average starts as the network (no noise)
        consistency = torch.mean((torch.sigmoid(student) - teacher) ** 2)
    assert float(output["consistency"]) == pytest.approx(float(consistency), rel=1e-5)
    assert float(output["loss"]) == pytest.approx(float(supervised + 3.0 * consistency), rel=1e-5)
    # the unlabelled entry's label is never read; the labelled one's is
    other = {**batch, "label": batch["label"].clone()}
    other["label"][1] = 1 - other["label"][1]
    assert float(_step(other, weight=3.0)[0]["loss"]) == pytest.approx(float(output["loss"]), rel=1e-6)
    other["label"][0] = 1 - other["label"][0]
    assert float(_step(other, weight=3.0)[0]["loss"]) != pytest.approx(float(output["loss"]), rel=1e-3)
    # the training metric's reference: the labelled entry's own label, the teacher's mask for the other
    assert torch.equal(output["label"][0], batch["label"][0])
    assert torch.equal(output["label"][1], (teacher[1] > 0.5).float())
    assert not all(torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True))


def test_a_batch_without_labels_trains_on_the_consistency_alone():
    batch = _batch([0, 0])
    output, before, after = _step(batch, weight=1.0, noise_std=0.5, deep_supervision=1)
    assert float(output["consistency"]) > 0  # the teacher's input noise: they disagree
    assert float(output["loss"]) == pytest.approx(float(output["consistency"]), rel=1e-6)
    moved = [not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True)]
    assert any(moved)  # the consistency term alone has a gradient
    assert float(_step(batch, weight=1.0, noise_std=0.0)[0]["loss"]) == pytest.approx(0.0, abs=1e-12)


def test_consistency_needs_the_moving_average_and_ramps_up():
    with pytest.raises(ValueError, match="ema_decay"):
        MeanTeacherIteration(WeightAveraging(seed_unet(width=4), decay=0.0), 1.0)
    ramp = [consistency_ramp(i, 100) for i in range(0, 120, 10)]
    assert ramp == sorted(ramp) and ramp[0] < 0.01 and ramp[-2] == ramp[-1] == 1.0 and ramp[-3] < 1.0
    assert mixed_datalist([{"image": "a", "label": "b"}], []) == [{"image": "a", "label": "b"}]


def test_bundle_trains_a_mean_teacher_from_a_datalist_with_unlabelled_images(tmp_path, phantoms):
    images = sorted((phantoms / "images").glob("*.nii.gz"))
    items = [{"image": str(p), "label": str(phantoms / "labels" / p.name)} for p in images]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items[:2], "validation": items[2:3],
                                    "unlabelled": [{"image": str(p)} for p in images]}))
    knobs = {**TINY_KNOBS, "num_samples": 1, "ema_decay": 0.9, "consistency_weight": 1.0}
    out = train_bundle(datalist, tmp_path / "bundle", knobs, device="cpu")
    latest = torch.load(out / "models" / "latest.pt", map_location="cpu", weights_only=True)
    assert latest["trainer"]["epoch_length"] == (2 + len(images)) // TINY_KNOBS["batch_size"]  # both kinds train
    assert json.loads((out / "configs" / "datalist.json").read_text())["unlabelled"] == [
        {"image": str(p)} for p in images]
    best = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    averaged = averaged_weights(latest["weight_averaging"])
    assert all(torch.equal(best[k], averaged[k]) for k in best)  # validated and saved: the teacher
    with pytest.raises(Exception) as failure:
        train_bundle(datalist, tmp_path / "no_average", {**knobs, "ema_decay": 0}, device="cpu")
    assert "needs ema_decay > 0" in _messages(failure.value)  # the bundle's config error keeps the cause


def _messages(error: BaseException | None) -> str:
    """Every message along an exception's chain of causes."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


def test_unlabelled_images_are_checked_before_training(tmp_path, phantoms):
    image = sorted((phantoms / "images").glob("*.nii.gz"))[0]
    item = {"image": str(image), "label": str(phantoms / "labels" / image.name)}
    missing = tmp_path / "gone.nii.gz"
    with pytest.raises(DataCheckError, match=f"{missing}: file missing \\(unlabelled\\)"):
        check_training_data({"training": [item], "validation": [item], "unlabelled": [{"image": str(missing)}]})
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(DataCheckError, match=f"{broken}: cannot be read"):
        check_training_data({"training": [item], "validation": [item], "unlabelled": [{"image": str(broken)}]})
    check_training_data({"training": [item], "validation": [item], "unlabelled": [{"image": str(image)}]})
    assert Path(image).is_file()

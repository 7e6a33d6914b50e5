"""scripts/bench_semiseg.py on six of the real COVID-SemiSeg slices with a tiny network: the protocol, not accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from covid_monai.handlers import averaged_weights
from scripts import bench_semiseg
from tests.conftest import shared_data

pytestmark = pytest.mark.slow

TINY = ["--network_width", "4", "--slice_size", "[64, 64]", "--patch_size", "[64, 64]", "--num_samples", "1",
        "--batch_size", "2", "--amp", "false"]


@pytest.fixture(scope="module")
def six_slices(tmp_path_factory) -> Path:
    train = shared_data("covid_semiseg", "train")
    out = tmp_path_factory.mktemp("semiseg6")
    for sub, suffix in (("images", ".jpg"), ("masks", ".png")):
        (out / sub).mkdir()
        for name in ("0", "1", "2", "3", "4", "5"):
            shutil.copy(train / sub / f"{name}{suffix}", out / sub / f"{name}{suffix}")
    return out


def test_cross_validation_final_bundle_resume_and_reuse(six_slices, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(six_slices), "--out", str(out), "--folds", "3", "--epochs", "2", "--checkpoint", "last"]
    assert bench_semiseg.main(args + TINY) == 0
    result = json.loads((out / "results.json").read_text())
    assert [f["fold"] for f in result["folds"]] == [0, 1, 2] and all(f["n"] == 2 for f in result["folds"])
    assert sorted(r["case"] for r in result["per_image"]) == ["0", "1", "2", "3", "4", "5"]  # each slice tested once
    for metric in ("dice", "sensitivity", "specificity", "infnet_dice", "mask_dice"):
        assert 0.0 <= result["mean"][metric] <= 1.0
    assert result["knobs"]["slice_size"] == [64, 64] and result["knobs"]["val_interval"] == 3
    assert (out / "bundle" / "models" / "model.pt").is_file()  # the final model on all slices
    # the last-epoch recipe trains on all 4 training slices of a fold
    assert len(json.loads((out / "fold0" / "datalist.json").read_text())["training"]) == 4

    # resuming a finished run only re-reads the scores: same numbers, no retraining
    weights = (out / "fold1" / "bundle" / "models" / "model.pt").stat().st_mtime_ns
    assert bench_semiseg.main(args + TINY + ["--resume", "--no-final"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["mean"] == result["mean"]
    assert (out / "fold1" / "bundle" / "models" / "model.pt").stat().st_mtime_ns == weights

    # inference-only knobs scored on the same trained folds: test-time flips change the maps, not the models
    assert result["knobs"]["tta_flips"] == [[0], [1]]  # the recipe's
    flips = tmp_path / "no_flips"
    tta = ["--data", str(six_slices), "--out", str(flips), "--folds", "3", "--reuse-models", str(out),
           "--tta_flips", "[]"]
    assert bench_semiseg.main(tta) == 0
    flipped = json.loads((flips / "results.json").read_text())
    assert flipped["knobs"]["tta_flips"] == [] and flipped["reused_models"] == str(out)
    assert flipped["mean"]["infnet_dice"] != result["mean"]["infnet_dice"]
    assert not (flips / "bundle").exists()


def test_gpu_recipe_is_the_cpu_recipe_wider_and_longer(six_slices, tmp_path):
    """--recipe gpu trains the same pipeline with the GPU recipe's knobs (here on the CPU, one epoch)."""
    gpu, cpu = bench_semiseg.GPU_RECIPE, bench_semiseg.RECIPE
    assert gpu["network_width"] == 2 * cpu["network_width"] and gpu["epochs"] > cpu["epochs"]
    assert {k: v for k, v in gpu.items() if k not in ("network_width", "batch_size", "epochs", "num_workers")} == {
        k: v for k, v in cpu.items() if k not in ("network_width", "batch_size", "epochs", "num_workers")}
    out = tmp_path / "gpu"
    args = ["--data", str(six_slices), "--out", str(out), "--no-cv", "--recipe", "gpu", "--device", "cpu",
            "--epochs", "1", "--slice_size", "[64, 64]", "--patch_size", "[64, 64]", "--num_workers", "0"]
    assert bench_semiseg.main(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["recipe"] == "gpu" and result["device"] == "cpu"
    assert result["knobs"]["network_width"] == 32 and result["knobs"]["batch_size"] == 16
    assert (out / "bundle" / "models" / "model.pt").is_file()


def test_image_metrics_against_hand_counts():
    label = np.zeros((4, 4), bool)
    label[:2] = True  # 8 voxels
    probability = np.zeros((4, 4))
    probability[:1] = 0.9  # 4 true positives, 4 false negatives
    probability[3, 0] = 0.6  # 1 false positive
    scores = bench_semiseg.image_metrics(probability, label)
    assert scores["dice"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 4))
    assert scores["sensitivity"] == pytest.approx(0.5)
    assert scores["specificity"] == pytest.approx(7 / 8)


def test_failure_tables_and_worst_slices_from_a_run(tmp_path):
    """semiseg_failures groups per-image Dice by lesion size and type and draws the worst slices."""
    from PIL import Image

    from scripts import semiseg_failures

    run, data = tmp_path / "run", tmp_path / "data"
    (data / "masks_multiclass").mkdir(parents=True)
    per_image = []
    for k, (cells, kind) in enumerate([(2, 1), (12, 2), (30, 1), (30, 2)]):
        name = str(k)
        classes = np.zeros((40, 40), np.uint8)  # (rows, columns) picture
        classes[:cells, :10] = kind
        Image.fromarray(classes).save(data / "masks_multiclass" / f"{name}.png")
        volume = classes.T[:, :, None]
        pred = np.zeros_like(volume)
        pred[: 10 - k, : cells, 0] = 1  # worse overlap for higher k
        for folder, array in (("nifti/images", np.full_like(volume, 90)), ("nifti/labels", (volume > 0) * 1),
                              ("fold0/pred", pred)):
            (run / folder).mkdir(parents=True, exist_ok=True)
            suffix = "_infection" if folder == "fold0/pred" else ""
            nib.save(nib.Nifti1Image(array.astype(np.uint8), np.eye(4)), str(run / folder / f"{name}{suffix}.nii.gz"))
        truth = volume > 0
        dice = 2 * (truth & (pred > 0)).sum() / (truth.sum() + (pred > 0).sum())
        per_image.append({"case": name, "fold": 0, "mask_dice": float(dice)})
    (run / "results.json").write_text(json.dumps({"per_image": per_image}))
    assert semiseg_failures.main(["--run", str(run), "--data", str(data), "--out", str(tmp_path / "out"),
                                  "--worst", "2"]) == 0
    report = json.loads((tmp_path / "out" / "failures.json").read_text())
    sizes = {g["size"]: g["slices"] for g in report["by_size"]}
    assert sizes == {"1–5 %": 1, "5–15 %": 1, "≥ 15 %": 2}  # 20, 120 and 300 of 1600 pixels
    types = {g["type"]: g for g in report["by_type"]}
    assert types["ground glass"]["slices"] == 2 and types["consolidation"]["slices"] == 2
    worst = sorted(per_image, key=lambda r: r["mask_dice"])[:2]
    assert report["worst"] == [r["case"] for r in worst]
    assert types["consolidation"]["mean_dice"] == pytest.approx(np.mean([per_image[1]["mask_dice"],
                                                                         per_image[3]["mask_dice"]]))
    picture = Image.open(tmp_path / "out" / "worst.png")
    assert picture.height == 2 * (200 + 16)


def test_turned_slices_are_the_pictures_turned_by_90_degrees_in_the_same_geometry(tmp_path):
    root, out = tmp_path / "converted", tmp_path / "turned"
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    rng = np.random.default_rng(0)
    pictures = {
        "images": rng.integers(-1024, 400, (48, 32, 1)).astype(np.int16),  # not square: the shape turns too
        "labels": (rng.random((48, 32, 1)) > 0.7).astype(np.uint8),
    }
    for sub, picture in pictures.items():
        (root / sub).mkdir(parents=True)
        nib.save(nib.Nifti1Image(picture, affine), str(root / sub / "7.nii.gz"))
    assert bench_semiseg.turn_slices(root, out, ["7"]) == out
    for sub, picture in pictures.items():
        turned = nib.load(str(out / sub / "7.nii.gz"))
        assert turned.get_data_dtype() == picture.dtype
        np.testing.assert_array_equal(np.asanyarray(turned.dataobj), np.rot90(picture, 1, axes=(0, 1)))
        np.testing.assert_allclose(turned.affine, affine)
    assert (root / "images" / "7.nii.gz").is_file()  # the input is left as it was


def test_self_training_teaches_a_student_per_fold_from_its_own_teacher(six_slices, tmp_path):
    """--self-training: each fold's model labels unlabelled slices it never saw as labelled data, a student trains
    on both from the teacher's weights, and both are scored on the fold's test slices."""
    source = shared_data("covid_semiseg", "unlabelled")
    unlabelled = tmp_path / "unlabelled"
    names = sorted(p.stem for p in (source / "images").glob("*.jpg"))[:16]
    for sub, suffix in (("images", ".jpg"), ("pseudo_masks", ".png")):
        (unlabelled / sub).mkdir(parents=True)
        for name in names:
            shutil.copy(source / sub / f"{name}{suffix}", unlabelled / sub / f"{name}{suffix}")
    out = tmp_path / "run"
    args = ["--data", str(six_slices), "--out", str(out), "--folds", "3", "--epochs", "1", "--unlabelled",
            str(unlabelled), "--pretrain-epochs", "1", "--self-training", "--self-training-epochs", "1"]
    assert bench_semiseg.main(args + TINY) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["self_training"]["every"] == bench_semiseg.SelfTraining.every
    fold = out / "fold0" / "student"
    labelled = json.loads((out / "fold0" / "datalist.json").read_text())["training"]
    taught = json.loads((fold / "datalist.json").read_text())["training"]
    n_taught = len(range(0, 16, bench_semiseg.SelfTraining.every))
    assert len(taught) == len(labelled) * bench_semiseg.SelfTraining.labelled_repeats + n_taught
    # the soft targets are the teacher's probability maps, in the unlabelled slices' own grid
    target = taught[-1]["label"]
    assert target.endswith("_probability.nii.gz") and str(fold / "teacher_labels") in target
    soft = np.asarray(nib.load(target).dataobj)
    assert soft.dtype == np.float32 and 0.0 <= soft.min() and soft.max() <= 1.0
    assert soft.shape == nib.load(taught[-1]["image"]).shape
    # the student starts from its own fold's teacher, not from another fold's or the pre-training
    student_knobs = json.loads((fold / "student.json").read_text())["knobs"]
    assert student_knobs["init_weights"] == str((out / "fold0" / "bundle" / "models" / "model.pt").resolve())
    for row in result["per_image"]:
        assert {"dice", "teacher_dice", "teacher_turned_dice"} <= set(row)
    assert result["mean"]["dice"] != result["mean"]["teacher_dice"]  # the student is another model
    assert result["final_bundle"] == str((out / "student" / "bundle").resolve())
    assert (out / "student" / "bundle" / "models" / "model.pt").is_file()

    # an earlier run's fold models as the teachers: no pre-training, another share of the slices labelled
    again = tmp_path / "reused"
    assert bench_semiseg.main(["--data", str(six_slices), "--out", str(again), "--folds", "3", "--reuse-models",
                               str(out), "--unlabelled", str(unlabelled), "--self-training", "--self-training-every",
                               "4", "--self-training-repeats", "1", "--self-training-epochs", "1"]) == 0
    assert not (again / "pretrain" / "bundle").exists()
    taught = json.loads((again / "fold1" / "student" / "datalist.json").read_text())["training"]
    assert len(taught) == len(labelled) + 4
    reused = json.loads((again / "results.json").read_text())
    assert reused["self_training"] == {"every": 4, "labelled_repeats": 1, "epochs": 1, "learning_rate": 0.001,
                                       "consistency_weight": 0.0, "ema_decay": 0.99}
    assert reused["mean"]["teacher_dice"] == pytest.approx(result["mean"]["teacher_dice"])  # the same teachers

    # the mean teacher: the same teachers start a student whose moving average teaches it on the unlabelled slices
    mean_teacher = tmp_path / "mean_teacher"
    assert bench_semiseg.main(["--data", str(six_slices), "--out", str(mean_teacher), "--folds", "3",
                               "--reuse-models", str(out), "--unlabelled", str(unlabelled), "--mean-teacher",
                               "--consistency-weight", "2", "--self-training-epochs", "1", "--self-training-repeats",
                               "1", "--no-final"]) == 0
    student = mean_teacher / "fold2" / "student"
    datalist = json.loads((student / "datalist.json").read_text())
    self_taught = json.loads((again / "fold2" / "student" / "datalist.json").read_text())["training"]
    assert [Path(item["image"]).name for item in datalist["training"]] == [
        Path(item["image"]).name for item in self_taught[: len(labelled)]]  # the labelled slices once, nothing taught
    assert [Path(u["image"]).name for u in datalist["unlabelled"]] == [
        f"{n}.nii.gz" for n in names[:: bench_semiseg.SelfTraining.every]]
    assert not (student / "teacher_labels").exists()  # nothing labelled beforehand
    knobs = json.loads((student / "student.json").read_text())["knobs"]
    assert (knobs["consistency_weight"], knobs["ema_decay"]) == (2.0, 0.99)
    start = torch.load(knobs["init_weights"], map_location="cpu", weights_only=True)  # a copy of the reused model
    teacher = torch.load(out / "fold2" / "bundle" / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(start[k], teacher[k]) for k in teacher)
    latest = torch.load(student / "bundle" / "models" / "latest.pt", map_location="cpu", weights_only=True)
    saved = torch.load(student / "bundle" / "models" / "model.pt", map_location="cpu", weights_only=True)
    averaged = averaged_weights(latest["weight_averaging"])
    assert all(torch.equal(saved[k], averaged[k]) for k in saved)  # the written model is the mean teacher
    taught = json.loads((mean_teacher / "results.json").read_text())
    assert taught["self_training"]["consistency_weight"] == 2.0
    assert taught["mean"]["teacher_dice"] == pytest.approx(result["mean"]["teacher_dice"])
    with pytest.raises(SystemExit):  # one way to train the student at a time
        bench_semiseg.main(["--data", str(six_slices), "--out", str(tmp_path / "x"), "--unlabelled", str(unlabelled),
                            "--self-training", "--mean-teacher"])

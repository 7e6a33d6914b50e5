"""Cross-validated accuracy on the 50 real COVID-SemiSeg slices, then a model trained on all 50.

The 50 "Doctor-label" training slices of COVID-SemiSeg (Fan et al., Inf-Net, IEEE TMI 2020) are converted to
single-slice NIfTI volumes and run through the bundle's own 3D pipeline (8-bit lung-window data: ``hu_window``
[0, 255], no lung mask). 5-fold cross-validation: each fold trains on 40 slices (with ``--checkpoint best``, 5 of
them validate for checkpoint selection; with ``last``, all 40 train and the last epoch is kept) and is scored on its
10 held-out slices, per image:

* Dice, sensitivity and specificity of the mask at probability 0.5;
* the Inf-Net way: the probability map is min-max normalised and binarised at 256 thresholds from 1 down to 0
  (``map >= t``); Dice, sensitivity and specificity are averaged over the thresholds;
* Dice of the mask the toolkit writes (``mask_dice``: the recipe's ``threshold`` and post-processing).

The dataset's 48-slice test split is deliberately not available: everything is selected by cross-validation.
Finally the recipe trains on all 50 slices and writes ``OUT/bundle``. Deterministic for a seed.

With ``--unlabelled DIR`` (``images/`` and ``pseudo_masks/``, e.g. COVID-SemiSeg's 1,600 pseudo-labelled slices) a
model first trains on those slices (they only ever train), and every fold and the final model fine-tune from it.
With ``--self-training`` as well, each fold's model is a teacher: it labels a share of the unlabelled slices with its
own probability maps (soft targets), and a student starts from the teacher's weights and trains on mixed batches of
the fold's labelled slices and the teacher-labelled ones. The teacher of fold k has never seen fold k's test slices;
both are scored on them (the teacher's figures as ``teacher_<metric>``). ``--mean-teacher`` instead trains the
student against its own moving average (which starts as the fold's model) with a consistency loss on the unlabelled
slices, nothing labelled beforehand (:mod:`covid_monai.consistency`).

Example:
    python scripts/bench_semiseg.py --data ../shared/data/covid_semiseg/train --out runs/semiseg \
        --unlabelled ../shared/data/covid_semiseg/unlabelled
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covid_monai.bundle import create_bundle  # noqa: E402
from covid_monai.datalist import write_datalist  # noqa: E402
from covid_monai.evaluate import compute_case_metrics  # noqa: E402
from covid_monai.inference import run_batch  # noqa: E402
from covid_monai.io import save_nifti_like  # noqa: E402
from covid_monai.train import train_bundle  # noqa: E402
from scripts.convert_slices import convert, natural_key  # noqa: E402

logger = logging.getLogger("bench_semiseg")

RECIPE: dict[str, Any] = {
    "pixdim": [-1, -1, -1],
    "hu_window": [0, 255],
    "body_threshold": -1,
    "compute_lungs": False,
    "restrict_to_lungs": False,
    "slice_size": [256, 256],
    "patch_size": [256, 256],
    "num_samples": 1,
    "batch_size": 4,
    "network_width": 16,
    "network_norm": "batch",
    "deep_supervision": 2,
    "loss_name": "dicefocal",
    "dice_per_image": True,
    "learning_rate": 0.002,
    "epochs": 140,
    "val_interval": 5,
    "amp": True,
    "num_workers": 0,
    "tta_flips": [[0], [1]],
    "threshold": 0.35,
    "orientation_augmentation": True,
    "contrast_augmentation": True,
}
"""Bundle settings of the recipe (the rest are the bundle's defaults), each kept because the 5-fold CV Dice rose
(``benchmarks/results/semiseg_cv_*.json``): whole slices resized to 256x256 instead of native-size patches,
bf16 training (2x faster steps, so 140 epochs fit), Dice per image in the loss, all fold slices trained
and the last epoch kept (``--checkpoint last``), test-time left-right and front-back flips, threshold 0.35, deep
supervision on the 1/2- and 1/4-size decoder outputs, Dice+focal instead of Dice+CE (the weights' moving average,
``ema_decay`` 0.995, also raised the CV Dice alone but is not combined with it yet), and all eight in-plane
orientations and gamma contrast as augmentation (e9: with them and the pre-training below, the CV Dice on the slices
turned by 90 degrees equals the unturned one). ``docs/experiments.md`` has every experiment."""

GPU_RECIPE: dict[str, Any] = {
    **RECIPE,
    "network_width": 32,
    "batch_size": 16,
    "epochs": 400,
    "num_workers": 4,
}
"""The recipe for a GPU (``--recipe gpu``, on ``cuda`` unless ``--device`` says otherwise): the same pipeline with
the U-Net twice as wide (width 32, the bundle's default), batches of 16 slices and a longer schedule (400 epochs from
scratch, :data:`GPU_FINE_TUNE_EPOCHS` after :data:`GPU_PRETRAIN_EPOCHS` of pre-training). Not yet measured: the CPU
recipe is the one the figures in ``docs/experiments.md`` rest on."""

PRETRAIN_EPOCHS = 4
"""Epochs over the unlabelled slices with ``--unlabelled`` (e9)."""

FINE_TUNE_EPOCHS = {"binary": 80, "multiclass": 40}
"""Epochs of fine-tuning on the labelled slices after pre-training, per ``--labels``: binary 80 (e9); multi-class 40,
because e10 (40 epochs) and e15 (80) scored the same (ground glass 0.529 / 0.528, consolidation 0.413 / 0.394).
Without ``--unlabelled`` the recipe's ``epochs`` (140, measured from scratch in e8) apply."""

THRESHOLDS = np.linspace(1.0, 0.0, 256)

GPU_PRETRAIN_EPOCHS, GPU_FINE_TUNE_EPOCHS = 20, {"binary": 200, "multiclass": 200}
"""Pre-training and fine-tuning epochs (per ``--labels``) of :data:`GPU_RECIPE` with ``--unlabelled``."""

RECIPES = {"cpu": (RECIPE, PRETRAIN_EPOCHS, FINE_TUNE_EPOCHS), "gpu": (GPU_RECIPE, GPU_PRETRAIN_EPOCHS,
                                                                       GPU_FINE_TUNE_EPOCHS)}
"""``--recipe`` name: (knobs, pre-training epochs, fine-tuning epochs per ``--labels``)."""


@dataclass(frozen=True)
class SelfTraining:
    """How a fold's model (the teacher) teaches a student on the unlabelled slices (``--self-training``).

    Attributes:
        every: the teacher labels every ``every``-th unlabelled slice in natural order (COVID-SemiSeg's 1,600 are
            20 runs of 80 contiguous slices, so 8 gives 200 slices, 10 from every volume).
        labelled_repeats: each labelled slice appears this many times per student epoch, so batches mix labelled
            and teacher-labelled slices about equally (40 x 5 against 200).
        epochs: student epochs over that list (4 x 400 slices = 400 steps of 4, half the teacher's fine-tuning).
        learning_rate: the student's starting learning rate (cosine to 5 % of it); it starts from the teacher's
            weights, so it is half the recipe's.
        consistency_weight: 0: the teacher labels the slices once, before the student trains (self-training);
            > 0: a mean teacher instead (``--mean-teacher``, :mod:`covid_monai.consistency`): nothing is labelled
            beforehand; the student's moving average (``ema_decay``), which starts as the fold's model, teaches it
            on the fly, with this weight on the consistency loss on every slice.
        ema_decay: the mean teacher's moving-average decay per step (0.99: about the last 100 of 400 steps).
    """

    every: int = 8
    labelled_repeats: int = 5
    epochs: int = 4
    learning_rate: float = 0.001
    consistency_weight: float = 0.0
    ema_decay: float = 0.99


MEAN_TEACHER_WEIGHT = 1.0
"""The consistency weight of ``--mean-teacher`` (``--consistency-weight`` overrides it)."""


INFERENCE_ONLY_KNOBS = ("threshold", "tta_flips", "min_lesion_ml")
"""Knobs that change inference but not training: ``--reuse-models`` scores them on already trained folds."""


def image_metrics(probability: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Per-image Dice, sensitivity and specificity at 0.5 and averaged over 256 thresholds (Inf-Net protocol).

    Args:
        probability: the model's probability map.
        label: the binary reference mask.

    Returns:
        ``dice``, ``sensitivity``, ``specificity`` (at 0.5) and ``infnet_dice``, ``infnet_sensitivity``,
        ``infnet_specificity`` (means over thresholds of the min-max normalised map).

    Example:
        >>> image_metrics(np.array([0.9, 0.1]), np.array([1, 0]))["dice"]
        1.0
    """
    truth = label.astype(bool).ravel()
    p = probability.astype(np.float64).ravel()
    scores = {}
    for prefix, maps in (("", [p >= 0.5]), ("infnet_", _threshold_maps(p))):
        dice, sens, spec = [], [], []
        for pred in maps:
            tp = float(np.sum(pred & truth))
            fp = float(np.sum(pred & ~truth))
            fn = float(np.sum(~pred & truth))
            tn = float(np.sum(~pred & ~truth))
            dice.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
            sens.append(tp / (tp + fn) if tp + fn else 1.0)
            spec.append(tn / (tn + fp) if tn + fp else 1.0)
        scores.update({f"{prefix}dice": np.mean(dice), f"{prefix}sensitivity": np.mean(sens),
                       f"{prefix}specificity": np.mean(spec)})
    return {k: float(v) for k, v in scores.items()}


def _threshold_maps(p: np.ndarray) -> list[np.ndarray]:
    span = p.max() - p.min()
    normalised = (p - p.min()) / span if span > 0 else np.zeros_like(p)
    return [normalised >= t for t in THRESHOLDS]


def folds(names: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """Split case names into ``k`` disjoint folds of near-equal size (seeded shuffle)."""
    order = list(names)
    random.Random(seed).shuffle(order)
    return [sorted(order[i::k]) for i in range(k)]


def _item(root: Path, name: str) -> dict[str, str]:
    """The datalist entry of the converted slice ``name``: ``root/images`` and ``root/labels``."""
    return {"image": str(root / "images" / f"{name}.nii.gz"), "label": str(root / "labels" / f"{name}.nii.gz")}


def _datalist(root: Path, train: Sequence[str], n_val: int, seed: int) -> dict[str, list[dict[str, str]]]:
    """A seeded split of ``train`` into training and ``n_val`` validation cases (``n_val`` 0: train on all)."""
    order = list(train)
    random.Random(seed + 1).shuffle(order)
    items = {n: _item(root, n) for n in order}
    if n_val == 0:  # the bundle wants a validation list; it is never run (val_interval > epochs)
        return {"training": [items[n] for n in sorted(order)], "validation": [items[sorted(order)[0]]]}
    return {
        "training": [items[n] for n in sorted(order[n_val:])],
        "validation": [items[n] for n in sorted(order[:n_val])],
    }


def train_and_score(
    root: Path,
    train: Sequence[str],
    test: Sequence[str],
    out: Path,
    knobs: dict[str, Any],
    seed: int,
    reuse_model: Path | None = None,
    resume: bool = False,
    device: str = "cpu",
    teaching: tuple[SelfTraining, Path] | None = None,
) -> list[dict[str, Any]]:
    """Train on ``train`` (an eighth validates), segment ``test``, return per-image metrics.

    With ``reuse_model`` (a fold bundle of an earlier run, same split) nothing is trained: that model segments
    ``test`` with this run's inference knobs (test-time flips, threshold...), so inference-side changes are scored
    on the very same trained folds. With ``resume`` an interrupted training continues from its last epoch (a
    finished one is only scored). With ``teaching`` (the settings and the converted unlabelled slices' folder) the
    trained (or reused) model is a teacher: a student learns from it (:func:`self_train`) and the rows are the
    student's, with the teacher's scores beside them as ``teacher_<metric>``.
    """
    if reuse_model is None:
        last_epoch = int(knobs["val_interval"]) > int(knobs["epochs"])
        datalist = _datalist(root, train, 0 if last_epoch else max(1, len(train) // 8), seed)
        write_datalist(datalist, out / "datalist.json")
        resume = resume and (out / "bundle" / "models" / "latest.pt").is_file()
        bundle = train_bundle(out / "datalist.json", out / "bundle", knobs, device=device, seed=seed, resume=resume)
    else:  # today's pipeline with this run's knobs, the earlier run's weights
        bundle = create_bundle(out / "bundle", knobs)
        (bundle / "models").mkdir(exist_ok=True)
        shutil.copy2(reuse_model / "models" / "model.pt", bundle / "models" / "model.pt")
    student = None
    if teaching is not None:
        settings, unlabelled = teaching
        student = self_train(bundle, root, train, unlabelled, out / "student", knobs, settings, seed, resume, device)
    if not test:
        return []
    rows = _score(root, test, out, bundle, device)
    if student is None:
        return rows
    teacher = {r["case"]: r for r in rows}
    rows = _score(root, test, out / "student", student, device)
    for row in rows:
        row.update({f"teacher_{k}": v for k, v in teacher[row["case"]].items() if k != "case"})
    return rows


def _score(root: Path, test: Sequence[str], out: Path, bundle: Path, device: str) -> list[dict[str, Any]]:
    """Per-image metrics of ``bundle`` on the ``test`` slices and on the same slices turned by 90 degrees."""
    rows = {name: {"case": name, **scores}
            for name, scores in _segment_and_score(root, test, out / "pred", bundle, device)}
    turned = turn_slices(root, out / "turned", test)
    for name, scores in _segment_and_score(turned, test, out / "pred_turned", bundle, device):
        rows[name].update({f"turned_{k}": v for k, v in scores.items() if k in TURNED_METRICS})
    return [rows[name] for name in test]


def self_train(
    teacher: Path,
    root: Path,
    train: Sequence[str],
    unlabelled: Path,
    out: Path,
    knobs: dict[str, Any],
    settings: SelfTraining,
    seed: int,
    resume: bool = False,
    device: str = "cpu",
) -> Path:
    """Train a student from ``teacher`` on mixed batches of labelled and unlabelled slices; return its bundle.

    Self-training (``settings.consistency_weight`` 0): the teacher segments every ``settings.every``-th slice of
    ``unlabelled/images`` and its probability maps (with the recipe's test-time flips) are the soft targets of those
    slices; nothing else of them is used. Mean teacher (> 0): those slices go into the student's datalist unlabelled,
    and the student's moving average, which starts as the teacher, gives the consistency targets as it trains.
    Either way the student starts from the teacher's weights and trains on the labelled ``train`` slices of ``root``
    (each repeated ``settings.labelled_repeats`` times) with the unlabelled ones, for ``settings.epochs`` epochs,
    keeping the last (the moving average, for the mean teacher). Labelling resumes where it stopped; a finished
    student is reused.
    """
    images = sorted((unlabelled / "images").glob("*.nii.gz"), key=natural_key)
    chosen = images[:: settings.every]
    if not chosen:
        raise RuntimeError(f"{unlabelled / 'images'}: no unlabelled slice for the teacher to label")
    labelled = [_item(root, n) for n in sorted(train, key=_natural)]
    student_knobs = {**knobs, "epochs": settings.epochs, "val_interval": settings.epochs + 1,
                     "learning_rate": settings.learning_rate, "init_weights": str((teacher / "models" /
                                                                                    "model.pt").resolve())}
    if settings.consistency_weight:
        student_knobs.update({"consistency_weight": settings.consistency_weight, "ema_decay": settings.ema_decay})
        write_datalist({"training": labelled * settings.labelled_repeats, "validation": labelled[:1],
                        "unlabelled": [{"image": str(p)} for p in chosen]}, out / "datalist.json")
    else:
        labels = out / "teacher_labels"
        results = run_batch(chosen, labels, teacher, device=device, workers=0, save_probabilities=True,
                            progress=False)
        failed = [r for r in results if r.status not in ("ok", "skipped")]
        if failed:
            raise RuntimeError(f"the teacher failed on {failed[0].input}: {failed[0].error}")
        taught = [{"image": str(p), "label": str(labels / p.name.replace(".nii.gz", "_probability.nii.gz"))}
                  for p in chosen]
        write_datalist({"training": labelled * settings.labelled_repeats + taught, "validation": labelled[:1]},
                       out / "datalist.json")
    bundle = out / "bundle"
    done = out / "student.json"
    if _finished(done, bundle / "models" / "model.pt", student_knobs):
        return bundle
    resume = resume and (bundle / "models" / "latest.pt").is_file()
    train_bundle(out / "datalist.json", bundle, student_knobs, device=device, seed=seed, resume=resume)
    done.write_text(json.dumps({"knobs": student_knobs, "taught_slices": len(chosen)}, indent=1) + "\n")
    return bundle


TURNED_METRICS = ("dice", "infnet_dice", "mask_dice")
"""Metrics also reported (as ``turned_<metric>``) on the held-out slices turned by 90 degrees."""


def _segment_and_score(
    root: Path, names: Sequence[str], out: Path, bundle: Path, device: str = "cpu"
) -> list[tuple[str, dict]]:
    """Segment ``root/images/<name>.nii.gz`` with ``bundle`` into ``out`` and score each against its label."""
    results = run_batch([root / "images" / f"{n}.nii.gz" for n in names], out, bundle, device=device,
                        workers=0, save_probabilities=True, progress=False, overwrite=True)
    failed = [r for r in results if r.status != "ok"]
    if failed:
        raise RuntimeError(f"inference failed on {failed[0].input}: {failed[0].error}")
    scored = []
    for name in names:
        probability = np.asarray(nib.load(str(out / f"{name}_probability.nii.gz")).dataobj)
        classes = np.asarray(nib.load(str(root / "labels" / f"{name}.nii.gz")).dataobj)
        mask = np.asarray(nib.load(str(out / f"{name}_infection.nii.gz")).dataobj)
        label = classes > 0
        mask_dice = compute_case_metrics(mask > 0, label)["dice"]
        scores = {**image_metrics(probability, label), "mask_dice": mask_dice, **class_dice(mask, classes)}
        scored.append((name, scores))
    return scored


CLASS_NAMES = {1: "ggo", 2: "consolidation"}
"""Multi-class labels: 1 ground-glass opacity, 2 consolidation."""


def class_dice(mask: np.ndarray, classes: np.ndarray) -> dict[str, float | None]:
    """Per-class Dice of a written multi-class mask, ``None`` for a class absent from the reference (such images do
    not count toward that class's mean); empty for binary references.

    Example:
        >>> {k: round(v, 3) for k, v in class_dice(np.array([[[1, 1, 2, 0]]]), np.array([[[1, 2, 2, 0]]])).items()}
        {'ggo_dice': 0.667, 'consolidation_dice': 0.667}
    """
    if classes.max() <= 1:
        return {}
    scores: dict[str, float | None] = {}
    for value, name in CLASS_NAMES.items():
        truth = classes == value
        scores[f"{name}_dice"] = float(compute_case_metrics(mask == value, truth)["dice"]) if truth.any() else None
    return scores


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean over the values that are not ``None`` (``None`` when there is none)."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def turn_slices(root: Path, out: Path, names: Sequence[str]) -> Path:
    """Write the slices ``names`` (image and label) turned by 90 degrees in-plane into ``out/images`` and
    ``out/labels``, same affine (the picture is turned; the geometry says nothing of it, as with real slices).

    Returns:
        ``out``.
    """
    for name in names:
        for sub in ("images", "labels"):
            source = nib.load(str(root / sub / f"{name}.nii.gz"))
            turned = np.ascontiguousarray(np.rot90(np.asarray(source.dataobj), 1, axes=(0, 1)))
            (out / sub).mkdir(parents=True, exist_ok=True)
            save_nifti_like(turned, out / sub / f"{name}.nii.gz", affine=source.affine, dtype=source.get_data_dtype())
    return out


def pretrain_on_unlabelled(
    unlabelled: Path, out: Path, knobs: dict[str, Any], epochs: int, seed: int, resume: bool = False,
    device: str = "cpu",
) -> Path:
    """Pre-train on the unlabelled slices with their pseudo-masks (Semi-Inf-Net's first stage); return the weights.

    ``unlabelled`` holds ``images/`` and ``pseudo_masks/`` (grey 0-255 probability, binarised at 128 as targets). The
    pseudo-masks do not depend on the cross-validation fold, so one pre-trained model starts every fold's and the
    final model's fine-tuning. A finished pre-training with the same knobs is reused.
    """
    done = out / "pretrain.json"
    knobs = {k: v for k, v in knobs.items() if k != "labels"}  # the pseudo-masks are binary: so is pre-training
    knobs.update({"epochs": epochs, "val_interval": epochs + 1, "init_weights": ""})
    weights = out / "bundle" / "models" / "model.pt"
    if _finished(done, weights, knobs):
        return weights
    started = time.perf_counter()
    nifti = out / "nifti"
    names = convert(unlabelled / "images", nifti, masks=unlabelled / "pseudo_masks")["pairs"]
    if not names:
        raise RuntimeError(f"{unlabelled}: no image with a pseudo-mask (expected images/ and pseudo_masks/)")
    write_datalist(_datalist(nifti, names, 0, seed), out / "datalist.json")
    resume = resume and (out / "bundle" / "models" / "latest.pt").is_file()
    train_bundle(out / "datalist.json", out / "bundle", knobs, device=device, seed=seed, resume=resume)
    minutes = (time.perf_counter() - started) / 60
    done.write_text(json.dumps({"knobs": knobs, "slices": len(names), "minutes": minutes}, indent=1) + "\n")
    logger.info("pre-trained on %d pseudo-labelled slices in %.1f min", len(names), minutes)
    return weights


def _finished(record: Path, weights: Path, knobs: dict[str, Any]) -> bool:
    """Whether a training recorded in ``record`` (JSON with its ``knobs``) finished with these knobs and left
    ``weights``: then it is reused instead of repeated."""
    return record.is_file() and weights.is_file() and json.loads(record.read_text())["knobs"] == knobs


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cross-validation and the final training; write ``OUT/results.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with images/ (jpg) and masks/ (png)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs (quick runs)")
    parser.add_argument("--no-final", action="store_true", help="skip the final training on all slices")
    parser.add_argument("--name", default="recipe", help="experiment name recorded in the results")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="last",
                        help="best: an eighth of the training slices validate and select the checkpoint; last: train "
                             "on all of them and keep the last epoch (sets val_interval beyond the epochs)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in OUT: scored folds are kept, trainings continue")
    parser.add_argument("--reuse-models", type=Path, metavar="RUN",
                        help="an earlier run's OUT: score its fold models with this run's inference knobs "
                             f"({', '.join(INFERENCE_ONLY_KNOBS)}) instead of training (same --seed and --folds); "
                             "with --self-training they are the teachers")
    parser.add_argument("--unlabelled", type=Path, metavar="DIR",
                        help="pre-train on DIR/images with DIR/pseudo_masks first (once), then fine-tune every fold "
                             "and the final model from those weights; they only ever train")
    parser.add_argument("--pretrain-epochs", type=int,
                        help=f"epochs over the unlabelled slices (default {PRETRAIN_EPOCHS}; "
                             f"{GPU_PRETRAIN_EPOCHS} with --recipe gpu)")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="cpu",
                        help="cpu: the measured recipe (default); gpu: a wider network and a longer schedule for a "
                             "GPU (GPU_RECIPE), on cuda unless --device says otherwise")
    parser.add_argument("--device", help="where to train and segment (default cpu; cuda with --recipe gpu)")
    parser.add_argument("--no-cv", action="store_true", help="only the final model on all slices, into OUT/bundle")
    parser.add_argument("--labels", choices=("binary", "multiclass"), default="binary",
                        help="binary: DATA/masks (infection); multiclass: DATA/masks_multiclass (1 ground glass, "
                             "2 consolidation), a 3-class network, per-class Dice per image")
    parser.add_argument("--self-training", action="store_true",
                        help="with --unlabelled: every fold's model (and the final model) teaches a student on "
                             "the unlabelled slices it labels (SelfTraining); the student's scores are the fold's, "
                             "the teacher's are kept as teacher_<metric>")
    parser.add_argument("--mean-teacher", action="store_true",
                        help="with --unlabelled: like --self-training, but the student learns from a mean teacher (its "
                             "own moving average, starting as the fold's model) with a consistency loss on the "
                             "unlabelled slices instead of labels made beforehand")
    parser.add_argument("--consistency-weight", type=float, metavar="W",
                        help=f"the mean teacher's consistency weight (default {MEAN_TEACHER_WEIGHT})")
    parser.add_argument("--self-training-epochs", type=int, metavar="N",
                        help=f"student epochs (default {SelfTraining.epochs})")
    parser.add_argument("--self-training-every", type=int, metavar="N",
                        help=f"the teacher labels every N-th unlabelled slice (default {SelfTraining.every})")
    parser.add_argument("--self-training-repeats", type=int, metavar="N",
                        help=f"labelled slices per student epoch, each repeated N times (default "
                             f"{SelfTraining.labelled_repeats})")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from covid_monai.bundle import parse_overrides

    recipe, pretrain_epochs, fine_tune_epochs = RECIPES[args.recipe]
    device = args.device or ("cuda" if args.recipe == "gpu" else "cpu")
    knobs = {**recipe, **parse_overrides(extra), "seed": args.seed}
    if args.labels == "multiclass":
        knobs["labels"] = "multiclass"
    if args.epochs:
        knobs["epochs"] = args.epochs
    elif args.unlabelled and "epochs" not in parse_overrides(extra):
        knobs["epochs"] = fine_tune_epochs[args.labels]
    if args.checkpoint == "last":
        knobs["val_interval"] = int(knobs["epochs"]) + 1
    if args.reuse_models:
        earlier = json.loads((args.reuse_models / "fold0" / "scores.json").read_text())  # written per fold
        knobs = {**earlier["knobs"], **{k: v for k, v in knobs.items() if k in INFERENCE_ONLY_KNOBS}}
        args.no_final = True
    args.out = args.out.resolve()  # the datalists name files by absolute path
    if args.no_cv and args.no_final:
        parser.error("--no-cv with --no-final leaves nothing to do")
    if args.self_training and args.mean_teacher:
        parser.error("--self-training and --mean-teacher are two ways to train the student: choose one")
    if args.consistency_weight is not None and not args.mean_teacher:
        parser.error("--consistency-weight is the weight of --mean-teacher")
    if (args.self_training or args.mean_teacher) and not args.unlabelled:
        parser.error("--self-training and --mean-teacher need --unlabelled DIR: the student's unlabelled slices")
    if args.self_training and args.labels == "multiclass":
        parser.error("--self-training is binary only: the teacher's soft targets are one infection probability")
    weight = 0.0
    if args.mean_teacher:
        weight = MEAN_TEACHER_WEIGHT if args.consistency_weight is None else args.consistency_weight
        if weight <= 0:
            parser.error("--consistency-weight must be > 0")
    settings = SelfTraining(every=args.self_training_every or SelfTraining.every,
                            labelled_repeats=args.self_training_repeats or SelfTraining.labelled_repeats,
                            epochs=args.self_training_epochs or SelfTraining.epochs, consistency_weight=weight)
    started = time.perf_counter()
    result: dict[str, Any] = {"experiment": args.name, "recipe": args.recipe, "device": device,
                              "reused_models": str(args.reuse_models) if args.reuse_models else None}
    if args.unlabelled and args.reuse_models:  # the reused models were pre-trained: their knobs say on what
        convert(args.unlabelled / "images", args.out / "pretrain" / "nifti", masks=args.unlabelled / "pseudo_masks")
    elif args.unlabelled:
        weights = pretrain_on_unlabelled(args.unlabelled, args.out / "pretrain", knobs,
                                         args.pretrain_epochs or pretrain_epochs, args.seed, args.resume, device)
        knobs["init_weights"] = str(weights.resolve())
        result["pretrain"] = json.loads((args.out / "pretrain" / "pretrain.json").read_text())
    teaching = (settings, args.out / "pretrain" / "nifti") if args.self_training or args.mean_teacher else None
    if teaching:
        result["self_training"] = asdict(settings)
    root = args.out / "nifti"
    masks = args.data / ("masks_multiclass" if args.labels == "multiclass" else "masks")
    converted = convert(args.data / "images", root, masks=masks, labels=args.labels)
    names = sorted(converted["pairs"], key=_natural)
    per_fold, per_image = [], []
    for k, test in enumerate([] if args.no_cv else folds(names, args.folds, args.seed)):
        train = [n for n in names if n not in test]
        fold_started = time.perf_counter()
        reuse = args.reuse_models / f"fold{k}" / "bundle" if args.reuse_models else None
        scored = args.out / f"fold{k}" / "scores.json"
        saved = json.loads(scored.read_text()) if args.resume and scored.is_file() else {}
        if saved.get("knobs") == knobs and saved.get("self_training") == result.get("self_training"):
            rows, fold_started = saved["rows"], time.perf_counter() - 60 * saved["minutes"]
        else:
            rows = train_and_score(root, train, test, args.out / f"fold{k}", knobs, args.seed, reuse, args.resume,
                                   device, teaching)
            minutes = (time.perf_counter() - fold_started) / 60
            scored.write_text(json.dumps({"knobs": knobs, "self_training": result.get("self_training"),
                                          "rows": rows, "minutes": minutes}, indent=1) + "\n")
        summary = {m: _mean([r.get(m) for r in rows]) for m in rows[0] if m != "case"}
        per_fold.append({"fold": k, "n": len(rows), "minutes": (time.perf_counter() - fold_started) / 60, **summary})
        per_image += [{**r, "fold": k} for r in rows]
        logger.info("fold %d: Dice@0.5 %.4f, Inf-Net Dice %.4f", k, summary["dice"], summary["infnet_dice"])
    metrics = [m for m in per_image[0] if m not in ("case", "fold")] if per_image else []
    fold_means = {m: [f[m] for f in per_fold] for m in metrics}
    result.update({
        "knobs": knobs,
        "folds": per_fold,
        "mean": {m: _mean([r.get(m) for r in per_image]) for m in metrics},
        "fold_std": {m: float(np.std([x for x in v if x is not None], ddof=1)) if len(v) > 1 else 0.0
                     for m, v in fold_means.items()},
        "per_image": per_image,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
    })
    if not args.no_final:
        final_started = time.perf_counter()
        train_and_score(root, names, [], args.out, knobs, args.seed, resume=args.resume, device=device,
                        teaching=teaching)
        final = args.out / ("student/bundle" if teaching else "bundle")
        result["final_bundle"] = str(final.resolve())
        result["final_minutes"] = (time.perf_counter() - final_started) / 60
    result["minutes"] = (time.perf_counter() - started) / 60
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.no_cv:
        print(f"final model {result['final_bundle']} in {result['final_minutes']:.1f} min")
        return 0
    print(f"{'fold':<6}{'Dice@0.5':>10}{'Sens':>8}{'Spec':>8}{'InfNetDice':>12}{'MaskDice':>10}{'min':>7}")
    for f in per_fold:
        print(f"{f['fold']:<6}{f['dice']:>10.4f}{f['sensitivity']:>8.4f}{f['specificity']:>8.4f}"
              f"{f['infnet_dice']:>12.4f}{f['mask_dice']:>10.4f}{f['minutes']:>7.1f}")
    mean, std = result["mean"], result["fold_std"]
    print(f"{'mean':<6}{mean['dice']:>10.4f}{mean['sensitivity']:>8.4f}{mean['specificity']:>8.4f}"
          f"{mean['infnet_dice']:>12.4f}{mean['mask_dice']:>10.4f}   (fold std of Dice {std['dice']:.4f}); "
          f"total {result['minutes']:.1f} min")
    if mean.get("ggo_dice") is not None:
        print(f"ground glass Dice {mean['ggo_dice']:.4f}, consolidation Dice {mean['consolidation_dice'] or 0:.4f} "
              "(per image, over the images holding the class)")
    print(f"turned by 90 degrees: Dice@0.5 {mean['turned_dice']:.4f}, Inf-Net Dice {mean['turned_infnet_dice']:.4f}, "
          f"mask Dice {mean['turned_mask_dice']:.4f}")
    if teaching:
        print(f"teachers (the same folds before self-training): Dice@0.5 {mean['teacher_dice']:.4f}, Inf-Net Dice "
              f"{mean['teacher_infnet_dice']:.4f}, mask Dice {mean['teacher_mask_dice']:.4f}, turned Dice@0.5 "
              f"{mean['teacher_turned_dice']:.4f}")
    return 0


def _natural(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (10**9, name)


if __name__ == "__main__":
    sys.exit(main())

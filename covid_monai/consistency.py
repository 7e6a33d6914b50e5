"""Mean-teacher training: a consistency loss between the network and its moving average on unlabelled slices.

The mean teacher (Tarvainen & Valpola, NeurIPS 2017; for segmentation e.g. Yu et al., MICCAI 2019) trains a
student network on mixed batches of labelled and unlabelled images. Labelled images give the usual segmentation
loss; every image, labelled or not, also gives a consistency loss: the mean squared difference between the
student's probabilities and those of the teacher, the exponential moving average of the student's own weights, which
sees the same (already augmented) image with Gaussian noise added. The teacher is the bundle's weight average
(:class:`covid_monai.handlers.WeightAveraging`, knob ``ema_decay``), so it is also what validation scores and what
the checkpoints keep.

The bundle switches it on with ``consistency_weight`` > 0 and a datalist ``unlabelled`` list of ``{"image": path}``
entries: :func:`mixed_datalist` puts those slices into the training list with a ``labelled`` flag 0, and
:class:`MeanTeacherIteration` replaces the trainer's iteration.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from covid_monai.handlers import WeightAveraging

__all__ = ["LABELLED_KEY", "MeanTeacherIteration", "consistency_ramp", "mixed_datalist"]

LABELLED_KEY = "labelled"
"""The datalist key that marks a mixed training list's entries: 1 labelled, 0 unlabelled."""


def mixed_datalist(
    training: Sequence[Mapping[str, Any]], unlabelled: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The training list of a mean-teacher run: the labelled entries, then the unlabelled ones, each flagged.

    An unlabelled entry's image stands in as its label, so that both kinds go through the one training chain
    (the same loading, resampling and random augmentation, label-guided cropping included); the iteration never
    reads that label. Without unlabelled entries the training list is returned as it is (no flag: ordinary
    supervised training).

    Example:
        >>> for item in mixed_datalist([{"image": "a.nii.gz", "label": "a_seg.nii.gz"}], [{"image": "u.nii.gz"}]):
        ...     print(item)
        {'image': 'a.nii.gz', 'label': 'a_seg.nii.gz', 'labelled': 1}
        {'image': 'u.nii.gz', 'label': 'u.nii.gz', 'labelled': 0}
    """
    if not unlabelled:
        return [dict(item) for item in training]
    return [{**item, LABELLED_KEY: 1} for item in training] + [
        {"image": item["image"], "label": item["image"], LABELLED_KEY: 0} for item in unlabelled
    ]


def consistency_ramp(iteration: int, rampup_iterations: int) -> float:
    """The consistency weight's factor after ``iteration`` iterations: ``exp(-5 (1 - t)^2)`` for ``t`` rising
    from 0 to 1 over ``rampup_iterations`` (Laine & Aila's sigmoid-shaped ramp), then 1.

    Example:
        >>> [round(consistency_ramp(i, 10), 3) for i in (0, 5, 10, 20)]
        [0.007, 0.287, 1.0, 1.0]
    """
    if rampup_iterations <= 0 or iteration >= rampup_iterations:
        return 1.0
    t = iteration / rampup_iterations
    return math.exp(-5.0 * (1.0 - t) ** 2)


class MeanTeacherIteration:
    """A :class:`monai.engines.SupervisedTrainer` iteration (its ``iteration_update``) for mean-teacher training.

    Per batch (from a :func:`mixed_datalist`): the student's outputs on the batch; the segmentation loss on its
    labelled entries (deep-supervision outputs included); the teacher's probabilities on the same images with noise
    ``N(0, noise_std)`` clipped to ``±noise_clip`` (the images are z-scored); the mean squared difference of the
    student's and the teacher's probabilities over every entry, weighted by ``weight`` times
    :func:`consistency_ramp`. The engine's output holds the student's predictions, ``loss`` the sum,
    ``consistency`` the unweighted consistency term, and as labels (for the training metric) the labelled entries'
    own and the teacher's mask for the unlabelled ones (a batch may hold no labelled entry).

    Args:
        teacher: the bundle's weight average; its ``decay`` must be > 0 (the moving average is the teacher).
        weight: the consistency loss's weight after the ramp-up.
        rampup_iterations: iterations over which the weight rises to ``weight``.
        multiclass: softmax probabilities (a 3-class network) instead of the sigmoid.
        noise_std: standard deviation of the teacher's input noise.
        noise_clip: the noise is clipped to this magnitude.

    Raises:
        ValueError: averaging is off, or a negative weight.
    """

    def __init__(
        self,
        teacher: WeightAveraging,
        weight: float,
        rampup_iterations: int = 0,
        multiclass: bool = False,
        noise_std: float = 0.1,
        noise_clip: float = 0.2,
    ) -> None:
        if teacher.averaged is None:
            raise ValueError("consistency_weight > 0 needs ema_decay > 0: the weights' moving average is the teacher")
        if weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {weight}")
        self.teacher = teacher
        self.weight = float(weight)
        self.rampup_iterations = int(rampup_iterations)
        self.multiclass = bool(multiclass)
        self.noise_std = float(noise_std)
        self.noise_clip = float(noise_clip)

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return torch.softmax(logits, dim=1) if self.multiclass else torch.sigmoid(logits)

    def _forward_and_loss(
        self, engine: Engine, inputs: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor
    ) -> dict[str, Any]:
        """The student's and the teacher's outputs on one batch, and the engine's output with the combined loss."""
        outputs = engine.inferer(inputs, engine.network)
        heads = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        if labelled.any():
            predicted = [h[labelled] for h in heads] if len(heads) > 1 else heads[0][labelled]
            supervised = engine.loss_function(predicted, targets[labelled]).mean()
        else:
            supervised = heads[0].sum() * 0.0
        teacher = self.teacher.module
        was_training = teacher.training
        teacher.eval()
        with torch.no_grad():
            noise = torch.clamp(torch.randn_like(inputs) * self.noise_std, -self.noise_clip, self.noise_clip)
            taught = engine.inferer(inputs + noise, teacher)
            taught = taught[0] if isinstance(taught, (list, tuple)) else taught
            target = self._probabilities(taught)
        teacher.train(was_training)
        consistency = torch.nn.functional.mse_loss(self._probabilities(heads[0]), target)
        ramp = consistency_ramp(engine.state.iteration - 1, self.rampup_iterations)
        hard = target.argmax(dim=1, keepdim=True) if self.multiclass else (target > 0.5)
        reference = torch.where(labelled.view(-1, *[1] * (targets.ndim - 1)), targets, hard.to(targets.dtype))
        return {
            Keys.IMAGE: inputs,
            Keys.LABEL: reference,
            Keys.PRED: heads[0].detach(),
            Keys.LOSS: supervised + self.weight * ramp * consistency,
            "consistency": consistency.detach(),
        }

    def __call__(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        """Run one training step on ``batchdata``; return the engine's output."""
        if LABELLED_KEY not in batchdata:
            raise ValueError(f"mean-teacher batches need the {LABELLED_KEY!r} flag of covid_monai.consistency."
                             "mixed_datalist (no unlabelled list in the datalist?)")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[:2]
        labelled = torch.as_tensor(batchdata[LABELLED_KEY]).to(inputs.device).bool()
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        scaler = engine.scaler if engine.amp else None
        precision = torch.autocast("cuda", **engine.amp_kwargs) if scaler is not None else contextlib.nullcontext()
        with precision:
            engine.state.output = self._forward_and_loss(engine, inputs, targets, labelled)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss = engine.state.output[Keys.LOSS]
        if scaler is not None:
            scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

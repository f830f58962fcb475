"""Training and evaluation of one U-Net on photos held as tensors on the training device.

Phase 1 trains on the train split and validates every epoch, keeping the weights of the
epoch with the best validation F1. Phase 2 applies the final-training strategy:
``retrain`` trains a fresh model on train+validation for the best epoch count of phase 1,
``finetune`` continues the phase-1 model on the validation split at a fraction of the
learning rate, and ``none`` keeps the phase-1 model. Nothing here knows about Ray or
MLflow: callers pass a callback that sees each epoch.
"""

import copy
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from retina.config import TrialSettings
from retina.data.dataset import FundusDataset
from retina.metrics import VesselHistograms, best_f1_threshold, scores_at_threshold
from retina.model import build_loss, build_lr_schedule, build_optimizer, build_unet

log = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite: the trial cannot recover."""


@dataclass
class PhotoTensors:
    """Photos scaled to [0, 1], vessel labels and field-of-view masks on one device."""

    photos: torch.Tensor  # (N, 3, R, R) float32
    vessels: torch.Tensor  # (N, 1, R, R) float32, 0 or 1
    fields_of_view: torch.Tensor  # (N, 1, R, R) bool

    def __len__(self) -> int:
        return self.photos.shape[0]

    @classmethod
    def from_dataset(
        cls, dataset: FundusDataset, indices: list[int], device: torch.device
    ) -> "PhotoTensors":
        photos = torch.from_numpy(np.ascontiguousarray(dataset.photos[indices]))
        return cls(
            photos=photos.to(device).permute(0, 3, 1, 2).float().div_(255.0).contiguous(),
            vessels=torch.from_numpy(dataset.vessels[indices]).to(device).unsqueeze(1).float(),
            fields_of_view=torch.from_numpy(dataset.fields_of_view[indices])
            .to(device)
            .unsqueeze(1),
        )

    def join(self, other: "PhotoTensors") -> "PhotoTensors":
        return PhotoTensors(
            torch.cat([self.photos, other.photos]),
            torch.cat([self.vessels, other.vessels]),
            torch.cat([self.fields_of_view, other.fields_of_view]),
        )


class BatchAugmenter:
    """Seeded flips, 90-degree rotations, brightness and contrast for whole batches.

    Geometric changes are applied to photo and label alike; intensity changes to the
    photo only. Random draws come from the augmenter's own generator, so a trial's
    augmentation does not depend on anything else that uses the global random state.
    """

    def __init__(self, settings: TrialSettings, seed: int) -> None:
        self.settings = settings
        self.generator = torch.Generator().manual_seed(seed)

    def _draw(self, count: int) -> torch.Tensor:
        return torch.rand(count, generator=self.generator)

    def __call__(
        self, photos: torch.Tensor, vessels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        count, device = photos.shape[0], photos.device
        settings = self.settings
        if settings.flips:
            for dim in (-1, -2):
                flip = (self._draw(count) < 0.5).to(device).view(-1, 1, 1, 1)
                photos = torch.where(flip, photos.flip(dim), photos)
                vessels = torch.where(flip, vessels.flip(dim), vessels)
        if settings.rotations:
            turns = (self._draw(count) * 4).long().tolist()
            photos = torch.stack([p.rot90(k, (-2, -1)) for p, k in zip(photos, turns, strict=True)])
            vessels = torch.stack(
                [v.rot90(k, (-2, -1)) for v, k in zip(vessels, turns, strict=True)]
            )
        if settings.brightness or settings.contrast:
            shape = (count, 1, 1, 1)
            gain = 1 + settings.contrast * (2 * self._draw(count) - 1)
            offset = settings.brightness * (2 * self._draw(count) - 1)
            mean = photos.mean(dim=(1, 2, 3), keepdim=True)
            photos = (photos - mean) * gain.to(device).view(shape) + mean
            photos = (photos + offset.to(device).view(shape)).clamp(0, 1)
        return photos, vessels

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def restore(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def _autocast(device: torch.device, settings: TrialSettings):
    if device.type == "cuda" and settings.mixed_precision:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def prepare_model(settings: TrialSettings, device: torch.device) -> nn.Module:
    torch.manual_seed(settings.seed)
    model = build_unet(settings).to(device)
    if device.type == "cuda" and settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def train_one_epoch(
    model: nn.Module,
    data: PhotoTensors,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_schedule: torch.optim.lr_scheduler.LRScheduler,
    augmenter: BatchAugmenter,
    settings: TrialSettings,
) -> float:
    """One pass over ``data`` in a seeded random order; returns the mean loss."""
    model.train()
    device = data.photos.device
    order = torch.randperm(len(data), generator=augmenter.generator).to(device)
    total, seen = 0.0, 0
    for start in range(0, len(data), settings.batch_size):
        batch = order[start : start + settings.batch_size]
        photos, vessels = augmenter(data.photos[batch], data.vessels[batch])
        if device.type == "cuda" and settings.channels_last:
            photos = photos.contiguous(memory_format=torch.channels_last)
        with _autocast(device, settings):
            loss = loss_fn(model(photos), vessels)
        if not torch.isfinite(loss):
            raise DivergedError(f"training loss became {loss.item()} at batch {start}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        total += loss.item() * len(batch)
        seen += len(batch)
    return total / seen


@torch.no_grad()
def predict_probabilities(
    model: nn.Module, photos: torch.Tensor, settings: TrialSettings
) -> torch.Tensor:
    """Vessel probabilities, (N, 1, R, R), for photos already on the model's device."""
    model.eval()
    outputs = []
    for start in range(0, photos.shape[0], settings.batch_size):
        with _autocast(photos.device, settings):
            logits = model(photos[start : start + settings.batch_size])
        outputs.append(torch.sigmoid(logits.float()))
    return torch.cat(outputs)


@dataclass
class Evaluation:
    loss: float
    histograms: VesselHistograms
    probabilities: torch.Tensor


@torch.no_grad()
def evaluate(
    model: nn.Module, data: PhotoTensors, loss_fn: nn.Module, settings: TrialSettings
) -> Evaluation:
    """Loss and probability histograms of a model on a split part."""
    model.eval()
    histograms = VesselHistograms.empty(data.photos.device)
    losses, probabilities = [], []
    for start in range(0, len(data), settings.batch_size):
        part = slice(start, start + settings.batch_size)
        with _autocast(data.photos.device, settings):
            logits = model(data.photos[part])
        logits = logits.float()
        losses.append(loss_fn(logits, data.vessels[part]).item() * logits.shape[0])
        probability = torch.sigmoid(logits)
        histograms.add(probability, data.vessels[part], data.fields_of_view[part])
        probabilities.append(probability)
    return Evaluation(sum(losses) / len(data), histograms, torch.cat(probabilities))


def validation_metrics(evaluation: Evaluation) -> dict[str, float]:
    """Per-epoch validation metrics: ``val_<score>`` inside the field of view, and
    ``val_<score>_image`` over the whole image."""
    metrics = {"val_loss": evaluation.loss}
    for region in ("fov", "image"):
        suffix = "" if region == "fov" else "_image"
        for score, value in scores_at_threshold(evaluation.histograms, region).items():
            metrics[f"val_{score}{suffix}"] = value
    return metrics


@dataclass
class PhaseOneProgress:
    """Everything phase 1 needs to continue after an interruption."""

    epochs_done: int = 0
    best_f1: float = -1.0
    best_epoch: int = 0
    best_threshold: float = 0.5
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_weights: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def epochs_since_best(self) -> int:
        return self.epochs_done - self.best_epoch


@dataclass
class TrainingRun:
    """The live objects of a training phase, with a checkpointable state."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    augmenter: BatchAugmenter

    @classmethod
    def start(
        cls,
        settings: TrialSettings,
        device: torch.device,
        epochs: int,
        steps_per_epoch: int,
        learning_rate: float | None = None,
        weights: dict[str, torch.Tensor] | None = None,
        constant_lr: bool = False,
    ) -> "TrainingRun":
        model = prepare_model(settings, device)
        if weights is not None:
            model.load_state_dict(weights)
        optimizer = build_optimizer(settings, model.parameters(), learning_rate)
        schedule_settings = settings.model_copy(update={"lr_schedule": "constant"})
        lr_schedule = build_lr_schedule(
            schedule_settings if constant_lr else settings, optimizer, epochs, steps_per_epoch
        )
        return cls(model, optimizer, lr_schedule, BatchAugmenter(settings, settings.seed))

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "augmenter": self.augmenter.state(),
        }

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.augmenter.restore(state["augmenter"])

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


EpochCallback = Callable[[dict[str, float], PhaseOneProgress, TrainingRun], None]


def run_phase_one(
    settings: TrialSettings,
    train: PhotoTensors,
    val: PhotoTensors,
    device: torch.device,
    on_epoch: EpochCallback,
    resume_from: tuple[PhaseOneProgress, dict] | None = None,
) -> PhaseOneProgress:
    """Train on the train split, validate each epoch, keep the best weights by val F1.

    Stops after ``settings.epochs`` epochs, or earlier once ``settings.patience`` epochs
    pass without a better validation F1.
    """
    loss_fn = build_loss(settings)
    steps = math.ceil(len(train) / settings.batch_size)
    run = TrainingRun.start(settings, device, settings.epochs, steps)
    progress = PhaseOneProgress()
    if resume_from is not None:
        progress, run_state = resume_from
        run.restore(run_state)
        log.info("phase 1 resumes after epoch %d", progress.epochs_done)

    while progress.epochs_done < settings.epochs:
        if settings.patience and progress.epochs_since_best >= settings.patience:
            log.info("early stopping: no better val F1 for %d epochs", settings.patience)
            break
        started = time.perf_counter()
        lr = run.learning_rate
        train_loss = train_one_epoch(
            run.model, train, loss_fn, run.optimizer, run.lr_schedule, run.augmenter, settings
        )
        evaluation = evaluate(run.model, val, loss_fn, settings)
        progress.epochs_done += 1
        metrics = {"train_loss": train_loss, "learning_rate": lr, **validation_metrics(evaluation)}
        metrics["epoch_seconds"] = time.perf_counter() - started
        if metrics["val_f1"] > progress.best_f1:
            progress.best_f1 = metrics["val_f1"]
            progress.best_epoch = progress.epochs_done
            progress.best_threshold, _ = best_f1_threshold(evaluation.histograms, "fov")
            progress.best_metrics = dict(metrics)
            progress.best_weights = {
                key: value.detach().clone() for key, value in run.model.state_dict().items()
            }
        progress.history.append(metrics)
        on_epoch(metrics, progress, run)
    return progress


def run_final_training(
    settings: TrialSettings,
    train: PhotoTensors,
    val: PhotoTensors,
    device: torch.device,
    progress: PhaseOneProgress,
    on_epoch: Callable[[int, float], None] = lambda epoch, loss: None,
) -> nn.Module:
    """Phase 2: produce the final model by the settings' final-training strategy."""
    if settings.strategy == "none":
        model = prepare_model(settings, device)
        model.load_state_dict(progress.best_weights)
        return model

    if settings.strategy == "retrain":
        data = train.join(val)
        epochs = max(1, progress.best_epoch)
        run = TrainingRun.start(
            settings, device, epochs, math.ceil(len(data) / settings.batch_size)
        )
    else:
        data = val
        epochs = settings.finetune_epochs
        run = TrainingRun.start(
            settings,
            device,
            epochs,
            math.ceil(len(data) / settings.batch_size),
            learning_rate=settings.learning_rate * settings.finetune_lr_factor,
            weights=copy.deepcopy(progress.best_weights),
            constant_lr=True,
        )
    # A fresh seed for phase 2's augmentation, so retraining does not replay phase 1.
    run.augmenter = BatchAugmenter(settings, settings.seed + 1)
    loss_fn = build_loss(settings)
    for epoch in range(1, epochs + 1):
        loss = train_one_epoch(
            run.model, data, loss_fn, run.optimizer, run.lr_schedule, run.augmenter, settings
        )
        on_epoch(epoch, loss)
    return run.model

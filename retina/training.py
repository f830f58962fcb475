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
from monai.inferers import sliding_window_inference
from torch import nn

from retina.config import TrialSettings
from retina.data.dataset import FundusDataset
from retina.data.images import enhance_photos
from retina.data.splits import Split
from retina.errors import DataError
from retina.metrics import VesselHistograms, best_f1_threshold, scores_at_threshold
from retina.model import (
    build_loss,
    build_lr_schedule,
    build_optimizer,
    build_plateau_schedule,
    build_unet,
)

log = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite: the trial cannot recover."""


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the workers that train one trial together.

    With one worker (the default) every method is the identity. With several, each
    worker trains on its shard of every epoch's seeded order while DDP averages the
    gradients, and validation histograms are summed over workers, so every worker sees
    the scores of the whole validation split and takes the same early-stopping decision.
    """

    rank: int = 0
    world: int = 1

    def shard(self, order: torch.Tensor) -> torch.Tensor:
        """This worker's part of an epoch's order; shards are padded to equal length,
        so that every worker takes the same number of steps (DDP needs that)."""
        if self.world == 1:
            return order
        per_worker = -(-len(order) // self.world)
        padded = order.repeat(-(-per_worker * self.world // len(order)))[: per_worker * self.world]
        return padded[self.rank :: self.world]

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        return nn.parallel.DistributedDataParallel(model)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor


SINGLE_PROCESS = DataParallel()


def model_input(photos: np.ndarray, settings: TrialSettings, device: torch.device) -> torch.Tensor:
    """What the U-Net reads: resized (N, R, R, 3) uint8 photos, enhanced as the settings
    say, as (N, C, R, R) float32 in [0, 1] on ``device``."""
    enhanced = torch.from_numpy(enhance_photos(photos, settings.preprocessing))
    return enhanced.to(device).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


@dataclass
class PhotoTensors:
    """Photos scaled to [0, 1], vessel labels and field-of-view masks on one device."""

    photos: torch.Tensor  # (N, C, R, R) float32; C is 3, or 1 for the green channel
    vessels: torch.Tensor  # (N, 1, R, R) float32, 0 or 1
    fields_of_view: torch.Tensor  # (N, 1, R, R) bool

    def __len__(self) -> int:
        return self.photos.shape[0]

    @classmethod
    def from_dataset(
        cls,
        dataset: FundusDataset,
        indices: list[int],
        device: torch.device,
        settings: TrialSettings,
    ) -> "PhotoTensors":
        return cls(
            photos=model_input(dataset.photos[indices], settings, device),
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


def trial_split(dataset: FundusDataset, settings: TrialSettings) -> Split:
    """The photos of a trial's train, validation and test parts: named in the settings
    (a fixed split), or drawn with the split seed."""
    if not settings.fixed_split:
        return dataset.split(
            settings.split_seed, settings.train_fraction, settings.val_fraction, settings.stratify
        )
    known = set(dataset.names)
    for part in ("train", "val", "test"):
        for name in getattr(settings, f"{part}_photos"):
            if name not in known:
                raise DataError(
                    f"{part}_photos: no photo named {name!r} in {dataset.source} "
                    f"(names look like {dataset.names[0]!r})"
                )
    return Split(settings.train_photos, settings.val_photos, settings.test_photos)


def split_tensors(
    dataset: FundusDataset, settings: TrialSettings, device: torch.device
) -> tuple[PhotoTensors, PhotoTensors]:
    """The trial's train and validation photos on its device; the test photos stay unread."""
    split = trial_split(dataset, settings)
    return (
        PhotoTensors.from_dataset(dataset, dataset.index_of(split.train), device, settings),
        PhotoTensors.from_dataset(dataset, dataset.index_of(split.val), device, settings),
    )


def random_patches(
    photos: torch.Tensor, vessels: torch.Tensor, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random square crop of ``size`` pixels per photo, the same for its label."""
    count, (height, width) = photos.shape[0], photos.shape[-2:]
    tops = torch.randint(0, height - size + 1, (count,), generator=generator).tolist()
    lefts = torch.randint(0, width - size + 1, (count,), generator=generator).tolist()
    crops = [
        (slice(top, top + size), slice(left, left + size))
        for top, left in zip(tops, lefts, strict=True)
    ]
    return (
        torch.stack(
            [photo[:, rows, cols] for photo, (rows, cols) in zip(photos, crops, strict=True)]
        ),
        torch.stack(
            [label[:, rows, cols] for label, (rows, cols) in zip(vessels, crops, strict=True)]
        ),
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
        if settings.rotation_degrees or settings.scaling:
            photos, vessels = self._rotate_and_scale(photos, vessels)
        if settings.gamma:
            exponent = 1 + settings.gamma * (2 * self._draw(count) - 1)
            photos = photos.clamp(min=0).pow(exponent.to(device).view(count, 1, 1, 1))
        if settings.brightness or settings.contrast:
            shape = (count, 1, 1, 1)
            gain = 1 + settings.contrast * (2 * self._draw(count) - 1)
            offset = settings.brightness * (2 * self._draw(count) - 1)
            mean = photos.mean(dim=(1, 2, 3), keepdim=True)
            photos = (photos - mean) * gain.to(device).view(shape) + mean
            photos = (photos + offset.to(device).view(shape)).clamp(0, 1)
        return photos, vessels

    def _rotate_and_scale(
        self, photos: torch.Tensor, vessels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Small random rotations and zooms about the centre, one per photo."""
        count, device = photos.shape[0], photos.device
        angle = torch.deg2rad(self.settings.rotation_degrees * (2 * self._draw(count) - 1))
        zoom = 1 + self.settings.scaling * (2 * self._draw(count) - 1)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        zeros = torch.zeros(count)
        affine = torch.stack(
            [torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1
        ).to(device)
        grid = torch.nn.functional.affine_grid(affine, list(photos.shape), align_corners=False)
        photos = torch.nn.functional.grid_sample(photos, grid, align_corners=False)
        # Labels are resampled like the photo, then made binary again at one half.
        vessels = torch.nn.functional.grid_sample(vessels, grid, align_corners=False)
        return photos, (vessels >= 0.5).float()

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
    parallel: DataParallel = SINGLE_PROCESS,
) -> float:
    """One pass over ``data`` in a seeded random order; returns the mean loss."""
    model.train()
    device = data.photos.device
    samples = len(data) * settings.crops_per_photo
    order = torch.randperm(samples, generator=augmenter.generator) % len(data)
    order = parallel.shard(order).to(device)
    total, seen = 0.0, 0
    for start in range(0, len(order), settings.batch_size):
        batch = order[start : start + settings.batch_size]
        photos, vessels = data.photos[batch], data.vessels[batch]
        if settings.patch_size:
            photos, vessels = random_patches(
                photos, vessels, settings.patch_size, augmenter.generator
            )
        photos, vessels = augmenter(photos, vessels)
        if device.type == "cuda" and settings.channels_last:
            photos = photos.contiguous(memory_format=torch.channels_last)
        with _autocast(device, settings):
            loss = loss_fn(model(photos), vessels)
        # Summed over workers, so that all of them stop together when one diverges.
        diverged = parallel.sum((~torch.isfinite(loss.detach())).double().reshape(1))
        if diverged.item():
            raise DivergedError(f"training loss became {loss.item()} at batch {start}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        total += loss.item() * len(batch)
        seen += len(batch)
    both = parallel.sum(torch.tensor([total, float(seen)], dtype=torch.float64, device=device))
    return float(both[0] / both[1])


def infer_logits(model: nn.Module, photos: torch.Tensor, settings: TrialSettings) -> torch.Tensor:
    """Vessel logits of whole photos: in one pass, or, for a model trained on patches,
    from overlapping windows of the patch size blended with Gaussian weights."""
    with _autocast(photos.device, settings):
        if settings.patch_size and settings.patch_size < photos.shape[-1]:
            logits = sliding_window_inference(
                photos,
                roi_size=(settings.patch_size, settings.patch_size),
                sw_batch_size=settings.batch_size,
                predictor=model,
                overlap=0.25,
                mode="gaussian",
            )
        else:
            logits = model(photos)
    return logits.float()


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    photos: torch.Tensor,
    settings: TrialSettings,
    test_time_flips: bool | None = None,
) -> torch.Tensor:
    """Vessel probabilities, (N, 1, R, R), for photos already on the model's device.

    With test-time flips (the settings' choice unless given) each probability is the
    mean over the photo, its left-right and up-down flips and both flips together.
    """
    flips = settings.test_time_flips if test_time_flips is None else test_time_flips
    views = ((), (-1,), (-2,), (-2, -1)) if flips else ((),)
    model.eval()
    outputs = []
    for start in range(0, photos.shape[0], settings.batch_size):
        batch = photos[start : start + settings.batch_size]
        total = torch.zeros((batch.shape[0], 1, *batch.shape[-2:]), device=batch.device)
        for dims in views:
            flipped = batch.flip(dims) if dims else batch
            probabilities = torch.sigmoid(infer_logits(model, flipped, settings))
            total += probabilities.flip(dims) if dims else probabilities
        outputs.append(total / len(views))
    return torch.cat(outputs)


@dataclass
class Evaluation:
    loss: float
    histograms: VesselHistograms


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: PhotoTensors,
    loss_fn: nn.Module,
    settings: TrialSettings,
    parallel: DataParallel = SINGLE_PROCESS,
) -> Evaluation:
    """Loss and probability histograms of a model on a split part (all workers' shards)."""
    model.eval()
    device = data.photos.device
    histograms = VesselHistograms.empty(device)
    shard = torch.arange(len(data))[parallel.rank :: parallel.world].to(device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # loss * photos, photos
    for start in range(0, len(shard), settings.batch_size):
        part = shard[start : start + settings.batch_size]
        logits = infer_logits(model, data.photos[part], settings)
        loss_sum[0] += loss_fn(logits, data.vessels[part]).item() * len(part)
        loss_sum[1] += len(part)
        histograms.add(torch.sigmoid(logits), data.vessels[part], data.fields_of_view[part])
    for counts in (*histograms.vessel.values(), *histograms.background.values()):
        parallel.sum(counts)
    parallel.sum(loss_sum)
    return Evaluation(float(loss_sum[0] / loss_sum[1]), histograms)


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
class ResumePoint:
    """Where an interrupted trial carries on: inside phase 1 (its progress and the live
    state of its training run), or inside phase 2 once phase 1 has finished."""

    progress: PhaseOneProgress
    phase_one_run: dict | None = None
    phase_two_epochs: int = 0
    phase_two_run: dict | None = None

    @property
    def in_phase_two(self) -> bool:
        """Phase 1 had ended: only phase 2 is left to carry on."""
        return self.phase_two_run is not None


@dataclass
class TrainingRun:
    """The live objects of a training phase, with a checkpointable state.

    ``network`` is what training calls: the model itself, or its DDP wrapper when
    several workers train the trial together; ``model`` is always the bare U-Net.
    """

    model: nn.Module
    network: nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    augmenter: BatchAugmenter
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None

    @classmethod
    def start(
        cls,
        settings: TrialSettings,
        device: torch.device,
        epochs: int,
        photos: int,
        parallel: DataParallel = SINGLE_PROCESS,
        learning_rate: float | None = None,
        weights: dict[str, torch.Tensor] | None = None,
        constant_lr: bool = False,
        augmentation_seed: int | None = None,
    ) -> "TrainingRun":
        """Build model, optimizer and schedule for ``epochs`` passes over ``photos``."""
        model = prepare_model(settings, device)
        if weights is not None:
            model.load_state_dict(weights)
        optimizer = build_optimizer(settings, model.parameters(), learning_rate)
        schedule_settings = settings.model_copy(update={"lr_schedule": "constant"})
        samples = photos * settings.crops_per_photo
        steps_per_epoch = math.ceil(math.ceil(samples / parallel.world) / settings.batch_size)
        lr_schedule = build_lr_schedule(
            schedule_settings if constant_lr else settings, optimizer, epochs, steps_per_epoch
        )
        seed = settings.seed if augmentation_seed is None else augmentation_seed
        augmenter = BatchAugmenter(settings, seed)
        plateau = None if constant_lr else build_plateau_schedule(settings, optimizer)
        return cls(model, parallel.wrap(model), optimizer, lr_schedule, augmenter, plateau)

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "augmenter": self.augmenter.state(),
            "plateau": self.plateau.state_dict() if self.plateau else None,
        }

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.augmenter.restore(state["augmenter"])
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_epoch(
        self,
        data: PhotoTensors,
        loss_fn: nn.Module,
        settings: TrialSettings,
        parallel: DataParallel,
    ) -> float:
        return train_one_epoch(
            self.network,
            data,
            loss_fn,
            self.optimizer,
            self.lr_schedule,
            self.augmenter,
            settings,
            parallel,
        )


EpochCallback = Callable[[dict[str, float], PhaseOneProgress, TrainingRun], None]
# Phase 2 calls back with the epoch just trained (1-based), its training loss and the run.
FinalEpochCallback = Callable[[int, float, TrainingRun], None]


def run_phase_one(
    settings: TrialSettings,
    train: PhotoTensors,
    val: PhotoTensors,
    device: torch.device,
    on_epoch: EpochCallback,
    resume_from: ResumePoint | None = None,
    parallel: DataParallel = SINGLE_PROCESS,
) -> PhaseOneProgress:
    """Train on the train split, validate each epoch, keep the best weights by val F1.

    Stops after ``settings.epochs`` epochs, or earlier once ``settings.patience`` epochs
    pass without a better validation F1.
    """
    if resume_from is not None and resume_from.in_phase_two:
        return resume_from.progress
    loss_fn = build_loss(settings)
    run = TrainingRun.start(settings, device, settings.epochs, len(train), parallel)
    progress = PhaseOneProgress()
    if resume_from is not None:
        progress = resume_from.progress
        run.restore(resume_from.phase_one_run)
        log.info("phase 1 resumes after epoch %d", progress.epochs_done)

    while progress.epochs_done < settings.epochs:
        if settings.patience and progress.epochs_since_best >= settings.patience:
            log.info("early stopping: no better val F1 for %d epochs", settings.patience)
            break
        started = time.perf_counter()
        lr = run.learning_rate
        train_loss = run.train_epoch(train, loss_fn, settings, parallel)
        training_seconds = time.perf_counter() - started
        evaluation = evaluate(run.model, val, loss_fn, settings, parallel)
        progress.epochs_done += 1
        metrics = {"train_loss": train_loss, "learning_rate": lr, **validation_metrics(evaluation)}
        if run.plateau is not None:
            run.plateau.step(metrics["val_f1"])
        metrics["epoch_seconds"] = time.perf_counter() - started
        # Photos this worker trained on per second: the throughput a sweep pays for.
        metrics["train_photos_per_second"] = len(train) / parallel.world / training_seconds
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


def final_training_epochs(settings: TrialSettings, progress: PhaseOneProgress) -> int:
    """Phase 2's length: retraining repeats phase 1's best epoch count, fine-tuning runs
    its own; ``none`` trains nothing."""
    if settings.strategy == "retrain":
        return max(1, progress.best_epoch)
    return settings.finetune_epochs if settings.strategy == "finetune" else 0


def run_final_training(
    settings: TrialSettings,
    train: PhotoTensors,
    val: PhotoTensors,
    device: torch.device,
    progress: PhaseOneProgress,
    on_epoch: FinalEpochCallback = lambda epoch, loss, run: None,
    parallel: DataParallel = SINGLE_PROCESS,
    resume_from: ResumePoint | None = None,
) -> nn.Module:
    """Phase 2: produce the final model by the settings' final-training strategy,
    carrying on after the last epoch of ``resume_from`` when it holds a phase-2 state."""
    if settings.strategy == "none":
        model = prepare_model(settings, device)
        model.load_state_dict(progress.best_weights)
        return model

    # A fresh seed for phase 2's augmentation, so retraining does not replay phase 1.
    phase_two_seed = settings.seed + 1
    epochs = final_training_epochs(settings, progress)
    if settings.strategy == "retrain":
        data = train.join(val)
        run = TrainingRun.start(
            settings, device, epochs, len(data), parallel, augmentation_seed=phase_two_seed
        )
    else:
        data = val
        run = TrainingRun.start(
            settings,
            device,
            epochs,
            len(data),
            parallel,
            learning_rate=settings.learning_rate * settings.finetune_lr_factor,
            weights=copy.deepcopy(progress.best_weights),
            constant_lr=True,
            augmentation_seed=phase_two_seed,
        )
    first_epoch = 1
    if resume_from is not None and resume_from.in_phase_two:
        run.restore(resume_from.phase_two_run)
        first_epoch = resume_from.phase_two_epochs + 1
        log.info("phase 2 (%s) resumes after epoch %d", settings.strategy, first_epoch - 1)
    loss_fn = build_loss(settings)
    for epoch in range(first_epoch, epochs + 1):
        on_epoch(epoch, run.train_epoch(data, loss_fn, settings, parallel), run)
    return run.model

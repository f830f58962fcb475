"""The plain PyTorch training loop that figure 2 holds a `retina` trial against.

No Ray, no MLflow, no checkpoints and nothing from ``retina.training``: the same U-Net,
loss, optimizer, learning-rate schedule, split, batch size, epochs and kinds of
augmentation as the trial, written the way one would without a framework, validating
every epoch. Run by ``benchmarks/trial_overhead.py`` in a fresh interpreter:

    python benchmarks/bare_loop.py SWEEP.yaml --data-dir DIR --threads 1 --launched-at T

It prints one JSON object with wall-clock times (``time.time()``) of its milestones.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from retina.config import TrialSettings, load_sweep_file
from retina.data.dataset import FundusDataset, load_dataset
from retina.data.splits import split_photos
from retina.model import build_loss, build_lr_schedule, build_optimizer, build_unet


def settings_of(sweep_file: Path) -> TrialSettings:
    """The one trial of a one-trial sweep file: its fixed settings and first search values."""
    spec = load_sweep_file(sweep_file)
    chosen = {key: axis[0] for key, axis in spec.search.items() if isinstance(axis, list)}
    return TrialSettings.model_validate({**spec.fixed, **chosen})


def as_tensors(
    dataset: FundusDataset, rows: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Photos as (N, 3, R, R) floats in [0, 1]; labels and masks as (N, 1, R, R)."""
    return (
        torch.from_numpy(dataset.photos[rows]).permute(0, 3, 1, 2).float().div(255).contiguous(),
        torch.from_numpy(dataset.vessels[rows]).unsqueeze(1).float(),
        torch.from_numpy(dataset.fields_of_view[rows]).unsqueeze(1),
    )


def augment(
    photos: torch.Tensor, vessels: torch.Tensor, settings: TrialSettings, rng: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and quarter turns of photo and label; brightness and contrast of the photo."""
    count = photos.shape[0]
    for dim in (2, 3):
        chosen = torch.rand(count, generator=rng) < 0.5
        photos[chosen] = photos[chosen].flip(dim)
        vessels[chosen] = vessels[chosen].flip(dim)
    turns = torch.randint(0, 4, (count,), generator=rng).tolist()
    photos = torch.stack([torch.rot90(p, k, (1, 2)) for p, k in zip(photos, turns, strict=True)])
    vessels = torch.stack([torch.rot90(v, k, (1, 2)) for v, k in zip(vessels, turns, strict=True)])
    gain = 1 + settings.contrast * (2 * torch.rand(count, 1, 1, 1, generator=rng) - 1)
    shift = settings.brightness * (2 * torch.rand(count, 1, 1, 1, generator=rng) - 1)
    mean = photos.mean(dim=(1, 2, 3), keepdim=True)
    return ((photos - mean) * gain + mean + shift).clamp(0, 1), vessels


@torch.no_grad()
def validate(
    model: nn.Module,
    loss_fn: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    batch_size: int,
) -> tuple[float, float]:
    """Mean loss, and F1 at probability 0.5 inside the field of view."""
    model.eval()
    photos, vessels, fields = data
    loss_sum, hits, false_alarms, misses = 0.0, 0, 0, 0
    for start in range(0, photos.shape[0], batch_size):
        part = slice(start, start + batch_size)
        logits = model(photos[part])
        loss_sum += loss_fn(logits, vessels[part]).item() * logits.shape[0]
        predicted, truth, inside = logits > 0, vessels[part] > 0.5, fields[part]
        hits += int((predicted & truth & inside).sum())
        false_alarms += int((predicted & ~truth & inside).sum())
        misses += int((~predicted & truth & inside).sum())
    f1 = 2 * hits / max(1, 2 * hits + false_alarms + misses)
    return loss_sum / photos.shape[0], f1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_file", type=Path)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--launched-at", type=float, default=time.time())
    args = parser.parse_args()
    imported_at = time.time()

    torch.set_num_threads(args.threads)
    settings = settings_of(args.sweep_file)
    dataset = load_dataset(args.data_dir, settings.resolution)
    split = split_photos(
        dataset.names,
        settings.split_seed,
        settings.train_fraction,
        settings.val_fraction,
        categories=dataset.categories if settings.stratify else None,
        official_splits=dataset.official_splits,
    )
    train = as_tensors(dataset, dataset.index_of(split.train))
    val = as_tensors(dataset, dataset.index_of(split.val))
    data_loaded_at = time.time()

    torch.manual_seed(settings.seed)
    model = build_unet(settings)
    loss_fn = build_loss(settings)
    optimizer = build_optimizer(settings, model.parameters())
    steps = math.ceil(train[0].shape[0] / settings.batch_size)
    schedule = build_lr_schedule(settings, optimizer, settings.epochs, steps)
    rng = torch.Generator().manual_seed(settings.seed)
    first_step_at, epoch_ends, history = None, [], []

    for epoch in range(1, settings.epochs + 1):
        model.train()
        order = torch.randperm(train[0].shape[0], generator=rng)
        total = 0.0
        for start in range(0, len(order), settings.batch_size):
            if first_step_at is None:
                first_step_at = time.time()
            batch = order[start : start + settings.batch_size]
            photos, vessels = augment(train[0][batch], train[1][batch], settings, rng)
            loss = loss_fn(model(photos), vessels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        _, val_f1 = validate(model, loss_fn, val, settings.batch_size)
        epoch_ends.append(time.time())
        history.append({"epoch": epoch, "train_loss": total / len(order), "val_f1": val_f1})

    result = {
        "launched_at": args.launched_at,
        "imported_at": imported_at,
        "data_loaded_at": data_loaded_at,
        "first_step_at": first_step_at,
        "epoch_ends": epoch_ends,
        "history": history,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

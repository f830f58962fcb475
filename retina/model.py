"""The U-Net, its loss and its optimizer, built from a trial's settings."""

import math

import torch
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss, TverskyLoss
from monai.networks.nets import UNet
from torch import nn

from retina.config import TrialSettings


def build_unet(settings: TrialSettings) -> nn.Module:
    """A 2-D MONAI U-Net: photo in (RGB or one green channel), one vessel logit per pixel
    out."""
    return UNet(
        spatial_dims=2,
        in_channels=settings.input_channels,
        out_channels=1,
        channels=settings.channels,
        strides=(2,) * (len(settings.channels) - 1),
        num_res_units=settings.residual_units,
        dropout=settings.dropout,
    )


def build_loss(settings: TrialSettings) -> nn.Module:
    """The training loss on logits; Dice handles the class imbalance (about 10% vessel)."""
    if settings.loss == "dice_ce":
        return DiceCELoss(sigmoid=True)
    if settings.loss == "dice":
        return DiceLoss(sigmoid=True)
    if settings.loss == "dice_focal":
        return DiceFocalLoss(sigmoid=True, gamma=2.0)
    if settings.loss == "tversky":
        # Missing a thin vessel (false negative) costs more than a false vessel pixel.
        return TverskyLoss(sigmoid=True, alpha=0.3, beta=0.7)
    return nn.BCEWithLogitsLoss()


def build_optimizer(
    settings: TrialSettings, parameters, learning_rate: float | None = None
) -> torch.optim.Optimizer:
    """The optimizer named by the settings; SGD and RMSprop use the settings' momentum."""
    lr = settings.learning_rate if learning_rate is None else learning_rate
    decay = settings.weight_decay
    match settings.optimizer:
        case "sgd":
            return torch.optim.SGD(
                parameters, lr=lr, momentum=settings.momentum, weight_decay=decay
            )
        case "rmsprop":
            return torch.optim.RMSprop(
                parameters, lr=lr, momentum=settings.momentum, weight_decay=decay
            )
        case "adam":
            return torch.optim.Adam(parameters, lr=lr, weight_decay=decay)
        case "adamw":
            return torch.optim.AdamW(parameters, lr=lr, weight_decay=decay)
        case "nadam":
            return torch.optim.NAdam(parameters, lr=lr, weight_decay=decay)
        case "radam":
            return torch.optim.RAdam(parameters, lr=lr, weight_decay=decay)
        case "adamax":
            return torch.optim.Adamax(parameters, lr=lr, weight_decay=decay)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}")


def build_lr_schedule(
    settings: TrialSettings, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-step learning-rate schedule over ``epochs``.

    ``plateau`` has no per-step part (a constant here); its epoch-level halving on a
    stalled validation F1 comes from ``build_plateau_schedule``.
    """
    total_steps = max(1, epochs * steps_per_epoch)
    if settings.lr_schedule == "onecycle":
        max_lr = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=0.2
        )
    if settings.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if settings.lr_schedule == "cosine_warmup":
        warmup = max(1, total_steps // 10)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def build_plateau_schedule(
    settings: TrialSettings, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    """Halve the learning rate after 5 epochs without a better validation F1."""
    if settings.lr_schedule != "plateau":
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=5)

"""The U-Net, its loss and its optimizer, built from a trial's settings."""

import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.networks.nets import UNet
from torch import nn

from retina.config import TrialSettings


def build_unet(settings: TrialSettings) -> nn.Module:
    """A 2-D MONAI U-Net: RGB photo in, one vessel logit per pixel out."""
    return UNet(
        spatial_dims=2,
        in_channels=3,
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
    """A per-step learning-rate schedule over ``epochs`` (constant, cosine or one-cycle)."""
    total_steps = max(1, epochs * steps_per_epoch)
    if settings.lr_schedule == "onecycle":
        max_lr = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=0.2
        )
    if settings.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

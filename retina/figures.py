"""Figures logged to MLflow: learning curves and predictions beside their labels."""

import matplotlib

matplotlib.use("Agg")  # trials and CI have no display

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure


def learning_curves_figure(history: list[dict[str, float]]) -> Figure:
    """Training and validation loss, and validation F1, per phase-1 epoch."""
    epochs = np.arange(1, len(history) + 1)
    figure, (losses, scores) = plt.subplots(1, 2, figsize=(10, 4))
    losses.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    losses.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    losses.set_xlabel("epoch")
    losses.legend()
    scores.plot(epochs, [h["val_f1"] for h in history], label="validation F1 (field of view)")
    scores.plot(epochs, [h["val_auc"] for h in history], label="validation AUC")
    best = int(np.argmax([h["val_f1"] for h in history]))
    scores.axvline(best + 1, color="grey", linestyle=":", label=f"best epoch {best + 1}")
    scores.set_xlabel("epoch")
    scores.set_ylim(0, 1)
    scores.legend(loc="lower right")
    figure.tight_layout()
    return figure


def predictions_figure(
    photos: torch.Tensor,
    vessels: torch.Tensor,
    probabilities: torch.Tensor,
    threshold: float,
    title: str,
    names: list[str] | None = None,
) -> Figure:
    """Per photo: the photo, its label, and an overlay of prediction errors.

    In the overlay, white is a vessel found, red a vessel missed and blue a false vessel.
    """
    count = photos.shape[0]
    figure, axes = plt.subplots(count, 3, figsize=(9, 3 * count), squeeze=False)
    for row in range(count):
        photo = photos[row].permute(1, 2, 0).numpy()
        if photo.shape[-1] == 1:  # the green channel alone
            photo = photo[..., 0]
        truth = vessels[row, 0].numpy() > 0.5
        found = probabilities[row, 0].numpy() >= threshold
        overlay = np.zeros((*truth.shape, 3))
        overlay[truth & found] = (1, 1, 1)
        overlay[truth & ~found] = (1, 0.2, 0.2)
        overlay[~truth & found] = (0.3, 0.5, 1)
        label = names[row] if names else f"photo {row + 1}"
        for column, (image, heading) in enumerate(
            ((photo, label), (truth, "vessel label"), (overlay, f"prediction at {threshold:.2f}"))
        ):
            axes[row, column].imshow(image, cmap="gray" if image.ndim == 2 else None)
            axes[row, column].set_title(heading, fontsize=9)
            axes[row, column].axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    return figure

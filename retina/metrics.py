"""Vessel-segmentation scores, computed on the training device from probability histograms.

Counting each class's pixels into probability bins once gives, for every threshold on a
bin edge, the exact confusion matrix: F1 at 0.5, the threshold that maximises F1 and the
area under the ROC curve all come from the same two histograms, without moving millions
of pixels to the CPU. Two regions are scored: the whole image, as the published HRF
experiment did, and the field of view, as the field does.

The bins are even in logit, not in probability: a trained U-Net puts most pixels within
1e-3 of 0 or 1, where even probability bins would lump them together and understate the
AUC; logit bins keep them apart down to probabilities of about 1e-7.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

# 3200 bins of 0.01 in logit between -16 and 16: 0.5 (logit 0) is a bin edge, so F1 at
# 0.5 is exact, and the best-F1 threshold is found to within 0.25% in probability.
LOGIT_RANGE = 16.0
HISTOGRAM_BINS = 3200
REGIONS = ("fov", "image")


def _bins(probabilities: torch.Tensor) -> torch.Tensor:
    logits = torch.logit(probabilities.detach().double(), eps=1e-12)
    position = (logits + LOGIT_RANGE) / (2 * LOGIT_RANGE) * HISTOGRAM_BINS
    return position.floor().long().clamp_(0, HISTOGRAM_BINS - 1)


def _edge_of(threshold: float) -> int:
    """The bin edge of a probability threshold: pixels in bins at or above it are vessel."""
    logit = float(torch.logit(torch.tensor(threshold, dtype=torch.float64), eps=1e-12))
    position = round((logit + LOGIT_RANGE) / (2 * LOGIT_RANGE) * HISTOGRAM_BINS)
    return min(max(position, 0), HISTOGRAM_BINS)


def _threshold_of(edge: int) -> float:
    logit = edge / HISTOGRAM_BINS * 2 * LOGIT_RANGE - LOGIT_RANGE
    return float(torch.sigmoid(torch.tensor(logit, dtype=torch.float64)))


@dataclass
class VesselHistograms:
    """Per-bin pixel counts of vessel and background pixels, for each region."""

    vessel: dict[str, torch.Tensor]
    background: dict[str, torch.Tensor]

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> "VesselHistograms":
        def zeros():
            return torch.zeros(HISTOGRAM_BINS, dtype=torch.float64, device=device)

        return cls({r: zeros() for r in REGIONS}, {r: zeros() for r in REGIONS})

    def add(self, probabilities: torch.Tensor, vessels: torch.Tensor, fov: torch.Tensor) -> None:
        """Count a batch of vessel probabilities against boolean labels and masks."""
        bins = _bins(probabilities).flatten()
        vessels = vessels.bool().flatten()
        fov = fov.bool().flatten()
        for region, inside in (("image", None), ("fov", fov)):
            for target, histograms in ((vessels, self.vessel), (~vessels, self.background)):
                selected = target if inside is None else target & inside
                histograms[region] += torch.bincount(
                    bins[selected], minlength=HISTOGRAM_BINS
                ).double()

    def merge(self, other: "VesselHistograms") -> None:
        """Add another set of counts (another photo, another worker) to these."""
        for mine, theirs in ((self.vessel, other.vessel), (self.background, other.background)):
            for region in REGIONS:
                mine[region] += theirs[region].to(mine[region].device)


def _cumulative_from_top(histogram: torch.Tensor) -> np.ndarray:
    """Pixels at or above each bin edge k, for k = 0..BINS, as float64 numpy."""
    counts = histogram.cpu().numpy()
    return np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])


def scores_at_threshold(
    histograms: VesselHistograms, region: str, threshold: float = 0.5
) -> dict[str, float]:
    """Precision, recall, F1 (Dice), IoU, specificity, accuracy and Matthews correlation
    of the vessels at ``threshold``, and the threshold-free areas under the ROC curve
    (``auc``) and under the precision-recall curve (``auc_pr``, average precision)."""
    vessel_at_or_above = _cumulative_from_top(histograms.vessel[region])
    background_at_or_above = _cumulative_from_top(histograms.background[region])
    edge = _edge_of(threshold)
    tp = vessel_at_or_above[edge]
    fp = background_at_or_above[edge]
    fn = vessel_at_or_above[0] - tp
    tn = background_at_or_above[0] - fp
    return {
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "mcc": _ratio(tp * tn - fp * fn, math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))),
        "auc": _auc(vessel_at_or_above, background_at_or_above),
        "auc_pr": _average_precision(vessel_at_or_above, background_at_or_above),
    }


def best_f1_threshold(histograms: VesselHistograms, region: str = "fov") -> tuple[float, float]:
    """The bin-edge threshold with the highest F1, and that F1."""
    vessel_at_or_above = _cumulative_from_top(histograms.vessel[region])
    background_at_or_above = _cumulative_from_top(histograms.background[region])
    tp = vessel_at_or_above
    fp = background_at_or_above
    fn = vessel_at_or_above[0] - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    f1[0] = -1.0  # threshold 0 calls every pixel vessel: never a useful choice
    edge = int(np.argmax(f1))
    return _threshold_of(edge), float(f1[edge])


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else 0.0


def _auc(vessel_at_or_above: np.ndarray, background_at_or_above: np.ndarray) -> float:
    """Area under the ROC curve traced by the bin-edge thresholds (trapezoid rule)."""
    positives, negatives = vessel_at_or_above[0], background_at_or_above[0]
    if positives == 0 or negatives == 0:
        return float("nan")
    tpr = vessel_at_or_above[::-1] / positives
    fpr = background_at_or_above[::-1] / negatives
    return float(np.trapezoid(tpr, fpr))


def _average_precision(vessel_at_or_above: np.ndarray, background_at_or_above: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision: the precision at each
    bin-edge threshold weighted by the recall gained there (scikit-learn's definition)."""
    positives = vessel_at_or_above[0]
    if positives == 0:
        return float("nan")
    called = vessel_at_or_above + background_at_or_above
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(called > 0, vessel_at_or_above / called, 1.0)
    recall = vessel_at_or_above / positives
    # From the highest threshold down, recall grows; each step adds its precision.
    gained = recall[:-1] - recall[1:]
    return float(np.sum(gained * precision[:-1]))

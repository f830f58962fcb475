"""Histogram metrics agree with scikit-learn on the same pixels."""

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
)

from retina.metrics import VesselHistograms, best_f1_threshold, scores_at_threshold


@pytest.fixture
def pixels():
    rng = np.random.default_rng(0)
    truth = rng.random((4, 1, 64, 64)) < 0.12
    noisy = np.clip(truth * 0.55 + rng.normal(0.25, 0.2, truth.shape), 0, 0.999)
    fov = np.zeros_like(truth)
    fov[..., 8:56, 8:56] = True
    return truth, noisy.astype(np.float32), fov


@pytest.mark.parametrize("region", ["image", "fov"])
def test_scores_match_scikit_learn(pixels, region):
    truth, probability, fov = pixels
    histograms = VesselHistograms.empty()
    histograms.add(torch.from_numpy(probability), torch.from_numpy(truth), torch.from_numpy(fov))
    inside = fov.ravel() if region == "fov" else np.ones(truth.size, dtype=bool)
    y, p = truth.ravel()[inside], probability.ravel()[inside]
    scores = scores_at_threshold(histograms, region, 0.5)
    assert scores["f1"] == pytest.approx(f1_score(y, p >= 0.5), abs=1e-9)
    assert scores["precision"] == pytest.approx(precision_score(y, p >= 0.5), abs=1e-9)
    assert scores["recall"] == pytest.approx(recall_score(y, p >= 0.5), abs=1e-9)
    assert scores["accuracy"] == pytest.approx(np.mean(y == (p >= 0.5)), abs=1e-9)
    assert scores["auc"] == pytest.approx(roc_auc_score(y, p), abs=2e-3)


def test_best_threshold_beats_or_equals_half(pixels):
    truth, probability, fov = pixels
    histograms = VesselHistograms.empty()
    histograms.add(torch.from_numpy(probability), torch.from_numpy(truth), torch.from_numpy(fov))
    threshold, best = best_f1_threshold(histograms, "fov")
    assert 0 < threshold < 1
    assert best >= scores_at_threshold(histograms, "fov", 0.5)["f1"]
    assert best == pytest.approx(scores_at_threshold(histograms, "fov", threshold)["f1"])


def test_auc_stays_exact_when_probabilities_crowd_near_zero():
    """A U-Net trained with a Dice loss gives most pixels, vessels among them, a vessel
    probability below 1e-3; the AUC must still tell those pixels apart."""
    rng = np.random.default_rng(1)
    truth = rng.random((2, 1, 64, 64)) < 0.1
    logits = np.where(truth, rng.normal(-5, 3, truth.shape), rng.normal(-11, 3, truth.shape))
    probability = torch.sigmoid(torch.from_numpy(logits)).float()
    fov = torch.ones(truth.shape, dtype=torch.bool)
    histograms = VesselHistograms.empty()
    histograms.add(probability, torch.from_numpy(truth), fov)
    expected = roc_auc_score(truth.ravel(), probability.numpy().ravel())
    assert scores_at_threshold(histograms, "fov")["auc"] == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_matthews_correlation_and_average_precision_match_scikit_learn(pixels, threshold):
    truth, probability, fov = pixels
    histograms = VesselHistograms.empty()
    histograms.add(torch.from_numpy(probability), torch.from_numpy(truth), torch.from_numpy(fov))
    inside = fov.ravel()
    y, p = truth.ravel()[inside], probability.ravel()[inside]
    scores = scores_at_threshold(histograms, "fov", threshold)
    # The threshold snaps to a bin edge within 0.25% in probability.
    assert scores["mcc"] == pytest.approx(matthews_corrcoef(y, p >= threshold), abs=5e-3)
    assert scores["auc_pr"] == pytest.approx(average_precision_score(y, p), abs=2e-3)


def test_histograms_of_photos_merge_into_those_of_the_whole_set(pixels):
    truth, probability, fov = pixels
    whole, merged = VesselHistograms.empty(), VesselHistograms.empty()
    whole.add(torch.from_numpy(probability), torch.from_numpy(truth), torch.from_numpy(fov))
    for index in range(truth.shape[0]):
        photo = VesselHistograms.empty()
        part = slice(index, index + 1)
        photo.add(
            torch.from_numpy(probability[part]),
            torch.from_numpy(truth[part]),
            torch.from_numpy(fov[part]),
        )
        merged.merge(photo)
    assert scores_at_threshold(merged, "fov") == scores_at_threshold(whole, "fov")

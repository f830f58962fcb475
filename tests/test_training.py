"""Both final-training strategies and divergence, on real HRF photos at 64x64."""

import pytest
import torch

from retina.config import TrialSettings
from retina.data.dataset import load_dataset
from retina.training import DivergedError, run_final_training, run_phase_one, split_tensors

SMALL = dict(resolution=64, channels=(8, 16, 32), residual_units=1, epochs=3, patience=0)


@pytest.fixture(scope="module")
def hrf_64(hrf_dir):
    return load_dataset(hrf_dir, 64)


def _phase_one(settings, dataset):
    train, val = split_tensors(dataset, settings, torch.device("cpu"))
    epochs = []
    progress = run_phase_one(
        settings, train, val, torch.device("cpu"), lambda m, p, r: epochs.append(m)
    )
    return train, val, progress, epochs


def test_phase_one_keeps_the_best_epoch_by_validation_f1(hrf_64):
    settings = TrialSettings(**SMALL, learning_rate=0.01)
    _, _, progress, epochs = _phase_one(settings, hrf_64)
    assert len(epochs) == 3
    assert progress.best_f1 == max(m["val_f1"] for m in epochs)
    assert epochs[progress.best_epoch - 1]["val_f1"] == progress.best_f1
    assert progress.best_weights is not None


@pytest.mark.parametrize("strategy", ["retrain", "finetune", "none"])
def test_final_strategies_produce_a_model(hrf_64, strategy):
    settings = TrialSettings(**SMALL, learning_rate=0.01, strategy=strategy, finetune_epochs=2)
    train, val, progress, _ = _phase_one(settings, hrf_64)
    seen = []
    model = run_final_training(
        settings, train, val, torch.device("cpu"), progress, lambda e, loss: seen.append(e)
    )
    expected_epochs = {"retrain": progress.best_epoch, "finetune": 2, "none": 0}[strategy]
    assert len(seen) == expected_epochs
    phase_one = {k: v for k, v in progress.best_weights.items()}
    changed = any(not torch.equal(v, phase_one[k]) for k, v in model.state_dict().items())
    assert changed == (strategy != "none")


def test_a_learning_rate_far_too_high_diverges(hrf_64):
    settings = TrialSettings(**SMALL, optimizer="sgd", learning_rate=10.0, lr_schedule="constant")
    with pytest.raises(DivergedError, match="loss became"):
        _phase_one(settings, hrf_64)

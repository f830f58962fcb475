"""Both final-training strategies and divergence, on real HRF photos at 64x64."""

import copy

import pytest
import torch

from retina.config import TrialSettings
from retina.data.dataset import load_dataset
from retina.model import build_lr_schedule, build_optimizer, build_plateau_schedule
from retina.training import (
    BatchAugmenter,
    DivergedError,
    ResumePoint,
    TrainingRun,
    predict_probabilities,
    random_patches,
    run_final_training,
    run_phase_one,
    split_tensors,
)

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
        settings, train, val, torch.device("cpu"), progress, lambda e, loss, run: seen.append(e)
    )
    expected_epochs = {"retrain": progress.best_epoch, "finetune": 2, "none": 0}[strategy]
    assert len(seen) == expected_epochs
    phase_one = {k: v for k, v in progress.best_weights.items()}
    changed = any(not torch.equal(v, phase_one[k]) for k, v in model.state_dict().items())
    assert changed == (strategy != "none")


def test_final_training_resumed_after_an_epoch_ends_where_an_unbroken_one_does(hrf_64):
    settings = TrialSettings(**SMALL, learning_rate=0.01, strategy="finetune", finetune_epochs=4)
    train, val, progress, _ = _phase_one(settings, hrf_64)
    saved = {}

    def keep_second_epoch(epoch, loss, run):
        if epoch == 2:
            saved["state"] = copy.deepcopy(run.state())

    cpu = torch.device("cpu")
    unbroken = run_final_training(settings, train, val, cpu, progress, keep_second_epoch)
    resumed_epochs = []
    resumed = run_final_training(
        settings,
        train,
        val,
        cpu,
        progress,
        lambda e, loss, run: resumed_epochs.append(e),
        resume_from=ResumePoint(progress, phase_two_epochs=2, phase_two_run=saved["state"]),
    )
    assert resumed_epochs == [3, 4]
    for key, value in unbroken.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)


def test_a_learning_rate_far_too_high_diverges(hrf_64):
    settings = TrialSettings(**SMALL, optimizer="sgd", learning_rate=10.0, lr_schedule="constant")
    with pytest.raises(DivergedError, match="loss became"):
        _phase_one(settings, hrf_64)


@pytest.mark.parametrize("loss", ["dice_ce", "dice", "bce", "dice_focal", "tversky"])
def test_every_loss_trains_to_a_finite_value(hrf_64, loss):
    settings = TrialSettings(**{**SMALL, "epochs": 1}, loss=loss)
    _, _, _, epochs = _phase_one(settings, hrf_64)
    assert torch.isfinite(torch.tensor(epochs[0]["train_loss"]))


def test_cosine_warmup_rises_then_falls():
    settings = TrialSettings(lr_schedule="cosine_warmup", learning_rate=0.1)
    optimizer = build_optimizer(settings, [torch.nn.Parameter(torch.zeros(1))])
    schedule = build_lr_schedule(settings, optimizer, epochs=10, steps_per_epoch=10)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    peak = rates.index(max(rates))
    assert 5 <= peak <= 12 and rates[0] < rates[peak] and rates[-1] < 0.01


def test_plateau_halves_the_rate_after_five_stalled_epochs():
    settings = TrialSettings(lr_schedule="plateau", learning_rate=0.1)
    optimizer = build_optimizer(settings, [torch.nn.Parameter(torch.zeros(1))])
    plateau = build_plateau_schedule(settings, optimizer)
    for _ in range(7):
        plateau.step(0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_rotation_scaling_and_gamma_keep_labels_binary_and_are_seeded(hrf_64):
    settings = TrialSettings(**SMALL, rotation_degrees=15, scaling=0.1, gamma=0.2)
    train, _ = split_tensors(hrf_64, settings, torch.device("cpu"))
    first = BatchAugmenter(settings, seed=3)(train.photos[:4], train.vessels[:4])
    again = BatchAugmenter(settings, seed=3)(train.photos[:4], train.vessels[:4])
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert set(first[1].unique().tolist()) <= {0.0, 1.0}
    assert first[0].min() >= 0 and first[0].max() <= 1
    assert not torch.equal(first[0], train.photos[:4])


def test_patches_crop_photo_and_label_alike_and_set_the_steps_per_epoch(hrf_64):
    settings = TrialSettings(**SMALL, patch_size=32, patches_per_photo=3, batch_size=2)
    train, _ = split_tensors(hrf_64, settings, torch.device("cpu"))
    photos, vessels = random_patches(
        train.photos[:4], train.vessels[:4], 32, torch.Generator().manual_seed(0)
    )
    assert photos.shape == (4, 3, 32, 32) and vessels.shape == (4, 1, 32, 32)
    for photo, label, whole_photo, whole_label in zip(
        photos, vessels, train.photos[:4], train.vessels[:4], strict=True
    ):
        # Find where the crop came from in the photo; the label must come from there too.
        windows = whole_photo.unfold(1, 32, 1).unfold(2, 32, 1)  # (C, 33, 33, 32, 32)
        match = (windows == photo[:, None, None]).all(dim=(0, 3, 4)).nonzero()
        top, left = match[0].tolist()
        assert torch.equal(label, whole_label[:, top : top + 32, left : left + 32])
    run = TrainingRun.start(settings, torch.device("cpu"), 1, len(train))
    # 30 photos x 3 patches in batches of 2: 45 steps of the one-cycle schedule.
    assert run.lr_schedule.total_steps == 45


def test_a_model_trained_on_patches_predicts_whole_photos_with_sliding_windows(hrf_64):
    settings = TrialSettings(**SMALL, patch_size=32)
    train, val, progress, epochs = _phase_one(settings, hrf_64)
    assert len(epochs) == 3 and 0 <= progress.best_f1 <= 1
    model = run_final_training(settings.model_copy(update={"strategy": "none"}), train, val,
                               torch.device("cpu"), progress)  # fmt: skip
    probabilities = predict_probabilities(model, val.photos, settings)
    assert probabilities.shape == val.vessels.shape
    assert probabilities.min() >= 0 and probabilities.max() <= 1


def test_flip_averaging_gives_the_same_answer_for_a_flipped_photo(hrf_64):
    """The mean over the photo and its flips cannot depend on which flip it was given."""
    settings = TrialSettings(**SMALL, test_time_flips=True)
    model = TrainingRun.start(settings, torch.device("cpu"), 1, 1).model
    photos = split_tensors(hrf_64, settings, torch.device("cpu"))[1].photos[:2]
    averaged = predict_probabilities(model, photos, settings)
    of_flipped = predict_probabilities(model, photos.flip(-1), settings)
    assert torch.allclose(of_flipped.flip(-1), averaged, atol=1e-6)
    plain = predict_probabilities(model, photos, settings, test_time_flips=False)
    assert not torch.allclose(plain, averaged, atol=1e-6)


@pytest.mark.parametrize("preprocessing", ["green", "green_clahe"])
def test_green_channel_preprocessing_feeds_a_one_channel_unet(hrf_64, preprocessing):
    settings = TrialSettings(**SMALL, preprocessing=preprocessing)
    train, val, progress, _ = _phase_one(settings, hrf_64)
    assert train.photos.shape[1] == 1 and val.photos.shape[1] == 1
    rgb = TrialSettings(**SMALL)
    green = split_tensors(hrf_64, rgb, torch.device("cpu"))[0].photos[:, 1:2]
    if preprocessing == "green":
        assert torch.equal(train.photos, green)
    else:
        # CLAHE spreads the green channel's values within each photo's field of view.
        inside = train.fields_of_view
        assert train.photos[inside].std() > green[inside].std()
    assert progress.best_weights is not None

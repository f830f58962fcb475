"""Sweep files: shipped ones validate, bad ones give one line naming file and key."""

from pathlib import Path

import pytest

from retina.config import TrialSettings, load_sweep_file
from retina.errors import SweepFileError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "trials"),
    [
        ("quick.yaml", 8),
        ("hrf.yaml", 126),
        ("hrf-cpu.yaml", 3),
        ("hrf-cpu-clahe.yaml", 3),
        ("hrf-cpu-retrain.yaml", 3),
        ("hrf-cpu-wide.yaml", 3),
        ("benchmark.yaml", 2),
    ],
)
def test_shipped_sweep_files_are_valid(name, trials):
    spec = load_sweep_file(REPO / "sweeps" / name)
    assert spec.grid_size() == trials


def test_benchmark_declares_the_15_30_protocol_by_photo_name():
    spec = load_sweep_file(REPO / "sweeps" / "benchmark.yaml")
    settings = TrialSettings.model_validate(spec.fixed)
    training = settings.train_photos + settings.val_photos
    assert len(training) == 15 and len(settings.test_photos) == 30
    for category in ("dr", "g", "h"):
        assert sorted(n for n in training if n.endswith(f"_{category}")) == [
            f"{number:02d}_{category}" for number in range(1, 6)
        ]


def test_quick_sweep_has_at_least_8_trials_and_both_strategies():
    spec = load_sweep_file(REPO / "sweeps" / "quick.yaml")
    assert spec.grid_size() >= 8
    assert set(spec.search["strategy"]) == {"retrain", "finetune"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fixed: [unclosed", "not valid YAML"),
        ("- a list", "expected a mapping"),
        ("search: {optimizer: [adam]}\nbogus: 1", "bogus: Extra inputs are not permitted"),
        ("search: {optimiser: [adam]}", "search.optimiser: unknown setting"),
        ("search: {optimizer: [adam, adamz]}", "search.optimizer[1]: optimizer: got 'adamz'"),
        ("search: {strategy: [distill]}", "search.strategy[0]: strategy: got 'distill'"),
        ("search: {learning_rate: [0.0]}", "search.learning_rate[0]: learning_rate"),
        ("search: {learning_rate: {loguniform: [0.1, 0.01]}}", "lower bound must be below"),
        ("search: {batch_size: [two]}", "search.batch_size[0]: batch_size"),
        ("fixed: {train_fraction: 0.9, val_fraction: 0.2}\nsearch: {seed: [0]}", "below 1"),
        ("fixed: {epochs: 3}", "empty search space"),
        ("search: {optimizer: []}", "search.optimizer: empty list"),
        ("search: {resolution: [256, 512]}", "resolution must be fixed"),
        (
            "fixed: {train_photos: [a], val_photos: [b]}\nsearch: {seed: [0]}",
            "fixed: test_photos is empty",
        ),
        (
            "fixed: {train_photos: [a, b], val_photos: [b], test_photos: [c]}\nsearch: {seed: [0]}",
            "photo 'b' is in both train_photos and val_photos",
        ),
        (
            "fixed: {resolution: 64, channels: [8, 16], patch_size: 128}\nsearch: {seed: [0]}",
            "patch_size 128 is larger than resolution 64",
        ),
        ("search: {preprocessing: [rgb, sepia]}", "search.preprocessing[1]: preprocessing"),
        (
            "fixed: {train_photos: [a], val_photos: [b], test_photos: [c]}\n"
            "search: {split_seed: [0, 1]}",
            "search.split_seed: the fixed split",
        ),
        ("search: {test_photos: [[a], [b]]}", "search.test_photos: a fixed split is declared"),
    ],
)
def test_bad_sweep_files_give_one_line_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SweepFileError) as error:
        load_sweep_file(path)
    assert str(error.value).startswith(str(path))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_settings_survive_a_round_trip_through_mlflow_params():
    settings = TrialSettings(channels=(8, 16, 32), resolution=64, optimizer="nadam")
    assert TrialSettings.from_params(settings.as_params()) == settings
    assert settings.run_name() == "nadam-lr1e-03-split0-retrain"


def test_a_fixed_split_survives_a_round_trip_through_mlflow_params():
    settings = TrialSettings(
        channels=(8, 16, 32),
        resolution=64,
        train_photos=("01_dr", "01_g"),
        val_photos=("02_h",),
        test_photos=("03_dr", "03_g", "03_h"),
        preprocessing="green_clahe",
        patch_size=32,
        test_time_flips=True,
        seed=2,
    )
    assert TrialSettings.from_params(settings.as_params()) == settings
    assert settings.run_name() == "adamw-lr1e-03-fixedsplit-retrain-seed2"


def test_runs_that_differ_in_split_weight_seed_or_strategy_share_a_configuration():
    base = TrialSettings(resolution=64, channels=(8, 16, 32))
    for change in ({"split_seed": 2}, {"seed": 1}, {"strategy": "finetune"}):
        assert base.model_copy(update=change).configuration_key == base.configuration_key
    for change in ({"preprocessing": "green"}, {"patch_size": 32}, {"test_time_flips": True}):
        assert base.model_copy(update=change).configuration_key != base.configuration_key

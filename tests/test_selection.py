"""Configurations are ranked from validation results, with the spread that applies."""

import statistics

import pytest

from retina.config import TrialSettings
from retina.selection import TrialRecord, choose_configuration, rank_configurations

FIXED_SPLIT = dict(train_photos=("01_h", "02_h"), val_photos=("03_h",), test_photos=("04_h",))


def _run(val_f1: float, **settings) -> TrialRecord:
    trial = TrialSettings(**settings)
    return TrialRecord(
        run_id=f"run-{trial.run_name()}",
        name=trial.run_name(),
        settings=trial,
        outcome="finished",
        metrics={"best_val_f1": val_f1},
        parent_run_id=None,
    )


def test_split_seeds_are_averaged_one_vote_each_and_spread_over():
    runs = [
        _run(0.80, split_seed=0, seed=0),
        _run(0.70, split_seed=0, seed=1),
        _run(0.90, split_seed=1),
        _run(0.60, split_seed=0, learning_rate=0.1),
        _run(0.60, split_seed=1, learning_rate=0.1),
    ]
    best, other = rank_configurations(runs, "best_val_f1")
    assert best.mean == pytest.approx(statistics.fmean([0.75, 0.90]))
    assert best.std == pytest.approx(statistics.stdev([0.75, 0.90]))
    assert best.std_over == "split seeds" and best.split_seeds == [0, 1]
    assert other.settings.learning_rate == 0.1
    assert choose_configuration([best, other]) is best


def test_on_a_fixed_split_the_spread_is_over_weight_seeds():
    runs = [_run(f1, **FIXED_SPLIT, seed=seed) for seed, f1 in enumerate((0.80, 0.78, 0.83))]
    (score,) = rank_configurations(runs, "best_val_f1")
    assert score.mean == pytest.approx(0.80333, abs=1e-4)
    assert score.std == pytest.approx(statistics.stdev([0.80, 0.78, 0.83]))
    assert score.std_over == "weight seeds"


def test_one_run_has_no_spread_and_strategies_of_one_seed_count_once():
    runs = [_run(0.80, split_seed=3, strategy=strategy) for strategy in ("none", "finetune")]
    (score,) = rank_configurations(runs, "best_val_f1")
    assert score.mean == pytest.approx(0.80)
    assert score.std == 0.0 and score.std_over is None

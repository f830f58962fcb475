"""What the sweep's log says about running trials, in both training phases."""

import logging
from types import SimpleNamespace

from retina.config import TrialSettings
from retina.sweep.monitor import SweepProgress


def test_the_log_follows_a_trial_from_phase_one_into_its_retraining(caplog):
    settings = TrialSettings(strategy="retrain", split_seed=1)
    trial = SimpleNamespace(trial_id="t1", config=settings.model_dump())
    progress = SweepProgress(console=None, log_every_seconds=0)
    caplog.set_level(logging.INFO, logger="retina.sweep.monitor")

    progress.on_trial_start(0, [], trial)
    progress.on_trial_result(0, [], trial, {"epoch": 2, "val_f1": 0.5, "best_val_f1": 0.5})
    assert f"{settings.run_name()} epoch 2 val F1 0.500" in caplog.text

    result = {"final_epoch": 5, "final_epochs": 120, "val_f1": 0.5, "best_val_f1": 0.5}
    progress.on_trial_result(0, [], trial, result)
    assert f"{settings.run_name()} retrain 5/120" in caplog.text
    assert progress.rows["t1"].state == "retrain 5/120"

    progress.on_trial_result(0, [], trial, {"outcome": "finished", "val_f1": 0.5})
    progress.on_trial_complete(0, [], trial)
    assert progress.rows["t1"].state == "finished"

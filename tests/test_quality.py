"""Segmentation quality measured the way the field measures it, through the real CLI.

A fixed split named photo by photo (the 15/30 HRF protocol), patches with sliding-window
inference, CLAHE on the green channel and flip averaging, two weight seeds; then
`retina best --evaluate --ensemble 2`: scores at the validation threshold, per photo,
at native resolution, Matthews correlation, AUC-PR, and the ensemble on the parent run.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_retina
from mlflow.tracking import MlflowClient

from retina.tracking import TAG_ROLE

TRAIN = [f"{n:02d}_{c}" for n in range(1, 5) for c in ("dr", "g", "h")]
VAL = [f"05_{c}" for c in ("dr", "g", "h")]
TEST = [f"{n:02d}_{c}" for n in range(6, 16) for c in ("dr", "g", "h")]

FIXED_SPLIT_SWEEP = f"""\
fixed:
  resolution: 64
  channels: [8, 16, 32]
  residual_units: 1
  batch_size: 4
  epochs: 3
  patience: 0
  learning_rate: 0.01
  patch_size: 32
  patches_per_photo: 2
  preprocessing: green_clahe
  test_time_flips: true
  strategy: none
  train_photos: [{", ".join(TRAIN)}]
  val_photos: [{", ".join(VAL)}]
  test_photos: [{", ".join(TEST)}]
search:
  seed: [0, 1]
scheduler:
  name: none
resources:
  max_concurrent: 2
  cpus_per_trial: 1
"""


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, hrf_dir, session_cache):
    work = tmp_path_factory.mktemp("quality")
    uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    env = {**os.environ, "RETINA_CACHE_DIR": str(session_cache), "MLFLOW_TRACKING_URI": uri}
    (work / "fixed.yaml").write_text(FIXED_SPLIT_SWEEP)
    sweep = run_retina(
        "sweep", "fixed.yaml", "--data-dir", str(hrf_dir), "--storage", str(work / "ray"),
        cwd=work, env=env,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    best = run_retina("best", "--evaluate", "--ensemble", "2", cwd=work, env=env)
    assert best.returncode == 0, best.stderr[-3000:]
    return MlflowClient(uri), best.stdout, work


def _runs(client: MlflowClient, role: str):
    experiment = client.get_experiment_by_name("fixed")
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = '{role}'"
    )


def test_the_named_test_photos_are_scored_at_both_resolutions_and_per_photo(evaluated):
    client, output, work = evaluated
    evaluated_runs = [r for r in _runs(client, "trial") if "test_f1" in r.data.metrics]
    assert evaluated_runs, "no trial run was evaluated"
    for run in evaluated_runs:
        metrics = run.data.metrics
        report = json.loads(
            Path(
                client.download_artifacts(run.info.run_id, "test_report.json", str(work))
            ).read_text()
        )
        assert report["test_photos"] == TEST
        per_photo = [report["photo_scores"][name]["f1"] for name in TEST]
        assert metrics["test_photo_f1_mean"] == pytest.approx(np.mean(per_photo))
        assert metrics["test_photo_f1_std"] == pytest.approx(np.std(per_photo, ddof=1))
        native = [report["photo_scores"][name]["native_f1"] for name in TEST]
        assert metrics["test_native_photo_f1_mean"] == pytest.approx(np.mean(native))
        for key in ("test_native_f1_at_val_threshold", "test_auc_pr", "test_native_auc_pr"):
            assert 0 <= metrics[key] <= 1
        assert -1 <= metrics["test_mcc_at_val_threshold"] <= 1
        assert metrics["test_threshold"] == pytest.approx(metrics["best_val_threshold"])
        assert metrics["test_time_flips"] == 1.0
        assert run.data.params["preprocessing"] == "green_clahe"
        assert run.data.params["patch_size"] == "32"
    assert "native F1" in output and "AUC-PR" in output and "MCC" in output


def test_the_ensemble_of_both_seeds_is_scored_and_logged_to_the_sweep_run(evaluated):
    client, output, work = evaluated
    trials = {run.info.run_id: run for run in _runs(client, "trial")}
    (sweep,) = _runs(client, "sweep")
    assert "ensemble of 2" in output
    report = json.loads(
        Path(
            client.download_artifacts(sweep.info.run_id, "ensemble_report.json", str(work))
        ).read_text()
    )
    assert {member["run_id"] for member in report["members"]} == set(trials)
    assert report["test_photos"] == TEST
    thresholds = [run.data.metrics["best_val_threshold"] for run in trials.values()]
    assert report["threshold"] == pytest.approx(np.mean(thresholds))
    logged = sweep.data.metrics
    assert logged["ensemble_test_f1_at_val_threshold"] == pytest.approx(
        report["metrics"]["test_f1_at_val_threshold"]
    )
    assert 0 <= logged["ensemble_test_native_f1_at_val_threshold"] <= 1


def test_evaluating_again_without_native_scores_leaves_no_stale_native_score(evaluated):
    client, _, work = evaluated
    uri = client.tracking_uri
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    again = run_retina("best", "--evaluate", "--no-native", "--no-tta", "--json", cwd=work, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    for run in _runs(client, "trial"):
        metrics = run.data.metrics
        if "test_f1" in metrics:
            assert metrics["test_time_flips"] == 0.0
            assert np.isnan(metrics["test_native_f1_at_val_threshold"])

"""The main job end to end: `retina sweep` through Ray Tune into a real MLflow store,
then `retina best --evaluate`, run as a user runs them, on real HRF photos."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from retina.config import TrialSettings
from retina.data.dataset import load_dataset
from retina.data.splits import split_photos

TINY = Path(__file__).parent / "sweeps" / "tiny.yaml"


def retina(
    *args: str, cwd: Path, env: dict | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "retina.cli", *args]
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, env=environment, timeout=timeout
    )


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, hrf_dir):
    """One real sweep of 4 trials and its evaluation, shared by the assertions below."""
    work = tmp_path_factory.mktemp("work")
    env = {"RETINA_CACHE_DIR": str(work / "cache")}
    sweep = retina(
        "sweep", str(TINY), "--data-dir", str(hrf_dir), "--storage", str(work / "ray"),
        cwd=work, env=env,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    best = retina("best", "--evaluate", "--json", cwd=work, env=env)
    assert best.returncode == 0, best.stderr[-3000:]
    uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    return work, MlflowClient(uri), json.loads(best.stdout), sweep


def _runs(client):
    experiment = client.get_experiment_by_name("tiny")
    return client.search_runs([experiment.experiment_id])


def test_store_holds_one_parent_and_one_finished_child_per_trial(finished_sweep):
    _, client, _, _ = finished_sweep
    runs = _runs(client)
    parents = [r for r in runs if r.data.tags.get("retina.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("retina.role") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parents[0].data.params["data_layout"] == "hrf"
    assert len(parents[0].data.params["data_fingerprint"]) == 16
    assert [a.path for a in client.list_artifacts(parents[0].info.run_id)] == ["tiny.yaml"]
    names = sorted(r.info.run_name for r in children)
    assert names[0] == "adamw-lr1e-02-split0-finetune"


def test_each_trial_has_all_params_epoch_curves_summaries_figures_and_model(finished_sweep):
    _, client, _, _ = finished_sweep
    for run in _runs(client):
        if run.data.tags.get("retina.role") != "trial":
            continue
        assert set(TrialSettings.model_fields) <= set(run.data.params)
        for key in ("train_loss", "val_loss", "val_f1", "val_precision", "val_recall",
                    "val_accuracy", "val_auc", "learning_rate", "val_f1_image"):  # fmt: skip
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == [1, 2, 3], key
        for key in ("best_val_f1", "best_epoch", "best_val_threshold"):
            assert key in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"learning_curves.png", "val_predictions.png", "test_report.txt"} <= artifacts
        assert run.data.tags["retina.outcome"] == "finished"


def test_best_evaluates_every_strategy_of_the_chosen_configuration(finished_sweep):
    _, _, report, _ = finished_sweep
    assert report["experiment"] == "tiny"
    assert report["configuration"]["optimizer"] == "adamw"
    strategies = {run["strategy"] for run in report["runs"]}
    assert strategies == {"retrain", "finetune"} == set(report["strategies"])
    assert all("test" in run for run in report["runs"])
    assert all(0 <= run["test"]["test_f1"] <= 1 for run in report["runs"])


def test_report_supports_add_up_to_the_test_pixels(finished_sweep, hrf_dir):
    _, _, report, _ = finished_sweep
    dataset = load_dataset(hrf_dir, 64)
    for run in report["runs"]:
        settings = TrialSettings(**report["configuration"], split_seed=run["split_seed"])
        test = split_photos(dataset.names, settings.split_seed, categories=dataset.categories).test
        assert sorted(run["test_photos"]) == sorted(test)
        indices = dataset.index_of(test)
        image = run["report"]["image"]
        assert image["0"]["support"] + image["1"]["support"] == len(test) * 64 * 64
        assert image["1"]["support"] == dataset.vessels[indices].sum()
        fov = run["report"]["fov"]
        assert fov["0"]["support"] + fov["1"]["support"] == dataset.fields_of_view[indices].sum()


def test_test_photos_were_never_read_by_a_trial(finished_sweep):
    """Validation and test photos of a split never overlap; choice uses best_val_* only."""
    _, client, report, _ = finished_sweep
    for run in report["runs"]:
        logged = client.get_run(run["run_id"]).data
        assert logged.tags.get("retina.evaluated") == "true"
        assert "best_val_f1" in logged.metrics


def test_a_second_sweep_of_the_same_name_hints_at_resume(finished_sweep, hrf_dir):
    work, _, _, _ = finished_sweep
    again = retina(
        "sweep", str(TINY), "--data-dir", str(hrf_dir), "--storage", str(work / "ray"), cwd=work
    )
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--resume" in again.stderr
    assert "Traceback" not in again.stderr


def test_unreachable_tracking_server_is_refused_before_any_trial(tmp_path, hrf_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = retina(
        "sweep", str(TINY), "--data-dir", str(hrf_dir), "--storage", str(tmp_path / "ray"),
        "--tracking-uri", f"http://127.0.0.1:{port}",
        cwd=tmp_path, timeout=90,  # MLflow's client alone would retry for minutes
    )  # fmt: skip
    assert result.returncode == 2
    assert f"tracking store http://127.0.0.1:{port} is unreachable" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ray").exists()


def test_best_on_a_missing_experiment_is_a_one_line_error(tmp_path):
    result = retina("best", "--experiment", "nope", cwd=tmp_path)
    assert result.returncode == 2
    assert "no experiment named 'nope'" in result.stderr


def test_ui_serves_the_store_on_localhost(finished_sweep):
    work, _, _, _ = finished_sweep
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "retina.cli", "ui", "--port", str(port)]
    server = subprocess.Popen(command, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "retina ui did not answer in 90 s"
                time.sleep(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["experiment"]["name"] == "tiny"
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert np.isfinite(port)

"""Several workers per trial (PyTorch DDP on gloo): one run, whole-split validation."""

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from retina.config import TrialSettings
from retina.data.dataset import load_dataset
from retina.model import build_loss
from retina.training import DataParallel, evaluate, split_tensors, validation_metrics

SWEEP = Path(__file__).parent / "sweeps" / "two_workers.yaml"


@pytest.mark.parametrize("photos", [7, 30, 37])
def test_shards_are_equal_and_cover_every_photo(photos):
    order = torch.randperm(photos)
    shards = [DataParallel(rank, 2).shard(order) for rank in range(2)]
    assert len(shards[0]) == len(shards[1])
    assert set(torch.cat(shards).tolist()) == set(range(photos))


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, hrf_dir):
    """The same one-trial sweep with one worker and with two."""
    work = tmp_path_factory.mktemp("ddp")
    for workers in (1, 2):
        result = subprocess.run(
            [sys.executable, "-m", "retina.cli", "sweep", str(SWEEP),
             "--data-dir", str(hrf_dir), "--storage", str(work / "ray"),
             "--experiment", f"workers-{workers}", "--workers-per-trial", str(workers)],
            cwd=work, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(uri)

    def trial_runs(experiment: str):
        found = client.get_experiment_by_name(experiment)
        return client.search_runs(
            [found.experiment_id], filter_string="tags.`retina.role` = 'trial'"
        )

    return uri, client, trial_runs("workers-1"), trial_runs("workers-2")


def test_two_workers_make_one_run_like_one_worker(sweeps):
    _, client, single, double = sweeps
    assert len(single) == 1 and len(double) == 1
    one, two = single[0], double[0]
    assert two.info.status == "FINISHED"
    assert set(one.data.params) == set(two.data.params)
    assert set(one.data.metrics) == set(two.data.metrics)
    artifacts = [{a.path for a in client.list_artifacts(r.info.run_id)} for r in (one, two)]
    assert artifacts[0] == artifacts[1]
    assert len(client.get_metric_history(two.info.run_id, "val_f1")) == 2


def test_logged_validation_f1_is_that_of_the_whole_split(sweeps, hrf_dir):
    uri, _, _, double = sweeps
    run = double[0]
    settings = TrialSettings.from_params(run.data.params)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model", map_location="cpu")
    _, val = split_tensors(load_dataset(hrf_dir, 64), settings, torch.device("cpu"))
    scores = validation_metrics(evaluate(model, val, build_loss(settings), settings))
    assert scores["val_f1"] == pytest.approx(run.data.metrics["best_val_f1"], abs=1e-6)

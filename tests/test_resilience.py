"""Nothing lost: interrupted sweeps resume into the same runs; failing trials are contained."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

SWEEPS = Path(__file__).parent / "sweeps"


def _sweep_command(sweep: str, hrf_dir: Path, work: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "retina.cli", "sweep", str(SWEEPS / sweep),
        "--data-dir", str(hrf_dir), "--storage", str(work / "ray"), *extra,
    ]  # fmt: skip


def _start_sweep(sweep: str, hrf_dir: Path, work: Path) -> subprocess.Popen:
    """A sweep's driver running in the background, as a user's terminal would run it."""
    return subprocess.Popen(
        _sweep_command(sweep, hrf_dir, work),
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _trial_runs(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], filter_string="tags.`retina.role` = 'trial'")


def _wait_until(condition, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the sweep did not get there in time"
        time.sleep(0.5)


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_interrupted_sweep_resumes_into_one_run_per_trial(tmp_path, hrf_dir, stop_signal):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    driver = _start_sweep("resumable.yaml", hrf_dir, tmp_path)

    def one_finished_and_one_under_way() -> bool:
        runs = _trial_runs(client, "resumable")
        finished = [r for r in runs if r.data.tags.get("retina.outcome") == "finished"]
        started = [r for r in runs if r.info.status == "RUNNING" and "val_f1" in r.data.metrics]
        return bool(finished) and bool(started)

    _wait_until(one_finished_and_one_under_way, 240, driver)
    finished_before = [
        r
        for r in _trial_runs(client, "resumable")
        if r.data.tags.get("retina.outcome") == "finished"
    ]
    before = {
        r.info.run_id: (
            r.data.metrics["best_val_f1"],
            len(client.get_metric_history(r.info.run_id, "val_f1")),
        )
        for r in finished_before
    }
    driver.send_signal(stop_signal)
    _, stderr = driver.communicate(timeout=120)
    if stop_signal == signal.SIGINT:
        assert driver.returncode == 130, stderr[-3000:]
        assert "--resume" in stderr
        assert all(r.info.status != "RUNNING" for r in _trial_runs(client, "resumable"))

    resumed = subprocess.run(
        _sweep_command("resumable.yaml", hrf_dir, tmp_path, "--resume"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    runs = _trial_runs(client, "resumable")
    trial_ids = [r.data.tags["retina.trial_id"] for r in runs]
    assert len(runs) == 4 and len(set(trial_ids)) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["retina.outcome"] == "finished" for r in runs)
    # The interrupted runs went on and finished: no reason for a failure stays on them.
    assert all("retina.failure" not in r.data.tags for r in runs)
    for run_id, (best, epochs) in before.items():
        run = client.get_run(run_id)
        assert run.data.metrics["best_val_f1"] == best
        assert len(client.get_metric_history(run_id, "val_f1")) == epochs == 8
    sweeps = client.search_runs(
        [client.get_experiment_by_name("resumable").experiment_id],
        filter_string="tags.`retina.role` = 'sweep'",
    )
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"


def test_diverging_trial_fails_alone_with_its_reason(tmp_path, hrf_dir):
    result = subprocess.run(
        _sweep_command("diverging.yaml", hrf_dir, tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    runs = {r.data.params["learning_rate"]: r for r in _trial_runs(client, "diverging")}
    assert runs["10.0"].info.status == "FAILED"
    assert "loss became" in runs["10.0"].data.tags["retina.failure"]
    assert runs["0.01"].info.status == "FINISHED"
    assert runs["0.01"].data.tags["retina.outcome"] == "finished"
    assert "failed" in result.stdout and "finished" in result.stdout


def test_crashed_trial_is_retried_from_its_checkpoint_in_the_same_run(tmp_path, hrf_dir):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    driver = _start_sweep("retried.yaml", hrf_dir, tmp_path)

    def two_epochs_done() -> bool:
        runs = _trial_runs(client, "retried")
        return bool(runs) and len(client.get_metric_history(runs[0].info.run_id, "val_f1")) >= 2

    _wait_until(two_epochs_done, 240, driver)
    worker = int(_trial_runs(client, "retried")[0].data.tags["retina.pid"])
    os.kill(worker, signal.SIGKILL)  # what the kernel does to a trial out of memory
    _, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr[-3000:]

    runs = _trial_runs(client, "retried")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["retina.outcome"] == "finished"
    assert int(run.data.tags["retina.pid"]) != worker
    history = client.get_metric_history(run.info.run_id, "val_f1")
    assert {m.step for m in history} == set(range(1, 9))
    # Resumed from its last checkpoint: at most the epoch under way when it died runs
    # twice; a restart from scratch would log every epoch before the crash again.
    assert len(history) <= 9


def test_trial_crashed_in_final_training_carries_on_from_its_last_epoch(tmp_path, hrf_dir):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    driver = _start_sweep("retried-final.yaml", hrf_dir, tmp_path)

    def in_final_training() -> bool:
        runs = _trial_runs(client, "retried-final")
        return (
            bool(runs)
            and len(client.get_metric_history(runs[0].info.run_id, "final_train_loss")) >= 3
        )

    _wait_until(in_final_training, 240, driver)
    worker = int(_trial_runs(client, "retried-final")[0].data.tags["retina.pid"])
    os.kill(worker, signal.SIGKILL)
    _, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr[-3000:]

    (run,) = _trial_runs(client, "retried-final")
    assert run.data.tags["retina.outcome"] == "finished"
    assert int(run.data.tags["retina.pid"]) != worker
    # Phase 1 was not trained again: its three epochs appear once each.
    assert len(client.get_metric_history(run.info.run_id, "val_f1")) == 3
    final = client.get_metric_history(run.info.run_id, "final_train_loss")
    assert {m.step for m in final} == set(range(1, 41))
    # At most the epoch under way at the crash runs twice; phase 2 from its start would
    # log every epoch before the crash again.
    assert len(final) <= 41

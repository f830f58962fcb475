"""Run the real ``retina sweep`` command and the benchmark's scripts in fresh processes.

Figures 2, 3 and 5 measure `retina` as a user runs it: the command line, Ray Tune, MLflow
logging and per-epoch checkpoints, each in its own process, with the tracking store and
Ray's storage in the benchmark's own folder so that nothing of the user's is touched.
Start-up time and peak memory only mean something for a fresh interpreter.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient

from retina.tracking import TAG_FAILURE, TAG_ROLE

SWEEP_TEMPLATES = Path(__file__).parent / "sweeps"


@dataclass(frozen=True)
class SweepRun:
    """One finished ``retina sweep`` command: its wall time and what MLflow recorded."""

    launched_at: float  # time.time() just before the command started
    wall_seconds: float
    tracking_uri: str
    experiment: str
    storage: Path
    parent: Run
    trials: list[Run]

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def metric_history(self, run: Run, key: str) -> list[Metric]:
        """A trial's metric by step (epoch), with the wall-clock time each was logged."""
        return sorted(self.client().get_metric_history(run.info.run_id, key), key=_step)

    def first_results(self) -> list[dict[str, Any]]:
        """Ray Tune's first result of every trial (``result.json``), with its timings."""
        results = []
        for path in sorted(self.storage.rglob("result.json")):
            first_line = path.read_text().splitlines()[:1]
            if first_line:
                results.append(json.loads(first_line[0]))
        return results


def _step(metric: Metric) -> int:
    return metric.step


def write_sweep_file(
    template: str, destination: Path, fixed: dict[str, Any], search: dict[str, Any] | None = None
) -> Path:
    """Copy a sweep template from ``benchmarks/sweeps`` with some settings replaced."""
    spec = yaml.safe_load((SWEEP_TEMPLATES / template).read_text())
    spec["fixed"].update(fixed)
    if search is not None:
        spec["search"] = search
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(yaml.safe_dump(spec, sort_keys=False))
    return destination


def retina_command() -> list[str]:
    """The installed ``retina`` script beside this interpreter, else its module."""
    script = Path(sys.executable).with_name("retina")
    return [str(script)] if script.exists() else [sys.executable, "-m", "retina.cli"]


def benchmark_environment(cache_dir: Path) -> dict[str, str]:
    """The user's environment with retina's cache set and no Ray cluster to join.

    Ray's token authentication is off: every local runtime of a user shares one token
    file (``~/.ray/auth_token``), and a runtime started or stopped beside ours while
    ours starts can leave our driver and its GCS with different tokens. The runtime
    listens on this machine only either way.
    """
    environment = dict(os.environ)
    environment["RETINA_CACHE_DIR"] = str(cache_dir)
    environment["RAY_AUTH_MODE"] = "disabled"
    environment.pop("RAY_ADDRESS", None)
    environment.pop("MLFLOW_TRACKING_URI", None)
    return environment


class SweepFailed(RuntimeError):
    """The sweep command failed or left a trial unfinished."""


def run_sweep_command(
    sweep_file: Path,
    experiment: str,
    work_dir: Path,
    tracking_uri: str,
    data_dir: Path,
    cache_dir: Path,
    max_concurrent: int,
    cpus_per_trial: int,
    timeout_seconds: float,
    attempts: int = 2,
) -> SweepRun:
    """Run ``retina sweep`` to the end; its console output goes to ``<experiment>.log``.

    On a shared machine another user's ``ray stop --force`` kills every local Ray
    runtime, ours included; a failed sweep is run again, as a new experiment, once.
    """
    for attempt in range(1, attempts + 1):
        name = experiment if attempt == 1 else f"{experiment}-attempt{attempt}"
        try:
            return _run_sweep_once(
                sweep_file,
                name,
                work_dir / name,
                tracking_uri,
                data_dir,
                cache_dir,
                max_concurrent,
                cpus_per_trial,
                timeout_seconds,
            )
        except SweepFailed as failure:
            if attempt == attempts:
                raise
            print(f"    sweep {name} failed, running it again: {failure}", flush=True)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _run_sweep_once(
    sweep_file: Path,
    experiment: str,
    work_dir: Path,
    tracking_uri: str,
    data_dir: Path,
    cache_dir: Path,
    max_concurrent: int,
    cpus_per_trial: int,
    timeout_seconds: float,
) -> SweepRun:
    work_dir.mkdir(parents=True, exist_ok=True)
    storage = work_dir / "ray"
    command = [
        *retina_command(),
        "sweep",
        str(sweep_file),
        "--data-dir",
        str(data_dir),
        "--tracking-uri",
        tracking_uri,
        "--experiment",
        experiment,
        "--storage",
        str(storage),
        "--max-concurrent",
        str(max_concurrent),
        "--cpus-per-trial",
        str(cpus_per_trial),
    ]
    log_file = work_dir / f"{experiment}.log"
    launched_at = time.time()
    started = time.perf_counter()
    with log_file.open("w") as output:
        process = subprocess.Popen(
            command,
            cwd=work_dir,
            env=benchmark_environment(cache_dir),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        returncode = _wait_or_stop(process, timeout_seconds)
    wall = time.perf_counter() - started
    if returncode != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-10:])
        raise SweepFailed(f"retina sweep exited {returncode} after {wall:.0f} s:\n{tail}")

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    parents = [run for run in runs if run.data.tags.get(TAG_ROLE) == "sweep"]
    trials = [run for run in runs if run.data.tags.get(TAG_ROLE) == "trial"]
    unfinished = [
        f"{run.info.run_name} ({run.info.status}: {run.data.tags.get(TAG_FAILURE, '')})"
        for run in trials
        if run.info.status != "FINISHED"
    ]
    if len(parents) != 1 or not trials or unfinished:
        raise SweepFailed(f"sweep {experiment} left trials unfinished: {'; '.join(unfinished)}")
    return SweepRun(launched_at, wall, tracking_uri, experiment, storage, parents[0], trials)


def _wait_or_stop(process: subprocess.Popen, timeout_seconds: float) -> int:
    """Wait for the command; past the timeout stop it as a scheduler would (SIGTERM),
    so that it shuts its Ray runtime down, and kill it if that does not end it."""
    try:
        return process.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return -1


def run_json_script(
    script: str, arguments: list[str], cache_dir: Path, timeout_seconds: float
) -> dict[str, Any]:
    """Run a benchmark script in a fresh interpreter; it prints one JSON object last."""
    command = [sys.executable, str(Path(__file__).with_name(script)), *arguments]
    completed = subprocess.run(
        command,
        env=benchmark_environment(cache_dir),
        capture_output=True,
        text=True,
        timeout=timeout_seconds,
        check=False,
    )
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.splitlines()[-20:])
        raise RuntimeError(f"{script} exited {completed.returncode}:\n{tail}")
    return json.loads(completed.stdout.strip().splitlines()[-1])

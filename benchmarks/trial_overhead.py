"""Figure 2: seconds per epoch and start-up of a `retina sweep` trial against a bare loop.

The trial runs through the real command (Ray Tune, MLflow logging, a checkpoint every
epoch); the bare loop (``bare_loop.py``) trains the same settings with nothing around
it. Both run with the same number of threads, in fresh interpreters, on the same data.
The bare loop runs before and after the sweep and its figures are the mean of the two
runs, so that a change in the machine's load during the benchmark weighs on both sides.
"""

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.processes import SweepRun, run_json_script, run_sweep_command, write_sweep_file
from benchmarks.report import Figure, Quantity
from retina.data.dataset import load_dataset
from retina.tracking import connect


@dataclass(frozen=True)
class TrialTimeline:
    """Wall-clock milestones of the trial, from the sweep command and its MLflow runs."""

    launched_at: float
    parent_run_at: float
    tune_start_at: float
    trial_run_at: float
    first_step_at: float
    epoch_logged_at: list[float]
    epoch_seconds: list[float]
    trial_end_at: float
    command_end_at: float

    @classmethod
    def of(cls, sweep: SweepRun) -> "TrialTimeline":
        trial = sweep.trials[0]
        logged = sweep.metric_history(trial, "epoch_seconds")
        logged_at = [metric.timestamp / 1000 for metric in logged]
        seconds = [metric.value for metric in logged]
        # Tune times a trial from the start of its trainable; the first report follows the
        # first epoch's MLflow metrics by one checkpoint write.
        first_result = sweep.first_results()[0]
        return cls(
            launched_at=sweep.launched_at,
            parent_run_at=sweep.parent.info.start_time / 1000,
            tune_start_at=logged_at[0] - first_result["time_total_s"],
            trial_run_at=trial.info.start_time / 1000,
            first_step_at=logged_at[0] - seconds[0],
            epoch_logged_at=logged_at,
            epoch_seconds=seconds,
            trial_end_at=trial.info.end_time / 1000,
            command_end_at=sweep.launched_at + sweep.wall_seconds,
        )

    @property
    def seconds_per_epoch(self) -> float:
        """Mean spacing of the epochs' metrics after the first: everything an epoch costs."""
        return _mean_spacing(self.epoch_logged_at)


def _mean_spacing(times: list[float]) -> float:
    return (times[-1] - times[0]) / (len(times) - 1)


def measure(
    data_dir: Path,
    cache_dir: Path,
    work_dir: Path,
    resolution: int,
    epochs: int,
    batch_size: int,
    threads: int,
    timeout_seconds: float,
) -> list[Figure]:
    """Run the bare loop, the one-trial sweep, the bare loop again, then the start-up probe."""
    if epochs < 2:
        raise ValueError("figure 2 needs at least 2 epochs: seconds per epoch skip the first")
    work_dir.mkdir(parents=True, exist_ok=True)
    load_dataset(data_dir, resolution, cache_dir=cache_dir)  # the cache is warm for everyone
    sweep_file = write_sweep_file(
        "overhead.yaml",
        work_dir / "overhead.yaml",
        {"resolution": resolution, "epochs": epochs, "batch_size": batch_size},
    )
    tracking_uri = f"sqlite:///{work_dir / 'mlflow' / 'mlflow.db'}"
    started = time.perf_counter()
    connect(tracking_uri)  # a new store builds its schema; users pay that once, not per sweep
    fresh_store = time.perf_counter() - started

    def bare_loop() -> dict[str, Any]:
        arguments = [str(sweep_file), "--data-dir", str(data_dir), "--threads", str(threads)]
        arguments += ["--launched-at", str(time.time())]
        return run_json_script("bare_loop.py", arguments, cache_dir, timeout_seconds)

    bare_runs = [bare_loop()]
    sweep = run_sweep_command(
        sweep_file,
        "overhead",
        work_dir,
        tracking_uri,
        data_dir,
        cache_dir,
        max_concurrent=1,
        cpus_per_trial=threads,
        timeout_seconds=timeout_seconds,
    )
    bare_runs.append(bare_loop())
    probe_arguments = ["--data-dir", str(data_dir), "--resolution", str(resolution)]
    probe_arguments += ["--tracking-uri", tracking_uri, "--ray"]
    probe = run_json_script("startup_probe.py", probe_arguments, cache_dir, timeout_seconds)
    probe["mlflow new store (not in the sweep: created before)"] = fresh_store

    trial = TrialTimeline.of(sweep)
    return [
        _epoch_figure(trial, bare_runs, resolution, batch_size, threads),
        _startup_figure(trial, bare_runs, probe),
    ]


def _epoch_figure(
    trial: TrialTimeline,
    bare_runs: list[dict[str, Any]],
    resolution: int,
    batch_size: int,
    threads: int,
) -> Figure:
    bare_epochs = [_mean_spacing(run["epoch_ends"]) for run in bare_runs]
    bare = statistics.fmean(bare_epochs)
    compute = statistics.fmean(trial.epoch_seconds[1:])
    bookkeeping = trial.seconds_per_epoch - compute
    ratio = trial.seconds_per_epoch / bare
    return Figure(
        key="2a",
        title=f"Trial overhead: s/epoch at {resolution}px, batch {batch_size}, "
        f"{threads} thread(s), epochs 2-{len(trial.epoch_seconds)}",
        a=Quantity("retina sweep trial", trial.seconds_per_epoch, "s/epoch"),
        b=Quantity("plain PyTorch loop", bare, "s/epoch"),
        target="<= 1.05",
        holds=ratio <= 1.05,
        details=[
            "plain loop before / after the sweep: "
            + " / ".join(f"{seconds:.2f} s" for seconds in bare_epochs),
            f"trial: train + validation {compute:.2f} s/epoch (epoch_seconds), MLflow "
            f"metrics + checkpoint + Tune report {bookkeeping:.2f} s/epoch",
        ],
    )


def _startup_figure(
    trial: TrialTimeline, bare_runs: list[dict[str, Any]], probe: dict[str, float]
) -> Figure:
    bare_startup = statistics.fmean(run["first_step_at"] - run["launched_at"] for run in bare_runs)
    bare = bare_runs[-1]
    steps = [
        ("command launch -> sweep's MLflow run (imports, cache, ray.init)", trial.parent_run_at),
        ("-> trial's Tune start (Tune, worker process, its imports)", trial.tune_start_at),
        ("-> trial's MLflow run created", trial.trial_run_at),
        ("-> first training step (params, split, tensors, model)", trial.first_step_at),
    ]
    details = [
        f"trial's start (Tune) -> first step {trial.first_step_at - trial.tune_start_at:.2f} s"
    ]
    previous = trial.launched_at
    for label, moment in steps:
        details.append(f"retina {label}: {moment - previous:.2f} s")
        previous = moment
    details.append(
        f"retina last epoch -> trial's run finished (phase 2: figures, model) "
        f"{trial.trial_end_at - trial.epoch_logged_at[-1]:.2f} s; -> command exit "
        f"{trial.command_end_at - trial.trial_end_at:.2f} s"
    )
    details.append(
        f"plain loop launch -> imports {bare['imported_at'] - bare['launched_at']:.2f} s, "
        f"-> data {bare['data_loaded_at'] - bare['imported_at']:.2f} s, "
        f"-> first step {bare['first_step_at'] - bare['data_loaded_at']:.2f} s"
    )
    details.append(
        "measured alone in a fresh interpreter: "
        + ", ".join(f"{label} {seconds:.2f} s" for label, seconds in probe.items())
    )
    return Figure(
        key="2b",
        title="Trial start-up: launch -> first training step",
        a=Quantity("retina sweep", trial.first_step_at - trial.launched_at, "s"),
        b=Quantity("plain PyTorch loop", bare_startup, "s"),
        details=details,
    )

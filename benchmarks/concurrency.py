"""Figure 3: trials per minute of one sweep run two trials at a time against one at a time.

Both sweeps run the same small trials through ``retina sweep --cpus-per-trial 1``; on a
2-core machine two at a time can at best double the throughput. Throughput counts the
whole command (start-up included, as a user waits for it); the details also give it
over the span from the first trial's start to the last trial's end.
"""

from pathlib import Path

from benchmarks.processes import SweepRun, run_sweep_command, write_sweep_file
from benchmarks.report import Figure, Quantity
from retina.data.dataset import load_dataset
from retina.tracking import connect


def _trials_span_minutes(sweep: SweepRun) -> float:
    first = min(run.info.start_time for run in sweep.trials)
    last = max(run.info.end_time for run in sweep.trials)
    return (last - first) / 60_000


def measure(
    data_dir: Path,
    cache_dir: Path,
    work_dir: Path,
    resolution: int,
    epochs: int,
    trials: int,
    timeout_seconds: float,
) -> Figure:
    """Run the same sweep of ``trials`` trials with --max-concurrent 1, then 2."""
    work_dir.mkdir(parents=True, exist_ok=True)
    load_dataset(data_dir, resolution, cache_dir=cache_dir)
    sweep_file = write_sweep_file(
        "concurrency.yaml",
        work_dir / "concurrency.yaml",
        {"resolution": resolution, "epochs": epochs},
        search={"split_seed": list(range(trials))},
    )
    tracking_uri = f"sqlite:///{work_dir / 'mlflow' / 'mlflow.db'}"
    connect(tracking_uri)

    sweeps = {}
    for concurrent in (1, 2):
        sweeps[concurrent] = run_sweep_command(
            sweep_file,
            f"concurrency-{concurrent}",
            work_dir,
            tracking_uri,
            data_dir,
            cache_dir,
            max_concurrent=concurrent,
            cpus_per_trial=1,
            timeout_seconds=timeout_seconds,
        )
    per_minute = {n: trials / (sweep.wall_seconds / 60) for n, sweep in sweeps.items()}
    span = {n: trials / _trials_span_minutes(sweep) for n, sweep in sweeps.items()}
    return Figure(
        key="3",
        title=f"Concurrency: sweep of {trials} trials at {resolution}px, {epochs} epochs, "
        "1 CPU each",
        a=Quantity("2 at a time", per_minute[2], "trials/min"),
        b=Quantity("1 at a time", per_minute[1], "trials/min"),
        target="- (2 at best)",
        details=[
            "command wall time: "
            + ", ".join(f"{n} at a time {s.wall_seconds:.1f} s" for n, s in sweeps.items()),
            "first trial start -> last trial end: "
            + ", ".join(f"{n} at a time {rate:.2f} trials/min" for n, rate in span.items())
            + f" (ratio {span[2] / span[1]:.3g})",
        ],
    )

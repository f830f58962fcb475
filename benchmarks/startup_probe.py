"""Time, in a fresh interpreter, the pieces a trial pays for before its first step.

Figure 2 splits a trial's start-up into what can be measured on its own: importing the
libraries a trial worker imports, loading the preprocessed photos from the cache,
creating the trial's MLflow run with its params, and starting a local Ray runtime.

    python benchmarks/startup_probe.py --data-dir DIR --resolution R --tracking-uri URI

Prints one JSON object of seconds per piece.
"""

import argparse
import importlib
import json
import time
from pathlib import Path

# Each time is on top of the modules before it; mlflow comes before monai because
# `import monai` imports every submodule, monai.handlers and so mlflow among them.
TRIAL_IMPORTS = ("torch", "mlflow", "monai", "ray.tune", "retina.sweep.trial")


def time_imports() -> dict[str, float]:
    seconds = {}
    for module in TRIAL_IMPORTS:
        started = time.perf_counter()
        importlib.import_module(module)
        seconds[f"import {module}"] = time.perf_counter() - started
    return seconds


def time_tracking(tracking_uri: str, resolution: int) -> dict[str, float]:
    """Connect to an existing store, then create a trial's run with its params as retina does."""
    from retina.config import TrialSettings
    from retina.tracking import TAG_ROLE, RunRecorder, connect, ensure_experiment

    started = time.perf_counter()
    client = connect(tracking_uri)
    experiment_id = ensure_experiment(client, tracking_uri, "startup-probe")
    connected = time.perf_counter()
    run = client.create_run(experiment_id, run_name="probe", tags={TAG_ROLE: "probe"})
    recorder = RunRecorder(client, run.info.run_id)
    recorder.log_params(TrialSettings(resolution=resolution).as_params())
    recorder.finish("finished")
    created = time.perf_counter()
    return {"mlflow connect": connected - started, "mlflow run + params": created - connected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--ray", action="store_true", help="also time ray.init()")
    args = parser.parse_args()

    seconds = time_imports()

    from retina.data.dataset import load_dataset

    started = time.perf_counter()
    load_dataset(args.data_dir, args.resolution)
    seconds["cached dataset load"] = time.perf_counter() - started

    seconds |= time_tracking(args.tracking_uri, args.resolution)

    if args.ray:
        import ray

        started = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False)
        seconds["ray.init (local runtime)"] = time.perf_counter() - started
        ray.shutdown()
    print(json.dumps(seconds))


if __name__ == "__main__":
    main()

"""GPU check, under 5 minutes on a machine with a CUDA device:

    .venv/bin/python benchmarks/gpu.py [--data-dir ../shared/data/hrf]

1. the CUDA tests (tests/test_cuda.py);
2. a short sweep of 4 trials sharing one GPU (gpus_per_trial 0.25);
3. where more than one GPU exists, a sweep whose trial trains on 2 GPUs (DDP, NCCL).

For each sweep it prints every trial's training photos per second and peak GPU memory,
read back from the MLflow store the sweep wrote.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
SWEEP = """\
fixed:
  resolution: 512
  channels: [16, 32, 64, 128, 256]
  batch_size: 4
  epochs: 5
  patience: 0
  strategy: none
search:
  split_seed: {seeds}
scheduler:
  name: none
resources:
  cpus_per_trial: 2
"""


def run_sweep(work: Path, name: str, seeds: list[int], data_dir: str, *options: str) -> float:
    sweep_file = work / f"{name}.yaml"
    sweep_file.write_text(SWEEP.format(seeds=seeds))
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "retina.cli", "sweep", str(sweep_file), "--data-dir", data_dir,
         "--storage", str(work / "ray"), *options],
        cwd=work, check=True,
    )  # fmt: skip
    return time.perf_counter() - started


def print_trials(work: Path, experiment: str, seconds: float) -> None:
    client = MlflowClient(f"sqlite:///{work / 'mlflow' / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], filter_string="tags.`retina.role` = 'trial'")
    print(f"\n{experiment}: {len(runs)} trials in {seconds:.0f} s")
    print(f"{'trial':32} {'photos/s (last epoch)':>22} {'peak GPU MiB':>14}")
    for run in runs:
        speed = run.data.metrics.get("train_photos_per_second", float("nan"))
        memory = run.data.metrics.get("peak_gpu_memory_mb", float("nan"))
        print(f"{run.info.run_name:32} {speed:>22.1f} {memory:>14.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "hrf"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check runs on GPU machines only")
        return 1
    gpus = torch.cuda.device_count()
    print(f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")

    tests = [sys.executable, "-m", "pytest", "-q", str(REPO / "tests" / "test_cuda.py")]
    subprocess.run(tests, cwd=REPO, check=True)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        seconds = run_sweep(work, "shared-gpu", [0, 1, 2, 3], args.data_dir,
                            "--gpus-per-trial", "0.25")  # fmt: skip
        print_trials(work, "shared-gpu", seconds)
        if gpus > 1:
            seconds = run_sweep(work, "two-gpus", [0], args.data_dir, "--gpus-per-trial", "2")
            print_trials(work, "two-gpus", seconds)
        else:
            print("\none GPU only: the 2-GPU-per-trial sweep needs a second GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())

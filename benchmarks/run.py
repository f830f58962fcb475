"""Run the `retina` benchmarks on the real HRF photos and print every figure as a table.

    .venv/bin/python -m benchmarks.run                    # all five figures (~15 min, 2 CPUs)
    .venv/bin/python -m benchmarks.run --figures data,inference
    .venv/bin/python -m benchmarks.run --tiny             # seconds-scale sizes, for a check

Each figure is a ratio of two quantities measured in the same run; see README.md here.
"""

import argparse
import datetime
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import concurrency, data_loading, inference, memory, trial_overhead
from benchmarks.report import Figure, markdown_table
from retina.data.dataset import default_cache_dir

FIGURES = ("data", "overhead", "concurrency", "inference", "memory")
REPO = Path(__file__).resolve().parents[1]


def _resolutions(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part]
    if len(values) < 2:
        raise argparse.ArgumentTypeError("give at least two resolutions, e.g. 256,512,1024")
    return values


def _figures(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(chosen) - set(FIGURES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown figure {unknown[0]!r}; choose from {FIGURES}")
    return chosen


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    default_data = os.environ.get("RETINA_DATA_DIR") or REPO.parent / "shared" / "data" / "hrf"
    parser.add_argument("--figures", type=_figures, default=",".join(FIGURES), help="which")
    parser.add_argument("--data-dir", type=Path, default=Path(default_data), help="HRF")
    parser.add_argument(
        "--cache-dir", type=Path, default=default_cache_dir(), help="retina's cache, warmed"
    )
    parser.add_argument("--work-dir", type=Path, help="keep sweeps and logs here (else a temp)")
    parser.add_argument("--tiny", action="store_true", help="smallest sizes, to check it runs")
    parser.add_argument("--timeout", type=float, default=480, help="seconds per subprocess")

    group = parser.add_argument_group("1. data")
    group.add_argument("--data-resolution", type=int, default=512, help="pixels")
    group.add_argument("--data-repeats", type=int, default=5, help="warm loads")

    group = parser.add_argument_group("2. trial overhead")
    group.add_argument("--overhead-resolution", type=int, default=256, help="pixels")
    group.add_argument("--overhead-epochs", type=int, default=5, help="first one not counted")
    group.add_argument("--batch-size", type=int, default=2, help="also used by figure 5")
    group.add_argument("--threads", type=int, default=1, help="torch threads of both sides")

    group = parser.add_argument_group("3. concurrency")
    group.add_argument("--concurrency-resolution", type=int, default=256, help="pixels")
    group.add_argument("--concurrency-epochs", type=int, default=2, help="per trial")
    group.add_argument("--concurrency-trials", type=int, default=4, help="split seeds 0..N-1")

    group = parser.add_argument_group("4. inference")
    group.add_argument("--resized-photos", type=int, default=8, help="photos timed at 512")
    group.add_argument("--native-photos", type=int, default=1, help="photos timed at native")
    group.add_argument("--inference-batch", type=int, default=4, help="photos or windows")

    group = parser.add_argument_group("5. memory")
    group.add_argument("--memory-resolutions", type=_resolutions, default="256,512,1024", help="px")
    group.add_argument("--memory-steps", type=int, default=2, help="training steps per probe")
    group.add_argument("--memory-threads", type=int, default=os.cpu_count() or 1, help="torch")

    arguments = parser.parse_args()
    if arguments.tiny:
        arguments.data_resolution = 64
        arguments.data_repeats = 2
        arguments.overhead_resolution = arguments.concurrency_resolution = 64
        arguments.overhead_epochs = arguments.concurrency_epochs = 2
        arguments.concurrency_trials = 2
        arguments.resized_photos = arguments.inference_batch
        arguments.memory_resolutions = [64, 128]
        arguments.memory_steps = 1
    return arguments


def machine() -> str:
    """Cores, CPU model and accelerator, for the table's caption."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if names:
            model = names[0].split(":", 1)[1].strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({model}), {gpu}, torch {torch.__version__}"


def measure_figure(name: str, arguments: argparse.Namespace, work_dir: Path) -> list[Figure]:
    """The figures of one benchmark, measured with the sizes given on the command line."""
    a, data, cache = arguments, arguments.data_dir, arguments.cache_dir
    match name:
        case "data":
            return [data_loading.measure(data, a.data_resolution, a.data_repeats)]
        case "overhead":
            return trial_overhead.measure(
                data,
                cache,
                work_dir / "overhead",
                a.overhead_resolution,
                a.overhead_epochs,
                a.batch_size,
                a.threads,
                a.timeout,
            )
        case "concurrency":
            folder = work_dir / "concurrency"
            resolution, epochs = a.concurrency_resolution, a.concurrency_epochs
            return [
                concurrency.measure(
                    data, cache, folder, resolution, epochs, a.concurrency_trials, a.timeout
                )
            ]
        case "inference":
            return [inference.measure(data, a.resized_photos, a.native_photos, a.inference_batch)]
        case "memory":
            return memory.measure(
                data,
                cache,
                a.memory_resolutions,
                a.batch_size,
                a.memory_steps,
                a.memory_threads,
                a.timeout,
            )
    raise ValueError(f"unknown figure {name!r}")


def run_figures(arguments: argparse.Namespace, work_dir: Path) -> list[Figure]:
    """Measure the chosen figures in order, printing each one's lines as it is done."""
    figures: list[Figure] = []
    for name in arguments.figures:
        started, load_before = time.perf_counter(), os.getloadavg()[0]
        print(f"--- measuring {name} ...", flush=True)
        for figure in measure_figure(name, arguments, work_dir):
            print(figure.line())
            for detail in figure.details:
                print(f"    {detail}")
            figures.append(figure)
        # Other users' work on a shared machine shows here first: every figure is a
        # ratio, but contention rarely weighs equally on both of its sides.
        print(
            f"    ({name} took {time.perf_counter() - started:.0f} s; 1-minute load average "
            f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} cores)",
            flush=True,
        )
    return figures


def main() -> None:
    arguments = parse_arguments()
    # MLflow announces each new store's schema; the figures are what this script prints.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    started = time.perf_counter()
    print(f"retina benchmarks, {datetime.date.today()}, {machine()}")
    print(f"data {arguments.data_dir}, cache {arguments.cache_dir}", flush=True)
    if arguments.work_dir is not None:
        arguments.work_dir.mkdir(parents=True, exist_ok=True)
        figures = run_figures(arguments, arguments.work_dir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="retina-bench-") as folder:
            figures = run_figures(arguments, Path(folder))
    print()
    print(markdown_table(figures))
    print(f"\n{len(figures)} figures in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()

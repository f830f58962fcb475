"""One training process at one resolution, reporting its peak resident memory.

It holds what a trial holds (the modules a trial worker imports, the whole preprocessed
dataset, the train and validation photos as tensors, a U-Net with its optimizer) and
runs a few real training steps and one validation batch with ``retina.training``: the
peak of a trial is reached within its first steps, every later step reuses that memory.

    python benchmarks/memory_probe.py --data-dir DIR --resolution R --batch-size B

Prints one JSON object: peak resident memory (MiB) after the imports, after the data,
and after training, from ``/proc/self/status`` (``VmHWM``).
"""

import argparse
import json
import math
import resource
from pathlib import Path

import torch

import retina.sweep.trial  # noqa: F401  (a trial worker imports it, with Ray and MLflow)
from retina.config import TrialSettings
from retina.data.dataset import load_dataset
from retina.model import build_loss
from retina.training import PhotoTensors, TrainingRun, evaluate, split_tensors, train_one_epoch


def peak_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux's ``ru_maxrss`` keeps the peak of the process image before ``exec``: a child
    started by a large parent reports at least the parent's size. ``VmHWM`` belongs to
    the current image only, so it is read first.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    after_imports = peak_mib()

    torch.set_num_threads(args.threads)
    settings = TrialSettings(resolution=args.resolution, batch_size=args.batch_size)
    device = torch.device("cpu")
    dataset = load_dataset(args.data_dir, settings.resolution)
    train, val = split_tensors(dataset, settings, device)
    after_data = peak_mib()

    shown = slice(0, args.steps * settings.batch_size)
    steps_data = PhotoTensors(
        train.photos[shown], train.vessels[shown], train.fields_of_view[shown]
    )
    loss_fn = build_loss(settings)
    run = TrainingRun.start(settings, device, 1, math.ceil(len(train) / settings.batch_size))
    train_one_epoch(
        run.model, steps_data, loss_fn, run.optimizer, run.lr_schedule, run.augmenter, settings
    )
    first_batch = slice(0, settings.batch_size)
    evaluate(
        run.model,
        PhotoTensors(
            val.photos[first_batch], val.vessels[first_batch], val.fields_of_view[first_batch]
        ),
        loss_fn,
        settings,
    )
    result = {"after_imports": after_imports, "after_data": after_data, "peak": peak_mib()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

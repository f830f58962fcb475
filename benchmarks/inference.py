"""Figure 4: photos per second of an untrained U-Net at 512x512 and at native resolution.

A model trained on photos resized to 512 predicts a resized photo in one pass; at the
native 3504x2336 it needs MONAI's sliding windows of 512, overlapping by a quarter (the
default), blended with constant weights. The U-Net has the default widths
(16, 32, 64, 128, 256), runs on the CPU with every core, and is untrained: speed does not
depend on the weights.
"""

import math
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from benchmarks.report import Figure, Quantity
from retina.config import TrialSettings
from retina.data.images import read_photo, resize_photo
from retina.data.layouts import find_cases
from retina.model import build_unet

WINDOW = 512
OVERLAP = 0.25


def _as_batch(photos: list[np.ndarray]) -> torch.Tensor:
    """Photos (H, W, 3) uint8 as one (N, 3, H, W) batch of floats in [0, 1]."""
    stacked = torch.from_numpy(np.stack(photos))
    return stacked.permute(0, 3, 1, 2).float().div(255).contiguous()


def _windows(height: int, width: int) -> int:
    step = WINDOW * (1 - OVERLAP)
    return math.prod(math.ceil(max(0, side - WINDOW) / step) + 1 for side in (height, width))


@torch.inference_mode()
def measure(data_dir: Path, resized_photos: int, native_photos: int, batch_size: int) -> Figure:
    """Time ``resized_photos`` one-pass predictions and ``native_photos`` windowed ones.

    Resized photos go through the model ``batch_size`` at a time, and so do the windows
    of a native photo: on a CPU a batch of 4 costs far less than 4 batches of 1.
    """
    _, cases = find_cases(Path(data_dir))
    photos = [read_photo(case.photo) for case in cases[: max(resized_photos, native_photos)]]
    model = build_unet(TrialSettings()).eval()
    model(_as_batch([resize_photo(photos[0], WINDOW)] * batch_size))  # warm-up, not timed

    started = time.perf_counter()
    for first in range(0, resized_photos, batch_size):
        indices = range(first, min(first + batch_size, resized_photos))
        batch = [resize_photo(photos[index % len(photos)], WINDOW) for index in indices]
        torch.sigmoid(model(_as_batch(batch)))
    resized_rate = resized_photos / (time.perf_counter() - started)

    started = time.perf_counter()
    for index in range(native_photos):
        logits = sliding_window_inference(
            _as_batch([photos[index % len(photos)]]),
            roi_size=(WINDOW, WINDOW),
            sw_batch_size=batch_size,
            predictor=model,
            overlap=OVERLAP,
        )
        torch.sigmoid(logits)
    native_rate = native_photos / (time.perf_counter() - started)

    height, width = photos[0].shape[:2]
    return Figure(
        key="4",
        title=f"Inference on CPU ({torch.get_num_threads()} threads), untrained U-Net",
        a=Quantity(f"{WINDOW}x{WINDOW}", resized_rate, "photos/s"),
        b=Quantity(f"native {width}x{height}, sliding {WINDOW} windows", native_rate, "photos/s"),
        details=[
            f"{resized_photos} resized photos (resize included) and {native_photos} native "
            f"photo(s), {batch_size} photos or windows per batch; "
            f"{_windows(height, width)} windows per native photo at overlap {OVERLAP}; "
            f"pixel ratio {height * width / WINDOW**2:.1f}"
        ],
    )

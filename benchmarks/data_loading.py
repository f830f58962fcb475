"""Figure 1: loading the preprocessed cache against decoding and resizing the raw photos.

A sweep, each ``retina best --evaluate`` and each test load the dataset; the cache is what
keeps that from costing a full decode of 45 photos of 3504x2336 every time.
"""

import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.report import Figure, Quantity
from retina.data.dataset import load_dataset


def measure(data_dir: Path, resolution: int, warm_repeats: int) -> Figure:
    """Time one cold load into an empty cache folder, then warm loads from that folder."""
    with tempfile.TemporaryDirectory(prefix="retina-bench-cache-") as folder:
        started = time.perf_counter()
        dataset = load_dataset(data_dir, resolution, cache_dir=Path(folder))
        cold = time.perf_counter() - started

        warm_times = []
        for _ in range(warm_repeats):
            started = time.perf_counter()
            load_dataset(data_dir, resolution, cache_dir=Path(folder))
            warm_times.append(time.perf_counter() - started)
        cache_bytes = sum(path.stat().st_size for path in Path(folder).rglob("*.npz"))

    warm = statistics.median(warm_times)
    return Figure(
        key="1",
        title=f"Data: {len(dataset)} photos at {resolution}x{resolution}, cold vs cached",
        a=Quantity("cold (decode + resize + write cache)", cold, "s"),
        b=Quantity(f"cached (median of {warm_repeats})", warm, "s"),
        target=">= 50",
        holds=cold / warm >= 50,
        details=[
            f"cache file {cache_bytes / 2**20:.1f} MiB; warm loads "
            + ", ".join(f"{seconds * 1000:.0f} ms" for seconds in warm_times)
        ],
    )

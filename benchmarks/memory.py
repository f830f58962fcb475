"""Figure 5: peak resident memory of one training process, and how it grows with size.

Each resolution runs in its own fresh process (``memory_probe.py``), so each peak is that
process's alone. Pixels grow 4x per doubling of the side; activations grow with them,
while the imported libraries and the model's weights do not.
"""

import itertools
from pathlib import Path

from benchmarks.processes import run_json_script
from benchmarks.report import Figure, Quantity
from retina.data.dataset import load_dataset


def measure(
    data_dir: Path,
    cache_dir: Path,
    resolutions: list[int],
    batch_size: int,
    steps: int,
    threads: int,
    timeout_seconds: float,
) -> list[Figure]:
    """One probe per resolution; one figure per step up (each size against the one below)."""
    peaks = {}
    for resolution in resolutions:
        # Preprocess here first: decoding full-size photos would inflate the probe's peak.
        load_dataset(data_dir, resolution, cache_dir=cache_dir)
        arguments = ["--data-dir", str(data_dir), "--resolution", str(resolution)]
        arguments += ["--batch-size", str(batch_size), "--steps", str(steps)]
        arguments += ["--threads", str(threads)]
        peaks[resolution] = run_json_script(
            "memory_probe.py", arguments, cache_dir, timeout_seconds
        )

    floor = peaks[resolutions[0]]["after_imports"]
    details = [
        "peak RSS (MiB) after imports / after data / after training: "
        + "; ".join(
            f"{r}px {p['after_imports']:.0f} / {p['after_data']:.0f} / {p['peak']:.0f}"
            for r, p in peaks.items()
        ),
        f"above the {floor:.0f} MiB of imports: "
        + ", ".join(f"{r}px {p['peak'] - floor:.0f} MiB" for r, p in peaks.items()),
    ]
    figures = []
    for index, (smaller, larger) in enumerate(itertools.pairwise(resolutions), start=1):
        pixel_ratio = (larger / smaller) ** 2
        figures.append(
            Figure(
                key=f"5{'abcdefgh'[index - 1]}",
                title=f"Memory: peak RSS of one training process, batch {batch_size}, "
                f"{larger}px vs {smaller}px ({pixel_ratio:.0f}x pixels)",
                a=Quantity(f"{larger}px", peaks[larger]["peak"], "MiB"),
                b=Quantity(f"{smaller}px", peaks[smaller]["peak"], "MiB"),
                details=details if index == 1 else [],
            )
        )
    return figures

"""Shared fixtures: the real HRF photos beside the checkout, and small written datasets."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
HRF = REPO.parent / "shared" / "data" / "hrf"


@pytest.fixture(scope="session")
def hrf_dir() -> Path:
    if not (HRF / "images").is_dir():
        pytest.fail(f"the real HRF set is expected at {HRF} (see README: Data)")
    return HRF


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One preprocessing cache for the test session, so HRF is decoded once per size."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def isolated_environment(session_cache, monkeypatch):
    """Tests never touch the user's cache, tracking store or data folder settings."""
    monkeypatch.setenv("RETINA_CACHE_DIR", str(session_cache))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RETINA_DATA_DIR", raising=False)


def write_case(
    folder: Path,
    stem: str,
    size: tuple[int, int] = (40, 30),
    photo_suffix: str = ".png",
    label_suffix: str = ".png",
    label_dir: str = "labels",
    mask_dir: str | None = "masks",
    mask_stem: str | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Write a photo, a 0/255 label and a mask; returns the label as booleans."""
    rng = np.random.default_rng(seed)
    width, height = size
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / label_dir).mkdir(parents=True, exist_ok=True)
    photo = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(photo).save(folder / "images" / f"{stem}{photo_suffix}")
    vessels = np.zeros((height, width), dtype=bool)
    vessels[:, width // 2 - 2 : width // 2 + 2] = True
    Image.fromarray(vessels.astype(np.uint8) * 255).save(
        folder / label_dir / f"{stem}{label_suffix}"
    )
    if mask_dir is not None:
        (folder / mask_dir).mkdir(parents=True, exist_ok=True)
        mask = np.full((height, width), 255, dtype=np.uint8)
        Image.fromarray(mask).save(folder / mask_dir / f"{mask_stem or stem}.png")
    return vessels

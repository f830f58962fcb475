"""Shared fixtures: the real HRF photos beside the checkout, and small written datasets."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
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


@pytest.fixture(autouse=True, scope="module")
def no_inherited_tracking_uri():
    """mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI; a test module that
    loads a model in-process must not send the next module's CLI runs to its store."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


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


# A sweep that learns in seconds on a CPU: 2 split seeds x 2 final-training strategies at
# 64x64. tests/sweeps/tiny.yaml stops after 3 epochs with an F1 near the vessel share,
# too little for a prediction test to tell a correct pipeline from a broken one; the
# dice loss at a constant rate reaches a validation F1 of about 0.3 in 30 epochs.
LEARNING_SWEEP = """\
fixed:
  resolution: 64
  channels: [8, 16, 32]
  residual_units: 1
  batch_size: 4
  epochs: 30
  patience: 0
  loss: dice
  learning_rate: 0.01
  lr_schedule: constant
  finetune_epochs: 2
search:
  optimizer: [adamw]
  split_seed: [0, 1]
  strategy: [retrain, finetune]
scheduler:
  name: none
resources:
  max_concurrent: 2
  cpus_per_trial: 1
"""
EXPERIMENT = "learning"
MODEL_NAME = "retina-vessels"


@dataclass(frozen=True)
class EvaluatedSweep:
    """A store holding one evaluated sweep whose champion is registered."""

    work: Path  # the current folder of the commands: the store is work/mlflow/
    uri: str
    env: dict[str, str]
    best: dict  # `retina best --evaluate --register --json`

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def retina(self, *args: str) -> subprocess.CompletedProcess:
        return run_retina(*args, cwd=self.work, env=self.env)

    def run_of(self, run_id: str) -> dict:
        return next(run for run in self.best["runs"] if run["run_id"] == run_id)


def run_retina(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "retina.cli", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)


@pytest.fixture(scope="session")
def evaluated_sweep(tmp_path_factory, hrf_dir: Path, session_cache: Path) -> EvaluatedSweep:
    """One small sweep, evaluated with its champion registered, shared by the tests of
    prediction, the report and the MLflow UI."""
    work = tmp_path_factory.mktemp("evaluated-sweep")
    uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    env = {**os.environ, "RETINA_CACHE_DIR": str(session_cache), "MLFLOW_TRACKING_URI": uri}
    (work / f"{EXPERIMENT}.yaml").write_text(LEARNING_SWEEP)
    sweep = run_retina(
        "sweep", f"{EXPERIMENT}.yaml", "--data-dir", str(hrf_dir),
        "--storage", str(work / "ray"), cwd=work, env=env,
    )  # fmt: skip
    assert sweep.returncode == 0, f"retina sweep failed:\n{sweep.stderr[-3000:]}"
    best = run_retina("best", "--evaluate", "--register", MODEL_NAME, "--json", cwd=work, env=env)
    assert best.returncode == 0, f"retina best failed:\n{best.stderr[-3000:]}"
    return EvaluatedSweep(work, uri, env, json.loads(best.stdout))

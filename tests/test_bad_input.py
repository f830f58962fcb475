"""Bad input ends in one line and exit code 2, with no traceback and no MLflow run."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_case
from mlflow.tracking import MlflowClient
from PIL import Image

TINY = Path(__file__).parent / "sweeps" / "tiny.yaml"


def _sweep(data_dir: Path, cwd: Path, sweep: Path = TINY) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "retina.cli", "sweep", str(sweep), "--data-dir", str(data_dir)]
    command += ["--storage", str(cwd / "ray")]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def _assert_refused(result: subprocess.CompletedProcess, message: str, cwd: Path) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert sum("error:" in line for line in lines) == 1
    database = cwd / "mlflow" / "mlflow.db"
    if database.exists():
        assert MlflowClient(f"sqlite:///{database}").search_runs(["0"]) == []
        experiments = MlflowClient(f"sqlite:///{database}").search_experiments()
        assert [e.name for e in experiments] == ["Default"]


def _broken_truncated(root: Path) -> None:
    write_case(root, "a", photo_suffix=".jpg")
    photo = root / "images" / "a.jpg"
    photo.write_bytes(photo.read_bytes()[:100])


def _broken_sizes(root: Path) -> None:
    write_case(root, "a")
    Image.new("L", (8, 8)).save(root / "masks" / "a.png")


def _stray_mask(root: Path) -> None:
    write_case(root, "a")
    Image.new("L", (40, 30)).save(root / "masks" / "orphan.png")


def _too_few(root: Path) -> None:
    for index in range(2):
        write_case(root, f"p{index}", seed=index)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "data folder does not exist"),
        (lambda root: root.mkdir(), "data folder is empty"),
        (lambda root: (root / "pictures").mkdir(parents=True), "no known layout"),
        (_broken_truncated, "a.jpg: unreadable or truncated image"),
        (_broken_sizes, "a.png: mask is 8x8 but its photo a.png is 40x30"),
        (_stray_mask, "orphan.png: mask has no matching photo"),
        (_too_few, "leaves no photo for"),
    ],
    ids=["missing", "empty", "no-layout", "truncated", "mask-size", "stray-mask", "too-few"],
)
def test_bad_data_folder_is_refused_in_one_line(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    _assert_refused(_sweep(root, tmp_path), message, tmp_path)


def test_bad_sweep_file_is_refused_in_one_line(tmp_path, hrf_dir):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text("search:\n  optimizer: [adam, lion]\n")
    result = _sweep(hrf_dir, tmp_path, sweep)
    _assert_refused(result, f"{sweep}: search.optimizer[1]: optimizer: got 'lion'", tmp_path)


def test_a_fixed_split_naming_a_missing_photo_is_refused_in_one_line(tmp_path, hrf_dir):
    sweep = tmp_path / "fixed.yaml"
    sweep.write_text(
        TINY.read_text()
        .replace(
            "fixed:\n",
            "fixed:\n  train_photos: [01_dr, 01_g]\n  val_photos: [02_dr]\n"
            "  test_photos: [03_dr, 16_dr]\n",
        )
        .replace("split_seed: [0, 1]", "seed: [0, 1]")
    )
    result = _sweep(hrf_dir, tmp_path, sweep)
    _assert_refused(result, f"{sweep}: fixed.test_photos: no photo named '16_dr'", tmp_path)


def test_evaluate_without_a_model_artifact_names_the_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    (tmp_path / "mlflow").mkdir()
    client = MlflowClient(uri)
    experiment = client.create_experiment("lost", artifact_location=(tmp_path / "a").as_uri())
    sweep = client.create_run(experiment, tags={"retina.role": "sweep"})
    client.log_param(sweep.info.run_id, "data_source", str(tmp_path / "nowhere"))
    trial = client.create_run(
        experiment,
        run_name="adamw-lr1e-03-split0-retrain",
        tags={"retina.role": "trial", "retina.outcome": "finished"},
    )
    for key, value in {"resolution": "64", "channels": "8,16,32"}.items():
        client.log_param(trial.info.run_id, key, value)
    client.log_metric(trial.info.run_id, "best_val_f1", 0.5)
    client.set_terminated(trial.info.run_id)
    write_case(tmp_path / "data", "a")
    result = subprocess.run(
        [sys.executable, "-m", "retina.cli", "best", "--evaluate", "--data-dir",
         str(tmp_path / "data")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"run {trial.info.run_id}: final model cannot be loaded" in result.stderr
    assert "Traceback" not in result.stderr


def test_best_on_an_experiment_without_results_is_refused(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    (tmp_path / "mlflow").mkdir()
    MlflowClient(uri).create_experiment("empty")
    result = subprocess.run(
        [sys.executable, "-m", "retina.cli", "best", "--experiment", "empty"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "has no trial with results yet" in result.stderr

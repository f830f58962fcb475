"""`retina predict` on real HRF photos with the champion of a real, evaluated sweep.

One small sweep is run, evaluated and its champion registered once per test session;
tests/test_report.py and tests/test_browser.py read the same MLflow store (tests/conftest.py).
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MODEL_NAME
from PIL import Image

from retina.data.dataset import load_dataset
from retina.data.images import read_grey, read_photo
from retina.prediction import estimate_field_of_view


def _hrf_file(folder: Path, stem: str) -> Path:
    return next(path for path in folder.iterdir() if path.stem == stem)


def _counts(found: np.ndarray, truth: np.ndarray, inside: np.ndarray) -> tuple[int, int, int]:
    """True positives, false positives and false negatives inside a region."""
    return (
        int((found & truth & inside).sum()),
        int((found & ~truth & inside).sum()),
        int((~found & truth & inside).sum()),
    )


def _f1(counts: list[tuple[int, int, int]]) -> float:
    tp, fp, fn = (sum(column) for column in zip(*counts, strict=True))
    return 2 * tp / (2 * tp + fp + fn)


def test_champion_alias_points_at_the_best_evaluated_run_by_validation(evaluated_sweep):
    evaluated = [run for run in evaluated_sweep.best["runs"] if "test" in run]
    best_validation = max(r["best_val_f1"] for r in evaluated)
    # Ties (strategies of one split share phase 1) go to the first run by name.
    expected = min(r["name"] for r in evaluated if r["best_val_f1"] == best_validation)

    version = evaluated_sweep.client.get_model_version_by_alias(MODEL_NAME, "champion")

    champion = evaluated_sweep.run_of(version.run_id)
    assert champion["name"] == expected
    assert evaluated_sweep.best["champion"]["run_id"] == version.run_id
    assert str(evaluated_sweep.best["champion"]["version"]) == str(version.version)
    test = champion["test"]
    assert float(version.tags["test_f1"]) == pytest.approx(test["test_f1"], rel=1e-5)
    assert float(version.tags["test_auc"]) == pytest.approx(test["test_auc"], rel=1e-5)
    assert version.tags["retina.strategy"] == champion["strategy"]
    assert f"F1 {test['test_f1']:.4f}" in version.description
    assert f"AUC {test['test_auc']:.4f}" in version.description


def test_predicted_masks_at_native_size_score_what_the_native_evaluation_logged(
    evaluated_sweep, hrf_dir, tmp_path
):
    """The champion's test photos, predicted at 3504x2336 and scored here against HRF's
    original labels inside its original masks, must give the F1 that `retina best
    --evaluate` logged at native resolution: two code paths, one number.

    (Those scores are low for a model trained at 64x64, whose labels lose all but the
    largest vessels; what matters here is that both paths agree.)
    """
    version = evaluated_sweep.client.get_model_version_by_alias(MODEL_NAME, "champion")
    champion = evaluated_sweep.run_of(version.run_id)
    photos = tmp_path / "photos"
    photos.mkdir()
    for stem in champion["test_photos"]:
        source = _hrf_file(hrf_dir / "images", stem)
        (photos / source.name).symlink_to(source)

    result = evaluated_sweep.retina(
        "predict", str(photos), "--out", str(tmp_path / "out"), "--masks", str(hrf_dir / "mask")
    )

    assert result.returncode == 0, result.stderr[-3000:]
    predicted = []
    for stem in champion["test_photos"]:
        probability = np.asarray(Image.open(tmp_path / "out" / f"{stem}_probability.png"))
        vessels = np.asarray(Image.open(tmp_path / "out" / f"{stem}_vessels.png"))
        overlay = Image.open(tmp_path / "out" / f"{stem}_overlay.png")
        truth = read_grey(_hrf_file(hrf_dir / "manual1", stem)) >= 128
        inside = read_grey(_hrf_file(hrf_dir / "mask", f"{stem}_mask")) >= 128
        assert probability.shape == vessels.shape == truth.shape == (2336, 3504)
        assert overlay.size == (3504, 2336) and overlay.mode == "RGB"
        assert set(np.unique(vessels)) <= {0, 255}
        assert not vessels[~inside].any() and not probability[~inside].any()
        counts = _counts(vessels == 255, truth, inside)
        predicted.append(counts)
        logged = champion["photo_scores"][stem]["native_f1"]
        assert _f1([counts]) == pytest.approx(logged, abs=2e-3)

    logged_f1 = champion["test"]["test_native_f1_at_val_threshold"]
    assert _f1(predicted) == pytest.approx(logged_f1, abs=2e-3)


def test_predict_reproduces_the_evaluation_on_photos_at_the_run_resolution(
    evaluated_sweep, hrf_dir, session_cache, tmp_path
):
    """Photos already at 64x64 pass through both resizes unchanged, so the masks must
    score what the evaluation logged, to the pixel: preprocessing, model, threshold and
    field of view are then the evaluation's own."""
    version = evaluated_sweep.client.get_model_version_by_alias(MODEL_NAME, "champion")
    champion = evaluated_sweep.run_of(version.run_id)
    dataset = load_dataset(hrf_dir, 64, cache_dir=session_cache)
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    masks.mkdir()
    for stem in champion["test_photos"]:
        index = dataset.index_of([stem])[0]
        Image.fromarray(dataset.photos[index]).save(photos / f"{stem}.png")
        mask = dataset.fields_of_view[index].astype(np.uint8) * 255
        Image.fromarray(mask).save(masks / f"{stem}_mask.png")  # HRF's naming

    result = evaluated_sweep.retina(
        "predict", str(photos), "--run", version.run_id,
        "--masks", str(masks), "--out", str(tmp_path / "out"),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    counts = []
    for stem in champion["test_photos"]:
        index = dataset.index_of([stem])[0]
        vessels = np.asarray(Image.open(tmp_path / "out" / f"{stem}_vessels.png")) == 255
        counts.append(_counts(vessels, dataset.vessels[index], dataset.fields_of_view[index]))
    # The evaluation counts pixels into 1000 probability bins; a pixel within a bin's
    # width of the threshold may land on the other side, a few pixels of 30 000.
    assert _f1(counts) == pytest.approx(champion["test"]["test_f1_at_val_threshold"], abs=0.01)


def test_field_of_view_estimated_from_a_photo_matches_the_hrf_mask(hrf_dir):
    for stem in ("01_dr", "07_g", "12_h"):
        photo = read_photo(_hrf_file(hrf_dir / "images", stem))
        mask = read_grey(_hrf_file(hrf_dir / "mask", f"{stem}_mask")) >= 128

        estimated = estimate_field_of_view(photo)

        overlap = (estimated & mask).sum() / (estimated | mask).sum()
        assert overlap > 0.99, stem


def test_predict_without_masks_estimates_the_field_of_view(evaluated_sweep, hrf_dir, tmp_path):
    photo = _hrf_file(hrf_dir / "images", "02_h")

    result = evaluated_sweep.retina("predict", str(photo), "--out", str(tmp_path))

    assert result.returncode == 0, result.stderr[-3000:]
    assert "estimated" in result.stdout
    vessels = np.asarray(Image.open(tmp_path / "02_h_vessels.png"))
    outside = read_grey(_hrf_file(hrf_dir / "mask", "02_h_mask")) < 128
    # The estimate's rim may differ from HRF's by a pixel or two; the dark corners stay dark.
    assert vessels[outside].mean() < 0.01 * 255
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == ["02_h_overlay.png", "02_h_probability.png", "02_h_vessels.png"]


def test_bad_input_ends_with_one_line_and_exit_code_2(evaluated_sweep, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    champion = evaluated_sweep.best["champion"]["run_id"]
    cases = {
        "no photos in this folder": ["predict", str(empty), "--out", str(tmp_path / "o1")],
        "unreadable or truncated image": [
            "predict", str(broken), "--out", str(tmp_path / "o2"), "--run", champion,
        ],
        "no run 'feedc0de'": ["predict", str(broken), "--out", "o3", "--run", "feedc0de"],
        "registered model 'nope' has no alias 'champion'": [
            "predict", str(broken), "--out", "o4", "--model", "nope",
        ],
        "--register NAME needs --evaluate": ["best", "--register", MODEL_NAME],
    }  # fmt: skip
    # Started together: each process spends seconds importing torch and MLflow.
    command = [sys.executable, "-m", "retina.cli"]
    running = {
        expected: subprocess.Popen(
            [*command, *args],
            cwd=evaluated_sweep.work,
            env=evaluated_sweep.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for expected, args in cases.items()
    }
    for expected, process in running.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (expected, stderr[-2000:])
        assert expected in stderr
        assert "Traceback" not in stderr
        assert len(stderr.strip().splitlines()) == 1, stderr

"""Reading photos, labels and masks in every layout and encoding, and the cache."""

import logging
import time

import numpy as np
import pytest
from conftest import write_case
from PIL import Image

from retina.data.dataset import load_dataset
from retina.data.images import read_grey
from retina.data.layouts import find_cases
from retina.errors import DataError


def test_hrf_pairs_all_45_photos_with_labels_masks_and_categories(hrf_dir):
    layout, cases = find_cases(hrf_dir)
    assert layout == "hrf"
    assert len(cases) == 45
    assert {case.category for case in cases} == {"healthy", "diabetic_retinopathy", "glaucoma"}
    assert all(case.mask is not None and case.mask.stem == f"{case.name}_mask" for case in cases)
    # HRF mixes .jpg and .JPG; both are found.
    assert {case.photo.suffix for case in cases} == {".jpg", ".JPG"}


def test_hrf_grey_level_labels_are_vessel_at_128_and_above(hrf_dir):
    label = read_grey(hrf_dir / "manual1" / "11_h.tif")
    assert len(np.unique(label)) > 2  # one of the three anti-aliased labels
    dataset = load_dataset(hrf_dir, 64)
    assert dataset.vessels.dtype == bool and dataset.photos.shape == (45, 64, 64, 3)
    # Vessels are a minority class; at 64x64 most thin vessels fall below 128 and vanish.
    assert 0.005 < dataset.vessels.mean() < 0.2


@pytest.mark.parametrize(
    "encode",
    [
        lambda v: Image.fromarray(v.astype(np.uint8)),  # 0/1
        lambda v: Image.fromarray(v.astype(np.uint8) * 255),  # 0/255
        lambda v: Image.fromarray(np.where(v, 200, 20).astype(np.uint8)),  # grey levels
        lambda v: Image.fromarray(v.astype(np.uint8) * 255).convert("1"),  # 1-bit
        lambda v: Image.fromarray(v.astype(np.uint8) * 255).convert("P"),  # palette
        lambda v: Image.fromarray((v * 65535).astype(np.uint16)),  # 16-bit
        lambda v: Image.fromarray(v.astype(np.uint8) * 255).convert("RGBA"),  # RGBA
    ],
    ids=["0-1", "0-255", "grey", "1-bit", "palette", "16-bit", "rgba"],
)
def test_every_label_encoding_means_the_same_vessels(tmp_path, encode):
    vessels = np.zeros((30, 40), dtype=bool)
    vessels[5:25, 18:22] = True
    path = tmp_path / "label.png"
    encode(vessels).save(path)
    assert np.array_equal(read_grey(path) >= 128, vessels)


def test_plain_layout_with_16bit_grey_and_rgba_photos(tmp_path):
    write_case(tmp_path, "a")
    write_case(tmp_path, "b", seed=1)
    grey16 = (np.random.default_rng(2).integers(0, 65535, (30, 40))).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "images" / "b.png")
    Image.new("RGBA", (40, 30), (10, 20, 30, 255)).save(tmp_path / "images" / "a.png")
    dataset = load_dataset(tmp_path, 32)
    assert dataset.layout == "plain"
    assert dataset.names == ("a", "b")
    assert dataset.photos.shape == (2, 32, 32, 3)
    assert dataset.fields_of_view.all()


def test_plain_layout_without_masks_scores_the_whole_image(tmp_path):
    write_case(tmp_path, "a", mask_dir=None)
    dataset = load_dataset(tmp_path, 16)
    assert dataset.fields_of_view.all()


def test_drive_layout_pairs_by_number_and_keeps_the_official_test_set(tmp_path):
    for part, numbers in (("training", (21, 22, 23)), ("test", (1, 2))):
        for number in numbers:
            stem = f"{number:02d}_{'training' if part == 'training' else 'test'}"
            write_case(
                tmp_path / part,
                stem,
                photo_suffix=".tif",
                label_suffix=".gif",
                label_dir="1st_manual",
                mask_dir="mask",
                mask_stem=f"{stem}_mask",
            )
            label = tmp_path / part / "1st_manual" / f"{stem}.gif"
            label.rename(label.with_name(f"{number:02d}_manual1.gif"))
    layout, cases = find_cases(tmp_path)
    assert layout == "drive"
    assert [c.official_split for c in cases] == ["test"] * 2 + ["train"] * 3


def test_photo_without_label_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    write_case(tmp_path, "a")
    write_case(tmp_path, "b")
    (tmp_path / "labels" / "b.png").unlink()
    (tmp_path / "masks" / "b.png").unlink()
    with caplog.at_level(logging.WARNING):
        _, cases = find_cases(tmp_path)
    assert [c.name for c in cases] == ["a"]
    assert "b.png" in caplog.text and "no vessel label" in caplog.text


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "is empty"),
        (lambda root: (root / "photos").mkdir(parents=True), "no known layout"),
    ],
    ids=["missing", "empty", "unknown-layout"],
)
def test_unusable_folders_are_one_line_errors(tmp_path, damage, message):
    root = tmp_path / "data"
    damage(root)
    with pytest.raises(DataError, match=message) as error:
        find_cases(root)
    assert "\n" not in str(error.value)


def test_label_without_photo_is_an_error_naming_it(tmp_path):
    write_case(tmp_path, "a")
    Image.new("L", (40, 30)).save(tmp_path / "labels" / "zz.png")
    with pytest.raises(DataError, match=r"zz.png: label has no matching photo"):
        find_cases(tmp_path)


def test_truncated_photo_is_an_error_naming_it(tmp_path):
    write_case(tmp_path, "a", photo_suffix=".jpg")
    photo = tmp_path / "images" / "a.jpg"
    photo.write_bytes(photo.read_bytes()[:200])
    with pytest.raises(DataError, match=r"a.jpg: unreadable or truncated"):
        load_dataset(tmp_path, 16)


def test_label_of_another_size_is_an_error(tmp_path):
    write_case(tmp_path, "a")
    Image.new("L", (20, 20)).save(tmp_path / "labels" / "a.png")
    with pytest.raises(DataError, match=r"a.png: label is 20x20 but its photo a.png is 40x30"):
        load_dataset(tmp_path, 16)


def test_cache_returns_identical_arrays_much_faster(hrf_dir, tmp_path):
    started = time.perf_counter()
    first = load_dataset(hrf_dir, 128, cache_dir=tmp_path)
    decoded = time.perf_counter() - started
    started = time.perf_counter()
    second = load_dataset(hrf_dir, 128, cache_dir=tmp_path)
    cached = time.perf_counter() - started
    assert first.fingerprint == second.fingerprint
    assert np.array_equal(first.photos, second.photos)
    assert cached < decoded

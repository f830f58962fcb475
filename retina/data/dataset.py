"""Preprocess a dataset folder once into in-memory arrays, cached on disk.

Preprocessing follows the published HRF experiment: photo, label and mask are resized to
a square of ``resolution`` pixels, the resized label and mask are thresholded at 128 and
the photo is later scaled to [0, 1]. Decoding 45 HRF photos of 3504x2336 takes seconds;
the cache brings every later load (each sweep, each evaluation) down to milliseconds.
"""

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retina.data.images import read_grey, read_photo, resize_binary, resize_photo
from retina.data.layouts import FundusCase, find_cases
from retina.data.splits import Split, split_photos
from retina.errors import DataError

log = logging.getLogger(__name__)

# Bump when preprocessing changes, so that old cache entries are no longer used.
PREPROCESSING_VERSION = 1


@dataclass(frozen=True)
class FundusDataset:
    """Preprocessed photos, vessel labels and field-of-view masks of one dataset folder."""

    source: str
    layout: str
    resolution: int
    names: tuple[str, ...]
    categories: tuple[str | None, ...]
    official_splits: tuple[str | None, ...]
    photos: np.ndarray  # (N, R, R, 3) uint8
    vessels: np.ndarray  # (N, R, R) bool
    fields_of_view: np.ndarray  # (N, R, R) bool; all True where the dataset has no masks
    fingerprint: str  # sha256 of the preprocessed arrays: the same data gives the same value

    def __len__(self) -> int:
        return len(self.names)

    def split(
        self, seed: int, train_fraction: float, val_fraction: float, stratify: bool = True
    ) -> Split:
        """The seeded split of this dataset's photos; stratified where categories exist."""
        stratified = stratify and all(category is not None for category in self.categories)
        return split_photos(
            self.names,
            seed,
            train_fraction,
            val_fraction,
            categories=self.categories if stratified else None,
            official_splits=self.official_splits,
        )

    def index_of(self, names: list[str] | tuple[str, ...]) -> list[int]:
        position = {name: i for i, name in enumerate(self.names)}
        missing = [name for name in names if name not in position]
        if missing:
            raise DataError(f"{self.source}: no photo named {missing[0]!r} in this dataset")
        return [position[name] for name in names]


def default_cache_dir() -> Path:
    """Where preprocessed arrays and downloads are kept (``RETINA_CACHE_DIR`` overrides)."""
    configured = os.environ.get("RETINA_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "retina"


def _cache_key(layout: str, cases: list[FundusCase], resolution: int) -> str:
    """Key on the files' names, sizes and modification times and the preprocessing."""
    description = [PREPROCESSING_VERSION, layout, resolution]
    for case in cases:
        for path in (case.photo, case.label, case.mask):
            if path is not None:
                stat = path.stat()
                description.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(description).encode()).hexdigest()[:24]


def _preprocess_case(
    case: FundusCase, resolution: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    photo = read_photo(case.photo)
    label = read_grey(case.label)
    if label.shape != photo.shape[:2]:
        raise DataError(
            f"{case.label}: label is {label.shape[1]}x{label.shape[0]} but its photo "
            f"{case.photo.name} is {photo.shape[1]}x{photo.shape[0]}"
        )
    if case.mask is None:
        field_of_view = np.ones((resolution, resolution), dtype=bool)
    else:
        mask = read_grey(case.mask)
        if mask.shape != photo.shape[:2]:
            raise DataError(
                f"{case.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its photo "
                f"{case.photo.name} is {photo.shape[1]}x{photo.shape[0]}"
            )
        field_of_view = resize_binary(mask, resolution)
    return resize_photo(photo, resolution), resize_binary(label, resolution), field_of_view


def _fingerprint(photos: np.ndarray, vessels: np.ndarray, fields: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (photos, vessels, fields):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def load_dataset(
    root: Path,
    resolution: int,
    cache_dir: Path | None = None,
    on_case_done: Callable[[int, int], None] | None = None,
) -> FundusDataset:
    """Load a dataset folder at ``resolution``, from the cache when it is up to date.

    ``on_case_done(done, total)`` is called after each photo is preprocessed, so that a
    command line can show progress; it is not called on a cache hit.
    """
    root = Path(root).expanduser().resolve()
    layout, cases = find_cases(root)
    cache_file = (
        (cache_dir or default_cache_dir())
        / "preprocessed"
        / (f"{root.name}-{resolution}-{_cache_key(layout, cases, resolution)}.npz")
    )

    if cache_file.exists():
        try:
            with np.load(cache_file) as cached:
                arrays = {key: cached[key] for key in cached.files}
            log.info("loaded %d preprocessed photos from %s", len(cases), cache_file)
        except (OSError, ValueError, EOFError):
            log.warning("ignoring unreadable cache file %s; preprocessing again", cache_file)
            arrays = None
    else:
        arrays = None

    if arrays is None:
        arrays = _preprocess(cases, resolution, on_case_done)
        _write_atomically(cache_file, arrays)
        log.info("preprocessed %d photos of %s into %s", len(cases), root, cache_file)

    return FundusDataset(
        source=str(root),
        layout=layout,
        resolution=resolution,
        names=tuple(case.name for case in cases),
        categories=tuple(case.category for case in cases),
        official_splits=tuple(case.official_split for case in cases),
        photos=arrays["photos"],
        vessels=arrays["vessels"],
        fields_of_view=arrays["fields_of_view"],
        fingerprint=str(arrays["fingerprint"]),
    )


def _preprocess(
    cases: list[FundusCase], resolution: int, on_case_done: Callable[[int, int], None] | None
) -> dict[str, np.ndarray]:
    log.info("preprocessing %d photos to %dx%d", len(cases), resolution, resolution)
    results = []
    # Pillow releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for done, result in enumerate(
            pool.map(lambda case: _preprocess_case(case, resolution), cases), start=1
        ):
            results.append(result)
            if on_case_done is not None:
                on_case_done(done, len(cases))
    photos, vessels, fields = (np.stack(parts) for parts in zip(*results, strict=True))
    return {
        "photos": photos,
        "vessels": vessels,
        "fields_of_view": fields,
        "fingerprint": np.array(_fingerprint(photos, vessels, fields)),
    }


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache beside its final name, then rename, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise

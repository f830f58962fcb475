"""Seeded train/validation/test splits of a dataset's photos.

A split is a pure function of the photo names, the fractions, the stratification flag
and the seed: the same inputs give the same split on any machine, which is what lets
``retina best --evaluate`` rebuild a run's untouched test photos from its parameters.
"""

import math
from dataclasses import dataclass

import numpy as np

from retina.errors import DataError


@dataclass(frozen=True)
class Split:
    """Photo names of each part of a split."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def _part_sizes(count: int, train_fraction: float, val_fraction: float) -> tuple[int, int]:
    # Round down, with a tolerance for fractions such as 2/3 written as 0.6667: 45 photos
    # give 30 train and 7 validation photos, and the test set gets the rest (8).
    n_train = math.floor(count * train_fraction + 1e-3)
    n_val = math.floor(count * val_fraction + 1e-3)
    return n_train, n_val


def split_photos(
    names: tuple[str, ...] | list[str],
    seed: int,
    train_fraction: float = 2 / 3,
    val_fraction: float = 1 / 6,
    categories: tuple[str | None, ...] | list[str | None] | None = None,
    official_splits: tuple[str | None, ...] | list[str | None] | None = None,
) -> Split:
    """Split photo names at random with ``seed``.

    With ``categories`` the photos of each category are spread evenly over the parts
    (HRF: healthy, diabetic retinopathy, glaucoma). Where ``official_splits`` marks test
    photos (DRIVE), those are the test set and the rest is split into train and
    validation in proportion to their fractions.
    """
    # Sort first, so that the split depends on which photos there are, not on the order
    # a file system happened to list them in.
    order = sorted(range(len(names)), key=lambda i: names[i])
    names = [names[i] for i in order]
    if categories is not None:
        categories = [categories[i] for i in order]
    if official_splits is not None:
        official_splits = [official_splits[i] for i in order]
    if categories is not None and any(category is None for category in categories):
        raise DataError("stratified split needs a category for every photo (HRF names)")

    official_test = [
        name
        for name, part in zip(names, official_splits or [None] * len(names), strict=True)
        if part == "test"
    ]
    if official_test:
        pool = [name for name in names if name not in set(official_test)]
        train_share = train_fraction / (train_fraction + val_fraction)
        n_train, n_val = _part_sizes(len(pool), train_share, 1 - train_share)
        n_val = len(pool) - n_train
    else:
        pool = names
        n_train, n_val = _part_sizes(len(pool), train_fraction, val_fraction)

    category_of = dict(zip(names, categories, strict=True)) if categories else None
    shuffled = _shuffled(pool, seed, category_of)
    split = Split(
        train=tuple(sorted(shuffled[:n_train])),
        val=tuple(sorted(shuffled[n_train : n_train + n_val])),
        test=tuple(sorted(official_test or shuffled[n_train + n_val :])),
    )
    for part in ("train", "val", "test"):
        if not getattr(split, part):
            raise DataError(
                f"split of {len(names)} photos with train {train_fraction:.3g} and "
                f"validation {val_fraction:.3g} leaves no photo for {part}"
            )
    return split


def _shuffled(names: list[str], seed: int, category_of: dict[str, str] | None) -> list[str]:
    """Shuffle names; with categories, interleave them so every prefix stays balanced."""
    rng = np.random.default_rng(seed)
    shuffled = [names[i] for i in rng.permutation(len(names))]
    if not category_of:
        return shuffled

    queues: dict[str, list[str]] = {}
    for name in shuffled:
        queues.setdefault(category_of[name], []).append(name)
    # Round-robin over the categories in a seeded order: taking the first n names then
    # takes about n/3 of each category, so train, validation and test share the mix.
    groups = [queues[key] for key in sorted(queues)]
    groups = [groups[i] for i in rng.permutation(len(groups))]
    interleaved = []
    while any(groups):
        for group in groups:
            if group:
                interleaved.append(group.pop(0))
    return interleaved

"""Find the fundus photos of a dataset folder and pair each with its label and mask.

Three layouts are understood:

- HRF: ``images/``, ``manual1/`` (vessel labels) and ``mask/`` (field-of-view masks,
  named ``<stem>_mask``); the stem's suffix gives the category (``_h`` healthy, ``_dr``
  diabetic retinopathy, ``_g`` glaucoma).
- DRIVE: ``training/`` and ``test/``, each with ``images/``, ``1st_manual/`` and ``mask/``,
  paired by the number that starts each name; the official test folder is the test set.
- A plain folder: ``images/``, ``labels/`` and optional ``masks/``, paired by stem.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from retina.data.images import SUPPORTED_SUFFIXES
from retina.errors import DataError

log = logging.getLogger(__name__)

HRF_CATEGORIES = {"h": "healthy", "dr": "diabetic_retinopathy", "g": "glaucoma"}


@dataclass(frozen=True)
class FundusCase:
    """One fundus photo with its vessel label and, when the dataset has one, its mask."""

    name: str
    photo: Path
    label: Path
    mask: Path | None
    category: str | None = None
    # "train" or "test" where the dataset fixes the split (DRIVE); None for random splits.
    official_split: str | None = None


def _image_files(folder: Path) -> dict[str, Path]:
    """Image files of a folder by stem; a stem seen twice is ambiguous and refused."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in SUPPORTED_SUFFIXES:
            continue
        if path.stem in files:
            raise DataError(f"{folder}: two images share the name {path.stem!r}")
        files[path.stem] = path
    return files


def _pair(
    photos_dir: Path,
    labels_dir: Path,
    masks_dir: Path | None,
    label_key: Callable[[str], str],
    mask_key: Callable[[str], str],
    photo_key: Callable[[str], str] = lambda stem: stem,
    **case_fields: str | None,
) -> list[FundusCase]:
    """Pair photos with labels and masks by key; report strays as the user would want."""
    photos = _image_files(photos_dir)
    labels = {label_key(stem): path for stem, path in _image_files(labels_dir).items()}
    masks = (
        {mask_key(stem): path for stem, path in _image_files(masks_dir).items()}
        if masks_dir is not None
        else {}
    )
    photo_keys = {photo_key(stem) for stem in photos}
    for kind, files in (("label", labels), ("mask", masks)):
        strays = sorted(key for key in files if key not in photo_keys)
        if strays:
            raise DataError(f"{files[strays[0]]}: {kind} has no matching photo in {photos_dir}")

    cases = []
    for stem, photo in photos.items():
        key = photo_key(stem)
        if key not in labels:
            log.warning("skipping %s: no vessel label for it in %s", photo, labels_dir)
            continue
        if masks_dir is not None and key not in masks:
            raise DataError(f"{photo}: no field-of-view mask for it in {masks_dir}")
        cases.append(
            FundusCase(
                name=stem, photo=photo, label=labels[key], mask=masks.get(key), **case_fields
            )
        )
    return cases


def _strip_suffix(suffix: str) -> Callable[[str], str]:
    return lambda stem: stem[: -len(suffix)] if stem.endswith(suffix) else stem


def _leading_number(stem: str) -> str:
    return stem.split("_", 1)[0]


def _hrf_cases(root: Path) -> list[FundusCase]:
    mask_dir = root / "mask" if (root / "mask").is_dir() else None
    cases = _pair(root / "images", root / "manual1", mask_dir, str, _strip_suffix("_mask"))
    return [
        FundusCase(
            name=case.name,
            photo=case.photo,
            label=case.label,
            mask=case.mask,
            category=HRF_CATEGORIES.get(case.name.rsplit("_", 1)[-1].lower()),
        )
        for case in cases
    ]


def _drive_cases(root: Path) -> list[FundusCase]:
    cases = []
    for folder, split in (("training", "train"), ("test", "test")):
        part = root / folder
        mask_dir = part / "mask" if (part / "mask").is_dir() else None
        cases += _pair(
            part / "images",
            part / "1st_manual",
            mask_dir,
            _leading_number,
            _leading_number,
            photo_key=_leading_number,
            official_split=split,
        )
    return cases


def _plain_cases(root: Path) -> list[FundusCase]:
    mask_dir = root / "masks" if (root / "masks").is_dir() else None
    return _pair(root / "images", root / "labels", mask_dir, str, str)


def detect_layout(root: Path) -> str:
    """Name the layout of a dataset folder: ``hrf``, ``drive`` or ``plain``."""
    if not root.exists():
        raise DataError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: data path is not a folder")
    if (root / "images").is_dir() and (root / "manual1").is_dir():
        return "hrf"
    if all((root / part / "images").is_dir() for part in ("training", "test")):
        return "drive"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "plain"
    if not any(root.iterdir()):
        raise DataError(f"{root}: data folder is empty")
    raise DataError(
        f"{root}: no known layout (expected images/ with manual1/ for HRF, training/ and "
        "test/ for DRIVE, or images/ with labels/ and optional masks/)"
    )


def find_cases(root: Path) -> tuple[str, list[FundusCase]]:
    """Discover and pair every usable photo of a dataset folder, sorted by name."""
    layout = detect_layout(root)
    cases = {"hrf": _hrf_cases, "drive": _drive_cases, "plain": _plain_cases}[layout](root)
    if not cases:
        raise DataError(f"{root}: no photo with a vessel label found ({layout} layout)")
    return layout, sorted(cases, key=lambda case: (case.official_split or "", case.name))

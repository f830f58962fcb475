"""Segment new fundus photos of any size with a tracked final model, as training saw photos.

A photo is resized to the run's ``resolution`` and scaled to [0, 1] exactly as the
training data were; the vessel probabilities are resized back to the photo's own size,
thresholded at the threshold the run chose on validation photos, and cleared outside the
field of view. Each photo gives three files: an 8-bit probability map, a 0/255 vessel
mask and an overlay of the vessels on the photo.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image
from scipy import ndimage

from retina.config import TrialSettings
from retina.data.images import (
    BINARY_THRESHOLD,
    SUPPORTED_SUFFIXES,
    read_grey,
    read_photo,
    resize_photo,
)
from retina.errors import DataError, TrackingError
from retina.tracking import MODEL_ARTIFACT, connect, load_logged_model
from retina.training import model_input, predict_probabilities

log = logging.getLogger(__name__)

# The registered model `retina best --evaluate --register` writes by default and
# `retina predict` reads, and the alias that marks the version to use.
DEFAULT_MODEL_NAME = "retina-vessels"
CHAMPION_ALIAS = "champion"
# Used when a run never logged the threshold it chose on validation photos.
FALLBACK_THRESHOLD = 0.5
# Output names per photo stem.
PROBABILITY_SUFFIX = "_probability.png"
VESSELS_SUFFIX = "_vessels.png"
OVERLAY_SUFFIX = "_overlay.png"
# zlib level 1: a 3504x2336 map is written in a fraction of the time of the default
# level, for files about a third larger; prediction is otherwise dominated by writing.
PNG_COMPRESSION = 1
# The field of view is estimated on a photo shrunk by this factor: the border of the
# camera's aperture is a smooth circle, and labelling 8 megapixels costs a second each.
FOV_ESTIMATE_REDUCTION = 4
# Red level (0-255) that separates the aperture's dark surround from the retina. In HRF
# the surround is at most 6 in 99% of its pixels (JPEG noise reaches about 40 near the
# rim), while 99.9% of the retina is above 84, so 30 sits well clear of both.
FOV_RED_THRESHOLD = 30
VESSEL_COLOUR = np.array([0, 255, 0], dtype=np.float32)  # green stands out on red fundus
VESSEL_OPACITY = 0.6


@dataclass(frozen=True)
class VesselModel:
    """A final model with the settings and validation threshold of the run that trained it."""

    network: torch.nn.Module
    settings: TrialSettings
    threshold: float
    run_id: str
    source: str  # the URI it was loaded from: models:/NAME/VERSION or runs:/RUN_ID/model


@dataclass(frozen=True)
class PhotoPrediction:
    """What was written for one photo and how its field of view was found."""

    photo: Path
    width: int
    height: int
    field_of_view_source: str  # the mask file, or "estimated"
    vessel_fraction: float  # of the field of view
    outputs: tuple[Path, Path, Path]  # probability map, vessel mask, overlay


def parse_model_name(spec: str) -> tuple[str, str | None, str | None]:
    """Split ``NAME``, ``NAME@ALIAS`` or ``NAME/VERSION`` into (name, alias, version).

    A bare name means its champion, the version `retina best --register` chose.
    """
    if "@" in spec:
        name, alias = spec.rsplit("@", 1)
        return name, alias, None
    name, _, version = spec.rpartition("/")
    if name and version.isdigit():
        return name, None, version
    return spec, CHAMPION_ALIAS, None


def _not_found(error: MlflowException) -> bool:
    return error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:160] if str(error) else type(error).__name__


def _resolve_registered(client: MlflowClient, uri: str, spec: str) -> tuple[str, str]:
    """The run id and model URI of a registered model version named by ``spec``."""
    name, alias, version = parse_model_name(spec)
    try:
        if alias is not None:
            found = client.get_model_version_by_alias(name, alias)
        else:
            found = client.get_model_version(name, version)
    except MlflowException as error:
        if not _not_found(error):
            raise TrackingError(f"model registry of {uri}: {_first_line(error)}") from None
        wanted = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise TrackingError(
            f"registered model {name!r} has no {wanted} in {uri}; register one with "
            f"`retina best --evaluate --register {name}`"
        ) from None
    return found.run_id, f"models:/{name}/{found.version}"


def load_vessel_model(uri: str, run_id: str | None = None, model: str | None = None) -> VesselModel:
    """Load a run's final model, or a registered version (default: the champion)."""
    if run_id is not None and model is not None:
        raise TrackingError("give --run or --model, not both")
    client = connect(uri)
    if run_id is None:
        run_id, source = _resolve_registered(client, uri, model or DEFAULT_MODEL_NAME)
    else:
        source = f"runs:/{run_id}/{MODEL_ARTIFACT}"
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if not _not_found(error):
            raise TrackingError(f"tracking store {uri}: {_first_line(error)}") from None
        raise TrackingError(f"no run {run_id!r} in {uri}") from None
    try:
        settings = TrialSettings.from_params(run.data.params)
    except ValueError as error:
        reason = _first_line(error)
        raise TrackingError(f"run {run_id}: params are not retina settings ({reason})") from None

    network = load_logged_model(uri, source, source)
    threshold = run.data.metrics.get("best_val_threshold")
    if threshold is None:
        log.warning("run %s logged no best_val_threshold; using %.2f", run_id, FALLBACK_THRESHOLD)
        threshold = FALLBACK_THRESHOLD
    return VesselModel(network.eval(), settings, float(threshold), run_id, source)


def find_photos(paths: list[Path]) -> list[Path]:
    """The photos named on the command line: files as given, folders' image files sorted."""
    photos: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                child
                for child in path.iterdir()
                if child.is_file()
                and not child.name.startswith(".")
                and child.suffix.lower() in SUPPORTED_SUFFIXES
            )
            if not found:
                raise DataError(f"{path}: no photos in this folder")
            photos += found
        elif path.is_file():
            photos.append(path)
        else:
            raise DataError(f"{path}: no such photo or folder")
    if not photos:
        raise DataError("no photos given")
    unique: dict[Path, Path] = {}  # a photo named twice (alone and in its folder) runs once
    for photo in photos:
        unique.setdefault(photo.resolve(), photo)
    by_stem: dict[str, Path] = {}
    for photo in unique.values():
        if photo.stem in by_stem:
            raise DataError(f"{photo}: same name as {by_stem[photo.stem]}; outputs would collide")
        by_stem[photo.stem] = photo
    return list(unique.values())


def pair_masks(photos: list[Path], masks_dir: Path) -> dict[Path, Path]:
    """Each photo's field-of-view mask in ``masks_dir``: same stem, or HRF's ``<stem>_mask``."""
    if not masks_dir.is_dir():
        raise DataError(f"{masks_dir}: masks folder does not exist")
    masks: dict[str, Path] = {}
    for path in sorted(masks_dir.iterdir()):
        if path.suffix.lower() in SUPPORTED_SUFFIXES and not path.name.startswith("."):
            masks.setdefault(path.stem, path)
    paired = {}
    for photo in photos:
        mask = masks.get(photo.stem) or masks.get(f"{photo.stem}_mask")
        if mask is None:
            raise DataError(f"{photo}: no field-of-view mask for it in {masks_dir}")
        paired[photo] = mask
    return paired


def estimate_field_of_view(photo: np.ndarray) -> np.ndarray:
    """Where the retina is in a fundus photo, (H, W) bool, when no mask file is given.

    A fundus camera sees the retina through a round aperture and records black around
    it. The red channel is the one to threshold: the retina reflects red strongly
    everywhere, even in its darkest parts (the macula, large vessels, haemorrhages),
    where green and blue fall close to the surround's black. The largest bright
    component is the retina (dropping specks of noise and text burnt into the corners),
    and filling its holes keeps dark lesions inside it in the field of view.
    """
    height, width = photo.shape[:2]
    small = Image.fromarray(photo[:, :, 0]).reduce(FOV_ESTIMATE_REDUCTION)
    bright = np.asarray(small) > FOV_RED_THRESHOLD
    components, count = ndimage.label(bright)
    if count == 0:
        return np.ones((height, width), dtype=bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    retina = ndimage.binary_fill_holes(components == sizes.argmax())
    full = Image.fromarray(retina.astype(np.uint8) * 255).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(full) >= BINARY_THRESHOLD


def read_field_of_view(photo_path: Path, photo: np.ndarray, mask_path: Path) -> np.ndarray:
    """The field of view of a photo from its mask file, checked to match the photo's size."""
    mask = read_grey(mask_path)
    if mask.shape != photo.shape[:2]:
        raise DataError(
            f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its photo "
            f"{photo_path.name} is {photo.shape[1]}x{photo.shape[0]}"
        )
    return mask >= BINARY_THRESHOLD


@torch.inference_mode()
def vessel_probabilities(
    model: VesselModel, photo: np.ndarray, test_time_flips: bool | None = None
) -> np.ndarray:
    """Vessel probabilities at the photo's own size, (H, W) float32 in [0, 1]."""
    height, width = photo.shape[:2]
    resolution = model.settings.resolution
    device = next(model.network.parameters()).device
    # The same steps as training's preprocessing: square resize, then scale to [0, 1].
    resized = resize_photo(photo, resolution)[None]
    tensor = model_input(resized, model.settings, device)
    probabilities = predict_probabilities(model.network, tensor, model.settings, test_time_flips)
    return to_photo_size(probabilities[0, 0].float().cpu().numpy(), width, height)


def to_photo_size(square: np.ndarray, width: int, height: int) -> np.ndarray:
    """Probabilities predicted on the square model input, resized back to the photo's
    own width and height (bilinear), as (H, W) float32 in [0, 1]."""
    full = Image.fromarray(square.astype(np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(full), 0.0, 1.0)


def overlay_vessels(photo: np.ndarray, vessels: np.ndarray) -> np.ndarray:
    """The photo with its predicted vessels painted over it, (H, W, 3) uint8."""
    overlay = photo.astype(np.float32)
    overlay[vessels] = (1 - VESSEL_OPACITY) * overlay[vessels] + VESSEL_OPACITY * VESSEL_COLOUR
    return overlay.round().astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, compress_level=PNG_COMPRESSION)


def segment_photo(
    model: VesselModel, photo_path: Path, out_dir: Path, mask_path: Path | None = None
) -> PhotoPrediction:
    """Predict one photo and write its probability map, vessel mask and overlay.

    Without ``mask_path`` the field of view is estimated from the photo.
    """
    photo = read_photo(photo_path)
    if mask_path is None:
        field_of_view, source = estimate_field_of_view(photo), "estimated"
    else:
        field_of_view, source = read_field_of_view(photo_path, photo, mask_path), str(mask_path)

    probabilities = vessel_probabilities(model, photo)
    probabilities[~field_of_view] = 0.0
    vessels = (probabilities >= model.threshold) & field_of_view

    outputs = tuple(
        out_dir / f"{photo_path.stem}{suffix}"
        for suffix in (PROBABILITY_SUFFIX, VESSELS_SUFFIX, OVERLAY_SUFFIX)
    )
    _save_png((probabilities * 255.0).round().astype(np.uint8), outputs[0])
    _save_png(vessels.astype(np.uint8) * 255, outputs[1])
    _save_png(overlay_vessels(photo, vessels), outputs[2])
    inside = int(field_of_view.sum())
    return PhotoPrediction(
        photo=photo_path,
        width=photo.shape[1],
        height=photo.shape[0],
        field_of_view_source=source,
        vessel_fraction=float(vessels.sum() / inside) if inside else 0.0,
        outputs=outputs,
    )


def predict_photos(
    model: VesselModel,
    photos: list[Path],
    out_dir: Path,
    masks_dir: Path | None = None,
    on_photo_done: Callable[[int, int], None] | None = None,
) -> list[PhotoPrediction]:
    """Segment every photo into ``out_dir``; ``on_photo_done(done, total)`` after each.

    With ``masks_dir`` every photo must have its mask there, checked before any output.
    """
    masks = pair_masks(photos, masks_dir) if masks_dir is not None else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        model.network.to("cuda")
    results = []
    for done, photo in enumerate(photos, start=1):
        results.append(segment_photo(model, photo, out_dir, masks.get(photo)))
        log.debug("segmented %s into %s", photo, out_dir)
        if on_photo_done is not None:
            on_photo_done(done, len(photos))
    return results

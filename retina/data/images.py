"""Read fundus photos, vessel labels and field-of-view masks into plain numpy arrays.

Every reader returns 8-bit arrays on a 0-255 scale whatever the file stores: 16-bit
samples, 1-bit images, palettes, grey levels, RGBA and labels saved as 0/1. That single
scale is what lets one rule (vessel where the value is at least 128) hold for every
dataset.
"""

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from skimage.exposure import equalize_adapthist

from retina.errors import DataError

# The published HRF experiment calls a label pixel vessel when its value is at least 128;
# the same cut binarises the grey levels left by resizing and by the three HRF labels
# that were saved with anti-aliased edges.
BINARY_THRESHOLD = 128

SUPPORTED_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".gif", ".bmp", ".ppm"})


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: unreadable or truncated image ({error})") from None
    return image


def _to_8bit(array: np.ndarray) -> np.ndarray:
    """Rescale integer or float samples to 0-255 uint8."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        top = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
        return np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    # 16- and 32-bit integers: scale by the type's range when the values need it, so an
    # image saved as 16-bit with values 0-255 keeps them.
    top = int(array.max(initial=0))
    if top <= 255:
        return array.astype(np.uint8)
    bits = 16 if top <= 65535 else 32
    return (array.astype(np.float64) / (2**bits - 1) * 255.0 + 0.5).astype(np.uint8)


def read_photo(path: Path) -> np.ndarray:
    """Read a colour fundus photo as an (H, W, 3) uint8 array; grey photos are repeated."""
    image = _open(path)
    if image.mode in ("RGB", "L", "P", "RGBA", "LA", "1", "CMYK", "YCbCr"):
        return np.asarray(image.convert("RGB"))
    array = _to_8bit(np.asarray(image))
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def read_grey(path: Path) -> np.ndarray:
    """Read a vessel label or field-of-view mask as an (H, W) uint8 array on 0-255.

    Labels stored as 0/1 are stretched to 0/255, so that they read like the others.
    """
    image = _open(path)
    if image.mode == "1":
        array = np.asarray(image).astype(np.uint8) * 255
    elif image.mode == "P":
        array = np.asarray(image.convert("L"))
    elif image.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
        array = np.asarray(image.convert("RGB")).max(axis=2)
    else:
        array = _to_8bit(np.asarray(image))
        if array.ndim == 3:
            array = array.max(axis=2)
    if 0 < array.max(initial=0) <= 1:
        array = array * 255
    return array.astype(np.uint8)


def resize_photo(photo: np.ndarray, resolution: int) -> np.ndarray:
    """Resize a photo to a square of ``resolution`` pixels with antialiasing."""
    resized = Image.fromarray(photo).resize((resolution, resolution), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def resize_binary(grey: np.ndarray, resolution: int) -> np.ndarray:
    """Resize a label or mask, then threshold it at 128 into a boolean array."""
    resized = Image.fromarray(grey).resize((resolution, resolution), Image.Resampling.BILINEAR)
    return np.asarray(resized) >= BINARY_THRESHOLD


# CLAHE on tiles of about 1/8 of the photo's side, clipped at 1% of a tile's pixels: the
# usual choice for fundus photos, which brings thin vessels out of uneven illumination.
CLAHE_TILES = 8
CLAHE_CLIP_LIMIT = 0.01


def enhance_photos(photos: np.ndarray, preprocessing: str) -> np.ndarray:
    """(N, H, W, 3) uint8 photos as the model sees them: unchanged for ``rgb``, else the
    green channel, (N, H, W, 1), equalised with CLAHE for ``green_clahe``."""
    if preprocessing == "rgb":
        return photos
    green = photos[..., 1]
    if preprocessing == "green_clahe":
        size = max(8, green.shape[-1] // CLAHE_TILES)
        green = np.stack(
            [
                (equalize_adapthist(g, kernel_size=size, clip_limit=CLAHE_CLIP_LIMIT) * 255)
                .round()
                .astype(np.uint8)
                for g in green
            ]
        )
    return np.ascontiguousarray(green[..., None])

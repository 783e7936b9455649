"""Reading image files for training and evaluation: size checked from the header, every pixel format to RGB.

Both data pipelines read through here: detection (:func:`tools.engine.coco_dataset.load_rgb_image`, float
pixels) and classification (the ImageFolder of :mod:`tools.engine.cls_train`, 8-bit PIL images).

* The pixel count is checked against ``PIL.Image.MAX_IMAGE_PIXELS`` from the header, before anything is
  decoded (PIL itself only warns up to twice that limit); raise the limit for trusted large images.
* 8-bit modes (L, P, RGBA, CMYK, YCbCr, ...) are converted by PIL. 16-bit images (``I;16*``) are scaled by
  their type's range, 1/65535. 32-bit integer images (``I``) holding values in 0..65535 (how PIL opens many
  16-bit files) are scaled the same way; other ranges are refused, as no scale is safe to guess. Float images
  (``F``) in [0, 1] are taken as they are, in [0, 255] scaled by 1/255; other ranges and NaN/inf are refused.
  PIL's own conversion would clip these to 0..255: an image of floats in [0, 1] would come out black.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["read_rgb_array", "read_rgb_image"]

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_WIDE_MODES = _SIXTEEN_BIT_MODES + ("I", "F")


def read_rgb_array(path: str | Path) -> np.ndarray:
    """Decode an image file into float32 ``H x W x 3`` RGB in [0, 1] (16-bit precision kept).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OSError: naming ``path``, for empty, truncated, corrupt or non-image files.
        ValueError: naming ``path``, for images over the pixel limit or with pixel values no scale fits.
    """
    path = Path(path)
    with _open(path) as img:
        if img.mode in _WIDE_MODES:
            gray = _wide_to_unit(img, path)
            return np.repeat(gray[:, :, None], 3, axis=2)
        return np.asarray(_convert(img, path), dtype=np.float32) / 255.0


def read_rgb_image(path: str | Path) -> Image.Image:
    """Decode an image file into an 8-bit RGB ``PIL.Image`` (what torchvision/timm transforms take).

    Same formats, checks and errors as :func:`read_rgb_array`.
    """
    path = Path(path)
    with _open(path) as img:
        if img.mode in _WIDE_MODES:
            gray = np.rint(_wide_to_unit(img, path) * 255.0).astype(np.uint8)
            return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")
        return _convert(img, path)


def _open(path: Path) -> Image.Image:
    """The decoded image; the pixel count is checked from the header first."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, as an error
            img = Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as err:  # PIL's own check, at twice the limit
        raise ValueError(f"image {path}: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise OSError(f"cannot read image {path}: {err}") from None
    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit is not None and width * height > limit:
        img.close()
        raise ValueError(f"image {path} is {width}x{height} = {width * height} pixels, over the decompression-bomb "
                         f"limit PIL.Image.MAX_IMAGE_PIXELS = {limit}; raise it if the file is trusted")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as err:
        # PIL signals corrupt files with several exception types; name the file in one.
        img.close()
        raise OSError(f"cannot read image {path}: {err}") from None
    return img


def _convert(img: Image.Image, path: Path) -> Image.Image:
    try:
        return img.convert("RGB")
    except (OSError, ValueError) as err:  # a mode PIL cannot convert (e.g. LAB)
        raise OSError(f"cannot read image {path}: mode {img.mode}: {err}") from None


def _wide_to_unit(img: Image.Image, path: Path) -> np.ndarray:
    """A 16/32-bit integer or float grayscale image as float32 ``H x W`` in [0, 1]."""
    values = np.asarray(img, dtype=np.float64 if img.mode == "I" else np.float32)
    if img.mode in _SIXTEEN_BIT_MODES:
        return (values / 65535.0).astype(np.float32)
    if not np.isfinite(values).all():
        raise ValueError(f"image {path} (mode {img.mode}) holds NaN or infinite pixel values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode == "I" and 0 <= low and high <= 65535:
        return (values / 65535.0).astype(np.float32)  # 16-bit data in a 32-bit image
    if img.mode == "F" and 0 <= low and high <= 1:
        return values.astype(np.float32)
    if img.mode == "F" and 0 <= low and high <= 255:
        return (values / 255.0).astype(np.float32)
    expected = "0..65535" if img.mode == "I" else "[0, 1] or [0, 255]"
    raise ValueError(f"image {path} (mode {img.mode}) has pixel values in [{low:g}, {high:g}], outside {expected}; "
                     "convert it to 8-bit or 16-bit RGB or grayscale")

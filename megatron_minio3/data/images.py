"""Image files: loading with clear errors, conversion of any mode to 8-bit RGB, resample names from configuration."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from megatron_minio3.config.data import RESAMPLE_NAMES

RESAMPLE_BY_NAME = {name: getattr(Image.Resampling, name.upper()) for name in RESAMPLE_NAMES}


class ImageLoadError(Exception):
    """An image file that is missing or cannot be decoded."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot load image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


def resample_from_name(name: str, key: str) -> Image.Resampling:
    """The PIL filter named in the config; `key` names the config field in the error message."""
    try:
        return RESAMPLE_BY_NAME[name]
    except KeyError:
        raise ValueError(f"{key}: unknown resample filter {name!r}; choose one of {sorted(RESAMPLE_BY_NAME)}") from None


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255)


def _levels(values: np.ndarray, *, sixteen_bit: bool) -> np.ndarray:
    """8-bit levels of a one-band integer or float image (see `to_rgb`)."""
    data = values.astype(np.float32)  # float32 is exact enough for 8-bit output and halves the memory
    finite = data[np.isfinite(data)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if sixteen_bit or (values.dtype.kind in "iu" and low >= 0 and high <= 65535):
        scaled = data / 257.0  # 65535 -> 255
    elif values.dtype.kind == "f" and low >= 0 and high <= 1:
        scaled = data * 255.0
    elif high > low:
        scaled = (data - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(data)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image of any PIL mode, without clipping or losing what is visible:
    - 16-bit greyscale ("I;16*", and "I" holding values in 0..65535, as 16-bit PNGs decode) is scaled by 255/65535;
      other "I" data and "F" data are scaled from [0, 1] when they lie there, else stretched from min..max;
    - transparency (an alpha band, or a palette/greyscale/RGB image with a transparent colour) is composited on
      white, as the Qwen-VL image pipeline does, so a transparent background does not turn black;
    - every other mode (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX, ...) goes through PIL's own conversion."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image)
        if values.ndim != 2:  # not a plain one-band image: let PIL decide
            return image.convert("RGB")
        grey = Image.fromarray(_levels(values, sixteen_bit=image.mode.startswith("I;16")), "L")
        return grey.convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file fully into RGB. Raises ImageLoadError for a missing, unreadable or corrupt file,
    and for one above PIL's decompression-bomb limit."""
    try:
        with warnings.catch_warnings():
            # Large but legitimate images (above ~89 MP) are fine: they are downscaled before the model.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                rgb = to_rgb(image)
                return rgb.copy() if rgb is image else rgb
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data, unreadable file
        raise ImageLoadError(path, f"corrupt or unreadable ({exc})") from None

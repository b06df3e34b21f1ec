"""Image files: loading with clear errors, and resample names from configuration."""
from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

RESAMPLE_BY_NAME = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


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


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file fully into RGB. Raises ImageLoadError for a missing, unreadable or corrupt file,
    and for one above PIL's decompression-bomb limit."""
    try:
        with warnings.catch_warnings():
            # Large but legitimate images (above ~89 MP) are fine: they are downscaled before the model.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data, unreadable file
        raise ImageLoadError(path, f"corrupt or unreadable ({exc})") from None

"""Opening images from a data set with a cap on decoded pixels, and errors that name the file.

A small PNG can hold a huge image (a 316 KB file of 10000 x 10000 px decodes to 300 MB of RGB and
about 1.4 GB of peak memory; a batch of them is an out-of-memory kill), and PIL only warns below
twice its own limit. :func:`check_image` reads the header only and refuses an image over
``max_pixels`` before anything is decoded; :func:`load_image` then decodes it. The cap is
:data:`DEFAULT_MAX_PIXELS` unless ``FCOT_MAX_IMAGE_PIXELS`` (or the caller's ``max_pixels``)
sets another; ``0`` turns it off. Training skips and counts a record over the cap
(``image_too_large``, :mod:`fcot.data.records`); an evaluation can do the same with the typed
errors: :class:`ImageTooLargeError` and :class:`ImageDecodeError` (both :class:`ImageError`, a
``ValueError``), whose message names the file, what is wrong and the fix.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image

DEFAULT_MAX_PIXELS = 40_000_000
"""40 Mpx (e.g. 6300 x 6300): far above what InternVL's tiler uses (at most 12 tiles of 448 px,
2.4 Mpx, after resizing), below PIL's 89 Mpx warning; an RGB decode of it is 120 MB."""
ENV = "FCOT_MAX_IMAGE_PIXELS"


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short counter key, ``path`` the file."""

    reason = "unreadable_image"

    def __init__(self, path: str | os.PathLike, message: str):
        super().__init__(message)
        self.path = str(path)


class ImageDecodeError(ImageError):
    """Missing, empty, truncated or not an image."""

    reason = "corrupt_image"


class ImageTooLargeError(ImageError):
    """More pixels than the cap."""

    reason = "image_too_large"


def max_pixels_setting(max_pixels: int | None = None) -> int | None:
    """The cap in effect: ``max_pixels`` if given, else ``FCOT_MAX_IMAGE_PIXELS``, else the default;
    None when it is 0 (no cap). A bad value is a ValueError naming it."""
    if max_pixels is None:
        raw = os.environ.get(ENV)
        if raw is None or raw.strip() == "":
            return DEFAULT_MAX_PIXELS
        try:
            max_pixels = int(raw)
        except ValueError:
            raise ValueError(f"{ENV}={raw!r}: expected a whole number of pixels (0 turns the cap off)") from None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
        raise ValueError(f"max_pixels={max_pixels!r}: expected an int >= 0 (0 turns the cap off)")
    return max_pixels or None


def _too_large(path, width: int, height: int, cap: int) -> ImageTooLargeError:
    return ImageTooLargeError(path, f"{path}: {width} x {height} = {width * height:,} pixels is over the cap of {cap:,}: "
                                    f"downscale the image, or raise the cap with {ENV} (0 turns it off)")


def _open(path: str | os.PathLike) -> Image.Image:
    if not Path(path).is_file():
        raise ImageDecodeError(path, f"{path}: no such image file: fix the record's path or the image root")
    if Path(path).stat().st_size == 0:
        raise ImageDecodeError(path, f"{path}: the image file is empty (0 bytes): copy it again or remove the record")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below decides
            return Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(path, f"{path}: {e}: downscale the image") from None
    except Exception as e:  # PIL raises several types for a file it cannot identify
        raise ImageDecodeError(path, f"{path}: not a readable image ({type(e).__name__}: {e}): "
                                     "copy it again or remove the record") from None


def check_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` from the header only; :class:`ImageError` if unreadable or over the cap."""
    cap = max_pixels_setting(max_pixels)
    with _open(path) as im:
        width, height = im.size
    if cap is not None and width * height > cap:
        raise _too_large(path, width, height, cap)
    return width, height


def load_image(path: str | os.PathLike, *, max_pixels: int | None = None, mode: str | None = "RGB") -> Image.Image:
    """The decoded image (converted to ``mode``; None keeps the file's), checked against the cap
    before decoding. :class:`ImageDecodeError` for a missing, empty, truncated or corrupt file."""
    cap = max_pixels_setting(max_pixels)
    im = _open(path)
    try:
        width, height = im.size
        if cap is not None and width * height > cap:
            raise _too_large(path, width, height, cap)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()  # also closes the file (a single-frame image PIL opened itself)
        except Exception as e:  # a decode error: truncated or corrupt pixel data
            raise ImageDecodeError(path, f"{path}: the image data is truncated or corrupt ({type(e).__name__}: {e}): "
                                         "copy it again or remove the record") from None
    except BaseException:
        im.close()
        raise
    if mode is not None and im.mode != mode:
        converted = im.convert(mode)
        im.close()
        return converted
    return im


__all__ = ["DEFAULT_MAX_PIXELS", "ImageDecodeError", "ImageError", "ImageTooLargeError", "check_image", "load_image",
           "max_pixels_setting"]

"""Reading images and masks robustly.

Every image is returned as ``uint8`` RGB, shape ``(H, W, 3)``, whatever its file mode: grayscale,
palette, RGBA/LA (composited over black), CMYK, 16-bit or 32-bit integer and float PNG/TIFF are
converted, and the EXIF orientation tag is applied so that the pixels are as a person sees them.
Masks are returned as ``bool`` arrays of shape ``(H, W)``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageReadError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: Largest image accepted, in pixels (width * height), checked from the header before decoding: guards
#: against decompression bombs and bounds the memory one image takes while it is scored (a 40 MP image
#: with its anomaly map, mask and overlay stays under 2 GB). The service uses the same limit.
MAX_PIXELS = 40_000_000

ImageLike = Union[str, os.PathLike, np.ndarray, Image.Image]


def is_image_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has one of the supported image extensions (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def check_image_path(path: Path) -> None:
    """Check that ``path`` names a regular file that can be read, without opening a FIFO or a device.

    Raises:
        ImageReadError: missing file, dangling symlink, symlink loop, directory, FIFO, socket or
            device, a name longer than the file system allows, or no read permission.
    """
    import errno
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageReadError(path, "dangling symbolic link" if os.path.islink(path) else "file does not exist") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except OSError as exc:
        why = {errno.ELOOP: "symbolic link loop", errno.ENAMETOOLONG: "file name too long", errno.ENOTDIR: "a parent is not a folder"}
        raise ImageReadError(path, why.get(exc.errno, f"cannot be accessed ({exc.strerror})")) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(path, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(path, "not a regular file (a FIFO, socket or device): refused without reading")
    if not os.access(path, os.R_OK):
        raise ImageReadError(path, "permission denied")


def _open(path: Path, max_pixels: int | None = None) -> Image.Image:
    check_image_path(path)
    try:
        return _decode(path, str(path), MAX_PIXELS if max_pixels is None else max_pixels)
    except OSError as exc:  # raced: removed or changed between the check and the read
        raise ImageReadError(path, f"cannot be read ({exc.strerror or exc})") from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` in pixels of an image file, read from its header only (no pixel decoded).

    Raises:
        ImageReadError: as :func:`check_image_path`, or not a recognised image.
    """
    path = Path(path)
    check_image_path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return int(img.width), int(img.height)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, UnidentifiedImageError) as exc:
        raise ImageReadError(path, f"not a recognised image format ({str(exc)[:120]})") from None


def _decode(src, name: str, max_pixels: int) -> Image.Image:
    """Open and fully decode ``src`` (a path or a binary file object); the size is checked from the
    header, before any pixel is decoded."""
    try:
        with warnings.catch_warnings():  # our own limit is checked below, from the header
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(src)
        if img.width * img.height > max_pixels:
            raise ImageReadError(name, f"{img.width}x{img.height} exceeds the limit of {max_pixels} pixels")
        img.load()  # decode now, so truncated files fail here and not later
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(name, "not a recognised image format (corrupt or not an image)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(name, f"corrupt or truncated ({exc})") from None
    return img


def decode_image(data: bytes, name: str = "<upload>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode image file bytes (an upload) as ``uint8`` RGB ``(H, W, 3)``, like :func:`read_image`.

    Raises:
        ImageReadError: empty, corrupt, truncated, not an image, more than ``max_pixels`` pixels, or
            of an unsupported mode. The message names ``name``.
    """
    import io as _io

    if not data:
        raise ImageReadError(name, "empty file")
    with _decode(_io.BytesIO(data), name, max_pixels) as img:
        return pil_to_rgb(img, name)


def pil_to_rgb(img: Image.Image, name: str = "<image>") -> np.ndarray:
    """Convert a PIL image of any mode to ``uint8`` RGB ``(H, W, 3)``, applying EXIF orientation.

    16-bit and 32-bit integer images are scaled by their type's range (``I;16`` divides by 257);
    float images (mode ``F``) are min-max scaled to 0..255.

    Raises:
        ImageReadError: for a mode that cannot be converted or an image with zero size.
    """
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block must not make a readable image unreadable
        pass
    if img.width == 0 or img.height == 0:
        raise ImageReadError(name, "image has zero width or height")
    mode = img.mode
    if mode in ("RGB",):
        arr = np.asarray(img, dtype=np.uint8)
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        arr = np.asarray(Image.alpha_composite(black, rgba).convert("RGB"), dtype=np.uint8)
    elif mode.startswith("I;16") or mode in ("I", "F"):
        raw = np.asarray(img)
        if mode == "F":
            raw = raw.astype(np.float64)
            lo, hi = float(np.nanmin(raw)), float(np.nanmax(raw))
            scaled = (raw - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(raw)
        elif mode.startswith("I;16") or int(np.max(raw)) <= 65535:
            scaled = raw.astype(np.float64) / 257.0
        else:
            scaled = raw.astype(np.float64) / 16843009.0  # 2**32-1 / 255
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        arr = np.repeat(gray[..., None], 3, axis=2)
    else:
        try:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (ValueError, OSError) as exc:
            raise ImageReadError(name, f"unsupported image mode {mode!r} ({exc})") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageReadError(name, f"could not convert mode {mode!r} to RGB (got shape {arr.shape})")
    return np.ascontiguousarray(arr)


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as ``uint8`` RGB, shape ``(H, W, 3)``.

    Args:
        path: the image file.
        max_pixels: largest image accepted (width x height), checked from the header before any pixel
            is decoded, so memory stays bounded; default :data:`MAX_PIXELS`.

    Raises:
        ImageReadError: the file is missing, a dangling link or link loop, a directory, FIFO or device,
            unreadable, corrupt, truncated, not an image, larger than ``max_pixels``, or of an
            unsupported mode. The message names the file.
    """
    path = Path(path)
    with _open(path, max_pixels) as img:
        return pil_to_rgb(img, str(path))


def read_mask(path: str | os.PathLike, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as ``bool`` ``(H, W)``: every non-zero pixel is anomalous.

    Args:
        path: mask file (any mode; colour masks count a pixel as anomalous when any channel > 0).
        expected_hw: the ``(height, width)`` of the image the mask belongs to, checked if given.

    Raises:
        ImageReadError: unreadable mask file.
        DatasetError: the mask's size differs from ``expected_hw``.
    """
    from .errors import DatasetError

    path = Path(path)
    with _open(path) as img:
        img = ImageOps.exif_transpose(img)
        arr = np.asarray(img)
    mask = arr.reshape(arr.shape[0], arr.shape[1], -1).max(axis=2) > 0
    if expected_hw is not None and tuple(mask.shape) != tuple(expected_hw):
        raise DatasetError(
            f"mask {path} has size {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
            f"{expected_hw[1]}x{expected_hw[0]}"
        )
    return mask


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Turn a path, PIL image or numpy array into ``uint8`` RGB ``(H, W, 3)``.

    Arrays may be ``(H, W)`` gray, ``(H, W, 1|3|4)``, of dtype uint8, uint16 (scaled by 1/257) or float
    in [0, 1]. RGBA arrays drop their alpha channel.

    Raises:
        ImageReadError: unreadable file, or an array of unsupported shape or dtype.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ImageReadError("<array>", f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, got {image.shape}")
        if arr.dtype == np.uint8:
            pass
        elif arr.dtype == np.uint16:
            arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise ImageReadError("<array>", "float image contains NaN or infinity")
            arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
        else:
            raise ImageReadError("<array>", f"unsupported dtype {arr.dtype}")
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        elif arr.shape[2] == 4:
            arr = arr[..., :3]
        return np.ascontiguousarray(arr)
    raise ImageReadError(repr(type(image)), "expected a file path, a PIL image or a numpy array")


def image_name(image: ImageLike, index: int) -> str:
    """A printable name for an input image: its path, or ``<array #index>``."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"<image #{index}>"

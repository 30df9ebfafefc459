"""One set of image decode / validate rules for every image entry point.

Used by the grain pipeline (`pipeline.load_image`), `tools/extract_latents.py`, `tools/ingest.py` and the
record importers (skip and count), and by the inference CLIs (reject with one error naming the file).

Rules, in order:
  1. Bytes that are not an image (Pillow cannot identify them)           -> ImageError('not_image')
  2. More than `max_pixels` pixels (decompression bombs; checked from the
     header, before any pixel is decoded; default Image.MAX_IMAGE_PIXELS) -> ImageError('too_large')
  3. Truncated or corrupt pixel data (the full decode fails)             -> ImageError('truncated')
  4. EXIF orientation is applied (`ImageOps.exif_transpose`), so a photo taken sideways decodes the way
     viewers show it.
  5. Conversion to 8-bit RGB: 16/32-bit integer modes ('I;16', 'I;16B', 'I', ...: 16-bit PNG / TIFF) are
     scaled from the 16-bit range (x / 257, rounded), not clipped -- Pillow's own convert('RGB') clips
     them to 255, which turns a 16-bit image almost white. 'F' (float) images are taken as [0, 1].
     Palette / alpha / CMYK / 1-bit modes use Pillow's conversion (alpha is dropped).
"""
from __future__ import annotations

import io
import struct
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

REASONS = ("not_image", "too_large", "truncated")
RESAMPLING = {"nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX,
              "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "lanczos": Image.Resampling.LANCZOS}
_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;16BS", "I;32", "I;32B")


class ImageError(ValueError):
    """An image that cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _max_pixels(max_pixels: int | None) -> int | None:
    return Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels


def decode(data: bytes, *, draft_size: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Encoded bytes -> oriented 8-bit RGB PIL image, or ImageError (see the module docstring).

    draft_size: for JPEG, let the decoder downscale by a power of two while keeping both sides >= draft_size
    (a large speedup for big photos; the caller resizes afterwards anyway).
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a global someone set would turn rule 3 off silently
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; truncated images would pass as valid")
    try:
        img = Image.open(io.BytesIO(bytes(data)))
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, TypeError) as e:
        raise ImageError("not_image", f"not an image ({type(e).__name__}: {e})") from None
    limit = _max_pixels(max_pixels)
    w, h = img.size
    if limit is not None and w * h > limit:
        raise ImageError("too_large", f"{w}x{h} = {w * h} pixels is over the limit of {limit} "
                                      "(decompression bomb guard)")
    if w < 1 or h < 1:
        raise ImageError("not_image", f"empty image ({w}x{h})")
    try:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()  # the full decode: truncated / corrupt pixel data raises here
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        raise ImageError("truncated", f"corrupt or truncated image data ({type(e).__name__}: {e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, scaling high-bit-depth modes instead of clipping them."""
    if img.mode == "RGB":
        return img
    if img.mode in _INT_MODES:
        x = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(x / 257.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        x = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def fit(img: Image.Image, size: int, resample: str = "bicubic") -> Image.Image:
    """Resize the shorter side to `size` and centre crop to size x size."""
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), method=RESAMPLING[resample])
    return img


def to_float(img: Image.Image) -> np.ndarray:
    """uint8 RGB image -> float32 in [-1, 1]."""
    x = np.asarray(img).astype(np.float32)
    x *= 2.0 / 255.0
    x -= 1.0
    return x


def load(data, size: int, resample: str = "bicubic", *, max_pixels: int | None = None) -> np.ndarray:
    """Encoded bytes (or an HxWx3 uint8 array) -> [size, size, 3] float32 in [-1, 1] (resize shorter side,
    centre crop). Raises ImageError (a ValueError) on unusable input."""
    if isinstance(data, np.ndarray):
        img = Image.fromarray(data.astype(np.uint8))
    else:
        img = decode(data, draft_size=size, max_pixels=max_pixels)
    return to_float(fit(img.convert("RGB"), size, resample))


def read_file(path: str, open_fn: Callable | None = None) -> bytes:
    """The bytes of an image file through the path layer (local or remote: see unifluid_jax/fs.py)."""
    if open_fn is None:
        from unifluid_jax import fs
        return fs.read_bytes(path)
    with open_fn(path, "rb") as f:
        return f.read()


def load_file(path: str, size: int, resample: str = "bicubic", *, max_pixels: int | None = None) -> np.ndarray:
    """`load` on a file; ImageError naming the file (for entry points that reject instead of skip)."""
    try:
        data = read_file(path)
    except OSError as e:
        raise ImageError("not_image", f"image {path!r} cannot be read: {e}") from None
    try:
        return load(data, size, resample, max_pixels=max_pixels)
    except ImageError as e:
        raise ImageError(e.reason, f"image {path!r}: {e}; replace or remove the file") from None


def reencode(img: Image.Image, max_side: int = 0, fmt: str = "JPEG", quality: int = 95) -> bytes:
    """Optionally shrink so the longer side is <= max_side (aspect kept, bicubic), then encode. Deterministic
    for given Pillow / libjpeg versions."""
    if max_side and max(img.size) > max_side:
        w, h = img.size
        s = max_side / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if fmt.upper() == "JPEG":
        img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    else:
        img.save(buf, format=fmt.upper())
    return buf.getvalue()

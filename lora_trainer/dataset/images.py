"""Image files as the dataset sees them: which names are images, whether a file really decodes (checked
at scan time, so a truncated download is skipped with a message instead of failing the run during
latent caching), its upright size, and its pixels as RGB the same way for the scan and for training.

Conversions a user expects without asking: EXIF orientation applied (the size used for buckets is the
upright one), CMYK and palette images to RGB, 16-bit images scaled to 8 bits (not clipped to white),
transparent areas flattened on white.
"""
from __future__ import annotations

import errno
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

# What trains (kohya's list). Other image types are skipped with a message saying how to convert them.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SUPPORTED_TEXT = "png, jpg, jpeg, webp, bmp"
UNSUPPORTED_EXTENSIONS = (".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".jfif", ".jpe", ".jp2",
                          ".svg", ".ico", ".psd", ".apng", ".tga", ".exr", ".hdr", ".dng", ".cr2", ".nef", ".arw")
LARGE_PIXELS = 25_000_000   # above this an image trains fine but is slow to decode: say so
ORIENTATION_TAG = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


class BadImage(Exception):
    """A file that cannot train; ``why`` says what is wrong with it and what to do."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


@dataclass(frozen=True)
class ImageInfo:
    size: Tuple[int, int]       # (width, height) upright, after the EXIF orientation
    mode: str                   # Pillow's mode as stored: RGB, RGBA, P, CMYK, I;16, ...
    transparent: bool           # some pixel is (partly) transparent: it trains on white
    frames: int                 # > 1 for animated files: the first frame trains


def extension(path: Path) -> str:
    """The lower-case extension; a name that is only an extension (".png") counts as that extension."""
    name = path.name.lower()
    suffix = Path(name).suffix
    return suffix or (name if name.startswith(".") and name.count(".") == 1 else "")


def unsupported_why(path: Path) -> str:
    ext = extension(path)
    if ext == ".gif":
        frames = _frames(path)
        what = f"an animated GIF ({frames} frames)" if frames > 1 else "a GIF"
        fix = "save the frame you want as PNG" if frames > 1 else "convert it to PNG"
        return f"{what}: GIF is not a training format ({SUPPORTED_TEXT}): {fix}, or remove it"
    if ext in (".jfif", ".jpe"):
        return f"{ext} is not a training format ({SUPPORTED_TEXT}), but it is a JPEG: rename it to .jpg"
    return f"{ext} is not a training format ({SUPPORTED_TEXT}): convert it to PNG or JPEG, or remove it"


def _frames(path: Path) -> int:
    try:
        from PIL import Image
        with Image.open(path) as im:
            return int(getattr(im, "n_frames", 1))
    except Exception:
        return 1


# ------------------------------------------------------------------ checking a file
_cache: Dict[tuple, object] = {}   # (path, size, times, inode) -> ImageInfo or BadImage: re-checks are free
_CACHE_MAX = 50_000
_strict_lock = threading.Lock()


def inspect_image(path: Path) -> ImageInfo:
    """Decode ``path`` fully (JPEGs at 1/8 scale: every byte is still read) and describe it.
    Raises :class:`BadImage` with the reason and the fix."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise BadImage(os_error_why(e, path)) from None
    if st.st_size == 0:
        raise BadImage("empty file (0 bytes): download it again or remove it")
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)   # ctime: a chmod counts too
    hit = _cache.get(key)
    if hit is None:
        try:
            hit = _decode(path)
        except BadImage as e:
            hit = e
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[key] = hit
    if isinstance(hit, BadImage):
        raise BadImage(hit.why)
    return hit  # type: ignore[return-value]


def _decode(path: Path) -> ImageInfo:
    from PIL import Image
    try:
        with strict_decoding(), Image.open(path) as im:
            w, h = im.size
            # animation formats only: a camera's MPO (photo + preview) or a multi-page TIFF is no animation
            frames = int(getattr(im, "n_frames", 1)) if im.format in ("GIF", "PNG", "WEBP") else 1
            turned = _orientation(im) in _SWAPS_SIDES
            mode = im.mode
            if im.format in ("JPEG", "MPO"):
                im.draft(None, (max(1, w // 8), max(1, h // 8)))
            im.load()
            transparent = _has_transparency(im)
    except Exception as e:  # Pillow raises many types for bad files; each becomes a message
        raise BadImage(decode_error_why(e, path)) from None
    return ImageInfo((h, w) if turned else (w, h), mode, transparent, frames)


@contextmanager
def strict_decoding():
    """Truncated files raise even where something set Pillow's LOAD_TRUNCATED_IMAGES (some WebUI extensions
    do): a half image would otherwise train as grey."""
    from PIL import ImageFile
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _strict_lock:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = True


def _orientation(im) -> int:
    try:
        return int(im.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # a damaged EXIF block: the pixels are still fine
        return 1


def _has_transparency(im) -> bool:
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return im.getchannel("A").getextrema()[0] < 255
    if "transparency" in im.info and im.mode in ("P", "L", "RGB", "1"):
        return im.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return False


def os_error_why(e: OSError, path: Path) -> str:
    if isinstance(e, PermissionError) or e.errno == errno.EACCES:
        return "cannot be read (permission denied): give your user read access (chmod a+r) or remove it"
    if e.errno == errno.ELOOP:
        return "a symbolic link that loops back on itself: replace it with the image file or remove it"
    if e.errno == errno.ENOENT and path.is_symlink():
        return f"a symbolic link to a missing file ({os.readlink(path)}): replace it with the image file or remove it"
    if e.errno == errno.ENOENT:
        return "was removed while the dataset was read: put it back or start again"
    return f"cannot be read ({e.strerror or type(e).__name__}): check the file, or remove it"


def decode_error_why(e: BaseException, path: Path) -> str:
    from PIL import Image, UnidentifiedImageError
    text = str(e)
    if isinstance(e, Image.DecompressionBombError):
        return (f"too large to open safely ({text.split(',')[0]}): downscale it (about 2048 px on the long side "
                "is plenty) or remove it")
    if isinstance(e, UnidentifiedImageError):
        head = _head(path).lstrip().lower()
        if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<svg")) or b"<html" in head:
            return ("not an image but a web page (HTML/XML) saved under an image name: download the image "
                    "itself, or remove it")
        return (f"not an image (its content is not {SUPPORTED_TEXT} data, or it is damaged from the start): "
                "download it again, or remove it")
    if isinstance(e, OSError) and "truncated" in text.lower():
        return ("truncated: the file ends before the image does (an interrupted download or copy): download it "
                "again, or remove it")
    if isinstance(e, OSError) and e.errno is not None:
        return os_error_why(e, path)
    detail = text.splitlines()[0][:120] if text else type(e).__name__
    return f"damaged: its image data does not decode ({detail}): download it again, or remove it"


def _head(path: Path, n: int = 512) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


# ------------------------------------------------------------------ pixels
def open_rgb(path: Path):
    """The image upright, as 8-bit RGB (a Pillow image). Raises :class:`BadImage`."""
    from PIL import Image
    path = Path(path)
    try:
        with strict_decoding(), Image.open(path) as im:
            im.load()
            sixteen_bit = im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG")
            im = upright(im)
            return to_rgb(im, sixteen_bit)
    except Exception as e:  # Pillow raises many types for bad files; each becomes a message
        raise BadImage(decode_error_why(e, path)) from None


def upright(im):
    """Apply the EXIF orientation (phones store portraits sideways with a tag saying so)."""
    if _orientation(im) == 1:
        return im
    from PIL import ImageOps
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a damaged EXIF block: train it as stored
        return im


def to_rgb(im, sixteen_bit: Optional[bool] = None):
    """8-bit RGB: 16-bit greys scaled (Pillow's own convert clips them to white), transparency on white."""
    from PIL import Image
    import numpy as np
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        if sixteen_bit is None:
            sixteen_bit = im.mode.startswith("I;16")
        if im.mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        elif sixteen_bit or (a.size and a.max() > 255):
            a = a / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if "transparency" in im.info and im.mode in ("P", "L", "RGB", "1"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    return im.convert("RGB")  # a copy even when already RGB: the opened file's image is closed after this

"""Safe image decoding: untrusted bytes in, an RGB image out, or a typed rejection.

Every image that enters defectkit (validation, preprocessing, evaluation of raw
files, the model server) is decoded here, so one set of rules decides what a
valid image is:

- only the formats in ``ALLOWED_FORMATS`` are parsed at all, so Pillow's rarer
  and less hardened format plugins never see untrusted data;
- the pixel count is checked from the header before any pixel is decoded;
- the file name's extension must match the real format (renamed files are
  often mislabelled or the product of a broken export);
- EXIF orientation is applied and every pixel mode is converted to RGB by an
  explicit rule (alpha over white, 16-bit and float scaled by their real range).

Bad data only ever raises :class:`ImageRejected`, whose ``reason`` is a short
code that validation counts and quarantines by.

GPU-safe: Pillow and numpy only.
"""

from __future__ import annotations

import ctypes
import io
import re
import weakref
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, ImageOps

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
DEFAULT_MAX_PIXELS = 50_000_000

EXTENSION_FORMATS: dict[str, str] = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
}

REASONS = ("empty", "unsupported_format", "corrupt", "truncated", "too_large", "too_small", "extension_mismatch")

# Leading bytes of the allowed formats: bytes that start like an allowed format but
# fail to open are a damaged file ("corrupt"), anything else is another format.
_ALLOWED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
)

# Only used to name the format in the rejection message.
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"%PDF", "PDF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x1f\x8b", "gzip"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML"),
    (b"P1", "PBM"),
    (b"P4", "PBM"),
    (b"P5", "PGM"),
    (b"P6", "PPM"),
)

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_WHITE = (255, 255, 255, 255)
# Pixels scaled to 8 bits at a time: a few MB of float64 whatever the image size.
_SCALE_CHUNK = 1 << 20
# Decoding more pixels than this hands the freed buffers back to the operating system afterwards (see _release).
RELEASE_PIXELS = 8_000_000


class ImageRejected(ValueError):
    """Bytes that are not a usable image; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; expected one of {REASONS}")
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep reason and detail across process boundaries (multiprocessing)
        return (type(self), (self.reason, self.detail))


@dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow format name, one of ALLOWED_FORMATS
    width: int  # as stored, before EXIF orientation
    height: int
    mode: str  # pixel mode as found in the file, before conversion to RGB


def decode(
    data: bytes,
    *,
    name: str = "",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> tuple[Image.Image, ImageInfo]:
    """Decode untrusted image bytes to a loaded RGB image and what the header said.

    ``name`` (a file name or path) names the file in rejections and enables the
    extension check. ``draft=(w, h)`` lets a JPEG decode at 1/2, 1/4 or 1/8 scale
    when that still gives at least ``w x h`` pixels (after EXIF orientation); the
    image is then smaller than the stored size given in the returned ImageInfo.
    Raises ImageRejected, and nothing else, for bad data.
    """
    if draft is not None and (len(draft) != 2 or min(draft) < 1):
        raise ValueError(f"draft must be a positive (width, height), got {draft!r}")
    label = f"{name}: " if name else ""
    if not data:
        raise ImageRejected("empty", f"{label}file is empty (0 bytes)")
    image = _open(data, label)
    # Pillow reports camera JPEGs with a multi-picture extension (stereo, depth) as MPO; the first
    # picture is an ordinary JPEG, which is what gets decoded.
    fmt = "JPEG" if image.format == "MPO" else image.format or ""
    info = ImageInfo(fmt, image.width, image.height, image.mode)
    _check_extension(name, info.format, label)
    pixels = info.width * info.height
    if pixels > max_pixels:
        raise ImageRejected(
            "too_large",
            f"{label}{info.width}x{info.height} {info.format} has {pixels:,} pixels, more than the limit of "
            f"{max_pixels:,}; downscale the image or raise max_pixels",
        )
    if info.width < 1 or info.height < 1:
        raise ImageRejected("corrupt", f"{label}{info.format} header declares a {info.width}x{info.height} image")
    try:
        if draft is not None:
            _apply_draft(image, draft)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        rgb = _to_rgb(image, label)
        if max(pixels, image.width * image.height) >= RELEASE_PIXELS:
            weakref.finalize(rgb, _release)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too_large", f"{label}too large to decode safely: {exc}") from exc
    except Exception as exc:  # Pillow's plugins raise many types for bad pixel data; all mean unusable bytes
        reason = "truncated" if _looks_truncated(exc, data, info.format) else "corrupt"
        if pixels >= RELEASE_PIXELS:  # the pixels were allocated before the data ran out or went wrong
            image.close()
            _release()
        raise ImageRejected(reason, f"{label}{info.format} pixel data cannot be decoded ({reason}): {exc}") from exc
    return rgb, info


def _open(data: bytes, label: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too_large", f"{label}too large to decode safely: {exc}") from exc
    except Exception as exc:  # UnidentifiedImageError, SyntaxError, struct.error, ...: all mean unusable bytes
        allowed = _sniff(data, _ALLOWED_SIGNATURES) or _sniff_webp(data)
        if allowed is None:
            other = _sniff(data, _OTHER_SIGNATURES) or ("text" if _is_text(data) else "an unknown format")
            raise ImageRejected(
                "unsupported_format",
                f"{label}file is {other}, not one of the accepted formats {', '.join(ALLOWED_FORMATS)}",
            ) from exc
        reason = "truncated" if _looks_truncated(exc, data, allowed) else "corrupt"
        # Pillow names the in-memory buffer with its address; keep reports identical between runs.
        message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
        raise ImageRejected(reason, f"{label}file starts like {allowed} but cannot be opened ({reason}): {message}") \
            from exc


def _check_extension(name: str, real_format: str, label: str) -> None:
    if not name:
        return
    suffix = PurePosixPath(name.replace("\\", "/")).suffix.lower()
    if not suffix:
        return  # nothing claimed, nothing to contradict (e.g. bytes posted to the model server)
    claimed = EXTENSION_FORMATS.get(suffix)
    if claimed != real_format:
        expected = ", ".join(ext for ext, fmt in EXTENSION_FORMATS.items() if fmt == real_format)
        what = f"says {claimed}" if claimed else "is not an image extension we accept"
        raise ImageRejected(
            "extension_mismatch",
            f"{label}extension {suffix!r} {what} but the content is {real_format}; rename the file to {expected}",
        )


def _apply_draft(image: Image.Image, size: tuple[int, int]) -> None:
    width, height = size
    # Orientations 5-8 swap the axes, so the requested size applies to the transposed image.
    if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
        width, height = height, width
    image.draft(image.mode, (width, height))  # a no-op for every format but JPEG


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and not image.has_transparency_data:
        return image
    if mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_scale_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode in _ALPHA_MODES or image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "RGBX"):
        return image.convert("RGB")
    raise ImageRejected("unsupported_format", f"{label}pixel mode {mode} cannot be converted to RGB")


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc (musl, macOS): its allocator returns large blocks by itself
        return None


_MALLOC_TRIM = _malloc_trim()


def _release() -> None:
    """Give freed heap memory back to the operating system.

    A large image passes through buffers of tens to hundreds of MB (Pillow's 16 MB blocks, numpy copies,
    mode conversions). glibc serves blocks under its mmap threshold, which rises to 32 MB once a larger
    block was freed, from per-thread arenas and keeps them when they are freed: a model server that decoded
    a few 50-megapixel images in its decode threads stays hundreds of MB larger for good. Called when the
    decoded image of a large one is dropped, by which time its intermediate buffers are gone too.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Stretch the range actually used onto 0-255: a 12-bit sensor in a 16-bit file must not come out black.

    Works through the pixels a chunk at a time: converting a 50-megapixel 16-bit or float image in one go
    takes several float64 copies of it (about 1.6 GB and seconds), which lets one small, highly
    compressible file exhaust a model server's memory.
    """
    flat = values.reshape(-1)
    out = np.zeros(flat.shape, np.uint8)
    low, high = _finite_range(flat)
    if low is None:
        return out.reshape(values.shape)
    if high <= low:
        # A constant image has no range to stretch: place it on the nominal scale of its type.
        nominal = 1.0 if mode == "F" else 65535.0
        out[:] = np.clip(np.rint(low * 255.0 / nominal), 0, 255)
        return out.reshape(values.shape)
    factor = 255.0 / (high - low)
    # A damaged float image can hold signalling NaNs, whose conversion to float64 raises numpy's "invalid"
    # warning; they are set to 0 on the next line like every other non-finite value.
    with np.errstate(invalid="ignore"):
        for start in range(0, flat.size, _SCALE_CHUNK):
            chunk = flat[start:start + _SCALE_CHUNK].astype(np.float64)
            chunk[~np.isfinite(chunk)] = 0.0
            out[start:start + _SCALE_CHUNK] = np.clip(np.rint((chunk - low) * factor), 0, 255)
    return out.reshape(values.shape)


def _finite_range(flat: np.ndarray) -> tuple[float | None, float]:
    """(lowest, highest) finite value of a 1-D array, or (None, 0.0) when it holds none."""
    if flat.size == 0:
        return None, 0.0
    if flat.dtype.kind in "iub":
        return float(flat.min()), float(flat.max())
    low, high = np.inf, -np.inf
    for start in range(0, flat.size, _SCALE_CHUNK):
        chunk = flat[start:start + _SCALE_CHUNK]
        chunk = chunk[np.isfinite(chunk)]
        if chunk.size:
            low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    return (None, 0.0) if low > high else (low, high)


def _sniff(data: bytes, signatures: tuple[tuple[bytes, str], ...]) -> str | None:
    return next((fmt for magic, fmt in signatures if data.startswith(magic)), None)


def _sniff_webp(data: bytes) -> str | None:
    return "WEBP" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else None


def _is_text(data: bytes) -> bool:
    head = data[:4096]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # a multi-byte character cut at the end of the sample
    return b"\x00" not in head


def _looks_truncated(exc: Exception, data: bytes, fmt: str) -> bool:
    if "truncated" in str(exc).lower():
        return True
    if isinstance(exc, EOFError):
        return True
    if fmt == "PNG":
        return b"IEND" not in data[-64:]
    if fmt == "WEBP" and len(data) >= 8:
        return int.from_bytes(data[4:8], "little") + 8 > len(data)  # RIFF size says more bytes follow
    return False

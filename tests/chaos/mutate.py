"""A seeded mutator of real images: bad input for the model server and the dataset validation, reproducibly.

``originals`` encodes real pictures (the synthetic sample's JPEGs and masks and,
where scikit-image is installed, crops of its texture photographs) in every
format and pixel mode the decoder accepts. ``corpus(originals, count, seed)``
derives ``count`` files from them; file ``i`` depends only on ``(seed, i)``, so
any one file can be regenerated on its own to reproduce a failure.

Each file carries the outcome it must get where that is certain (``expect``):
an untouched original must be accepted, a zero-byte file must be rejected as
``empty``, a header declaring 60000x60000 pixels as ``too_large``, and so on.
Blind mutations (bit flips, truncations, insertions) may or may not still
decode, so they expect nothing but a clear answer.

    python -m tests.chaos.mutate OUT [--count 1000 --seed 0]   # writes the corpus as files
"""

from __future__ import annotations

import argparse
import gzip
import io
import random
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

ACCEPTED = "accepted"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers of every JPEG coding process: they carry precision, height, width and components.
JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
BOMB_SIDE = 60_000  # declared in a header; 3.6e9 pixels, far over any pixel limit
SIDE = 96  # of the photograph crops: small, so that the corpus is quick to decode


@dataclass(frozen=True)
class Original:
    """A real, well-formed image file."""

    name: str  # a file name with the extension of its format
    data: bytes
    format: str  # Pillow's format name


@dataclass(frozen=True)
class Mutant:
    """One file of the corpus.

    ``expect`` holds the outcomes it may get from ``defectkit.image.decode`` given its
    ``name`` (:data:`ACCEPTED` or an ``ImageRejected`` reason); empty where any clear
    answer will do. ``expect_bytes`` is the same without the name, as the model server
    sees the file (no extension to contradict).
    """

    index: int
    kind: str
    source: str
    name: str
    data: bytes
    expect: tuple[str, ...] = ()
    expect_bytes: tuple[str, ...] = ()

    @property
    def stem(self) -> str:
        return f"{self.index:05d}-{self.kind}"


# ---------------------------------------------------------------------------------------------- originals


def _encode(picture: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _variants(label: str, rgb: Image.Image) -> list[Original]:
    """``rgb`` in every accepted format and in the pixel modes the decoder converts by its own rules."""
    grey = rgb.convert("L")
    wide = np.asarray(grey, np.uint16) * 257 + np.arange(grey.width, dtype=np.uint16)  # uses the 16-bit range
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    oriented = rgb.getexif()
    oriented[0x0112] = 6  # EXIF orientation: rotate 90 degrees on display
    encodings = [
        ("jpg", "JPEG", rgb, {"quality": 90}),
        ("jpg", "JPEG", rgb, {"quality": 75, "progressive": True, "optimize": True}),
        ("jpg", "JPEG", grey, {"quality": 85}),
        ("jpg", "JPEG", rgb.convert("CMYK"), {"quality": 85}),
        ("jpg", "JPEG", rgb, {"quality": 85, "exif": oriented.tobytes()}),
        ("png", "PNG", rgb, {}),
        ("png", "PNG", grey, {}),
        ("png", "PNG", Image.fromarray(wide), {}),
        ("png", "PNG", rgb.quantize(64), {}),
        ("png", "PNG", rgba, {}),
        ("bmp", "BMP", rgb, {}),
        ("tif", "TIFF", rgb, {"compression": "tiff_lzw"}),
        ("tif", "TIFF", grey, {}),
        ("tif", "TIFF", Image.fromarray(np.asarray(grey, np.float32) / 255.0), {}),
        ("tif", "TIFF", Image.fromarray(np.asarray(wide, np.int32) * 16 - 300_000), {"compression": "tiff_adobe_deflate"}),
        ("webp", "WEBP", rgb, {"quality": 80}),
        ("webp", "WEBP", rgba, {"lossless": True}),
    ]
    return [Original(f"{label}-{i:02d}.{ext}", _encode(picture, fmt, **options), fmt)
            for i, (ext, fmt, picture, options) in enumerate(encodings)]


def originals(work_dir: Path, *, photographs: bool = True) -> list[Original]:
    """Real images: the synthetic sample's own files (JPEG images, PNG masks), each re-encoded in every accepted
    format and mode, and the same for crops of scikit-image's texture photographs when it is installed."""
    from defectkit.synthetic import generate_sample

    sample = work_dir / "synthetic-sample"
    generate_sample(sample, count=40, size=64, seed=0)
    files = sorted(p for p in sample.rglob("*") if p.is_file())
    jpegs = [p for p in files if p.suffix == ".jpg"][:6]
    masks = [p for p in files if p.name.endswith("_mask.png")][:3]
    found = [Original(f"synthetic-{p.stem}{p.suffix}", p.read_bytes(), "JPEG" if p.suffix == ".jpg" else "PNG")
             for p in (*jpegs, *masks)]
    for path in jpegs[:2]:
        found += _variants(f"synthetic-{path.stem}", Image.open(path).convert("RGB"))
    if photographs:
        for surface, rgb in _photograph_crops():
            found += _variants(f"photo-{surface}", rgb)
    return found


def _photograph_crops() -> list[tuple[str, Image.Image]]:
    try:
        from tests.photos import PHOTOGRAPHS, crop
    except ImportError:  # scikit-image is a test extra; the synthetic sample alone still covers every format
        return []
    crops = []
    for k, surface in enumerate(PHOTOGRAPHS):
        try:
            pixels = crop(np.random.default_rng([7, k]), surface, SIDE)
        except (ImportError, FileNotFoundError, ModuleNotFoundError):
            return []
        crops.append((surface, Image.fromarray(np.rint(pixels * 255).astype(np.uint8))))
    return crops


# ---------------------------------------------------------------------------------------------- structure


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each chunk of a well-formed PNG."""
    chunks, at = [], len(PNG_SIGNATURE)
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        chunks.append((kind, data[at + 8:at + 8 + length]))
        at += 12 + length
    return chunks


def png_chunk(kind: bytes, payload: bytes, *, crc: int | None = None) -> bytes:
    """One PNG chunk; its CRC is right unless ``crc`` says otherwise."""
    value = zlib.crc32(kind + payload) if crc is None else crc
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", value & 0xFFFFFFFF)


def png_build(chunks: Sequence[tuple[bytes, bytes]]) -> bytes:
    return PNG_SIGNATURE + b"".join(png_chunk(kind, payload) for kind, payload in chunks)


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset of the marker, offset after the segment) of each header segment up to and including SOS."""
    segments, at = [], 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        segments.append((marker, at, at + 2 + length))
        if marker == 0xDA:
            break
        at += 2 + length
    return segments


def _jpeg_sof(data: bytes) -> int:
    """Offset of the start-of-frame marker; every JPEG the originals hold has one."""
    return next(start for marker, start, _ in jpeg_segments(data) if marker in JPEG_SOF)


def _tiny_png(width: int, height: int) -> bytes:
    """A valid PNG header for ``width`` x ``height`` grey pixels with a few real rows of data (the rest missing)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * min(width + 1, 4096) * 4)
    return png_build([(b"IHDR", ihdr), (b"IDAT", rows), (b"IEND", b"")])


# ---------------------------------------------------------------------------------------------- mutations
# Each takes the generator and an original and returns (bytes, file extension or None for the original's,
# expected outcomes by name, expected outcomes by bytes alone).

Mutation = Callable[[random.Random, Original], tuple[bytes, str | None, tuple[str, ...], tuple[str, ...]]]
ANY: tuple[str, ...] = ()
REJECTED_AS_DAMAGED = ("corrupt", "truncated")


def _intact(rng: random.Random, o: Original):
    return o.data, None, (ACCEPTED,), (ACCEPTED,)


def _bit_flips(rng: random.Random, o: Original):
    data = bytearray(o.data)
    for _ in range(rng.choice((1, 1, 2, 4, 8, 32))):
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    return bytes(data), None, ANY, ANY


def _byte_run(rng: random.Random, o: Original):
    data = bytearray(o.data)
    at = rng.randrange(len(data))
    run = rng.randint(1, 16)
    data[at:at + run] = bytes(rng.choice((0x00, 0xFF, rng.randrange(256))) for _ in range(run))
    return bytes(data[:len(o.data)]), None, ANY, ANY


def _truncate(rng: random.Random, o: Original):
    # Mostly in the pixel data, sometimes inside the header.
    cut = rng.randrange(1, 64) if rng.random() < 0.2 else rng.randrange(len(o.data) // 4, len(o.data))
    return o.data[:cut], None, ANY, ANY


def _insert(rng: random.Random, o: Original):
    at = rng.randrange(len(o.data))
    extra = rng.randbytes(rng.choice((1, 3, 16, 64, 512)))
    return o.data[:at] + extra + o.data[at:], None, ANY, ANY


def _delete(rng: random.Random, o: Original):
    at = rng.randrange(len(o.data))
    return o.data[:at] + o.data[at + rng.choice((1, 2, 16, 64, 512)):], None, ANY, ANY


def _splice(rng: random.Random, o: Original):
    """A chunk of the file repeated elsewhere in it."""
    start = rng.randrange(len(o.data))
    piece = o.data[start:start + rng.randint(8, 2048)]
    at = rng.randrange(len(o.data))
    return o.data[:at] + piece + o.data[at:], None, ANY, ANY


def _stacked(rng: random.Random, o: Original):
    data = o.data
    for _ in range(rng.randint(2, 4)):
        step = rng.choice((_bit_flips, _byte_run, _truncate, _insert, _delete, _splice))
        data = step(rng, Original(o.name, data or b"\x00", o.format))[0]
    return data, None, ANY, ANY


def _png_header(rng: random.Random, o: Original):
    chunks = png_chunks(o.data)
    ihdr = bytearray(chunks[0][1])
    choice = rng.randrange(8)
    if choice == 0:  # width and height, CRC kept valid
        struct.pack_into(">II", ihdr, 0, rng.randrange(0, 70_000), rng.randrange(0, 70_000))
    elif choice == 1:  # a zero side
        struct.pack_into(">I", ihdr, rng.choice((0, 4)), 0)
    elif choice == 2:  # bit depth not allowed for the colour type
        ihdr[8] = rng.choice((0, 3, 5, 7, 12, 32, 255))
    elif choice == 3:  # colour type that does not exist
        ihdr[9] = rng.choice((1, 5, 7, 8, 255))
    elif choice == 4:  # compression, filter or interlace method that does not exist
        ihdr[rng.choice((10, 11, 12))] = rng.randint(2, 255)
    elif choice == 5:  # IHDR's CRC wrong
        body = png_chunk(b"IHDR", bytes(ihdr), crc=zlib.crc32(b"IHDR" + bytes(ihdr)) ^ (1 << rng.randrange(32)))
        return PNG_SIGNATURE + body + b"".join(png_chunk(k, p) for k, p in chunks[1:]), None, ANY, ANY
    elif choice == 6:  # no IHDR first
        return png_build(chunks[1:] + chunks[:1]), None, REJECTED_AS_DAMAGED, REJECTED_AS_DAMAGED
    else:  # an IDAT with a wrong CRC or no IEND
        if rng.random() < 0.5:
            return png_build([c for c in chunks if c[0] != b"IEND"]), None, ANY, ANY
        out = PNG_SIGNATURE
        for kind, payload in chunks:
            crc = zlib.crc32(kind + payload) ^ 1 if kind == b"IDAT" else None
            out += png_chunk(kind, payload, crc=crc)
        return out, None, ANY, ANY
    return png_build([(b"IHDR", bytes(ihdr)), *chunks[1:]]), None, ANY, ANY


def _jpeg_header(rng: random.Random, o: Original):
    data = bytearray(o.data)
    sof = _jpeg_sof(o.data)
    choice = rng.randrange(7)
    if choice == 0:  # no SOI
        return bytes(data[2:]), None, ("unsupported_format",), ("unsupported_format",)
    if choice == 1:  # height and width
        struct.pack_into(">HH", data, sof + 5, rng.randrange(0, 65536), rng.randrange(0, 65536))
    elif choice == 2:  # a zero side
        struct.pack_into(">H", data, sof + rng.choice((5, 7)), 0)
    elif choice == 3:  # sample precision other than 8 bits
        data[sof + 4] = rng.choice((0, 1, 12, 16, 255))
    elif choice == 4:  # component count or a component's sampling factors
        data[sof + rng.choice((9, 11))] = rng.choice((0, 2, 5, 0x44, 0xFF))
    elif choice == 5:  # a quantisation or Huffman table damaged
        tables = [(start, end) for marker, start, end in jpeg_segments(o.data) if marker in (0xDB, 0xC4)]
        start, end = rng.choice(tables)
        for _ in range(4):
            data[rng.randrange(start + 4, end)] = rng.randrange(256)
    else:  # the image data cut after its scan header, or no end-of-image marker
        sos_end = [end for marker, _, end in jpeg_segments(o.data) if marker == 0xDA][-1]
        cut = sos_end + rng.randrange(0, 32) if rng.random() < 0.5 else len(data) - 2
        return bytes(data[:cut]), None, ANY, ANY
    return bytes(data), None, ANY, ANY


def _named_as_other_format(rng: random.Random, o: Original):
    """An intact image under another format's extension."""
    extension = rng.choice([e for e, f in (("jpg", "JPEG"), ("png", "PNG"), ("bmp", "BMP"), ("webp", "WEBP"),
                                           ("tif", "TIFF"), ("gif", "GIF"), ("txt", "text")) if f != o.format])
    return o.data, extension, ("extension_mismatch",), (ACCEPTED,)


def _wrong_signature(rng: random.Random, o: Original):
    """The first bytes of another accepted format over the real ones: starts like it, is not it."""
    if o.format == "PNG":
        return b"\xff\xd8\xff\xe0" + o.data[4:], None, REJECTED_AS_DAMAGED, REJECTED_AS_DAMAGED
    prefix = rng.random() < 0.5
    data = PNG_SIGNATURE + o.data if prefix else PNG_SIGNATURE + o.data[len(PNG_SIGNATURE):]
    return data, None, REJECTED_AS_DAMAGED, REJECTED_AS_DAMAGED


_TEXTS = (
    b"this is not an image\n",
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>\n",
    b'{"error": "AccessDenied", "message": "Access Denied"}',
    b"<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code></Error>",
    b"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"60000\" height=\"60000\"></svg>",
    b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 123\n",
    "défaut détecté: \u26a0\n".encode(),
    b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
)


def _other_format(rng: random.Random, o: Original):
    """Text, HTML, a zip or gzip of the image, a GIF: not an image format the decoder accepts."""
    choice = rng.randrange(5)
    if choice == 0:
        data = rng.choice(_TEXTS) * rng.choice((1, 1, 50))
    elif choice == 1:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr(o.name, o.data)
        data = buffer.getvalue()
    elif choice == 2:
        data = gzip.compress(o.data, mtime=0)
    elif choice == 3:
        data = _encode(Image.open(io.BytesIO(o.data)).convert("RGB"), "GIF")
    else:
        data = rng.randbytes(rng.choice((1, 7, 100, 4096)))
        if data[:1] in (b"\xff", b"\x89", b"B", b"I", b"M", b"R"):  # by chance the start of an accepted format
            data = b"\x00" + data
    return data, None, ("unsupported_format",), ("unsupported_format",)


def _declared_huge(rng: random.Random, o: Original):
    """A tiny file whose header declares far more pixels than any limit allows."""
    side = rng.choice((BOMB_SIDE, 20_000, 65_000))
    if rng.random() < 0.5:
        return _tiny_png(side, side), "png", ("too_large",), ("too_large",)
    if o.format == "PNG":
        chunks = png_chunks(o.data)
        ihdr = bytearray(chunks[0][1])
        struct.pack_into(">II", ihdr, 0, side, side)
        return png_build([(b"IHDR", bytes(ihdr)), *chunks[1:]]), None, ("too_large",), ("too_large",)
    data = bytearray(o.data)
    struct.pack_into(">HH", data, _jpeg_sof(o.data) + 5, side, side)
    return bytes(data), None, ("too_large",), ("too_large",)


def _empty(rng: random.Random, o: Original):
    return b"", None, ("empty",), ("empty",)


@lru_cache(maxsize=1)
def _inflates_to_64_mib() -> bytes:
    return zlib.compress(bytes(64 << 20), 9)


def _text_chunk_bomb(rng: random.Random, o: Original):
    """A small PNG carrying a compressed text or ICC profile chunk that inflates to 64 MiB."""
    chunks = png_chunks(o.data)
    bomb = _inflates_to_64_mib()
    kind, payload = rng.choice(((b"zTXt", b"Comment\x00\x00" + bomb),
                                (b"iTXt", b"Comment\x00\x01\x00\x00\x00" + bomb),
                                (b"iCCP", b"icc\x00\x00" + bomb)))
    return png_build([chunks[0], (kind, payload), *chunks[1:]]), None, ANY, ANY


ALL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
_MUTATIONS: tuple[tuple[str, Mutation, int, tuple[str, ...]], ...] = (
    # name, function, weight, formats of the originals it applies to
    ("intact", _intact, 6, ALL_FORMATS),
    ("bit_flips", _bit_flips, 16, ALL_FORMATS),
    ("byte_run", _byte_run, 8, ALL_FORMATS),
    ("truncated", _truncate, 12, ALL_FORMATS),
    ("inserted", _insert, 8, ALL_FORMATS),
    ("deleted", _delete, 8, ALL_FORMATS),
    ("spliced", _splice, 5, ALL_FORMATS),
    ("stacked", _stacked, 6, ALL_FORMATS),
    ("png_header", _png_header, 8, ("PNG",)),
    ("jpeg_header", _jpeg_header, 8, ("JPEG",)),
    ("named_as_other_format", _named_as_other_format, 3, ALL_FORMATS),
    ("wrong_signature", _wrong_signature, 3, ("PNG", "JPEG")),
    ("other_format", _other_format, 4, ALL_FORMATS),
    ("declared_huge", _declared_huge, 3, ("PNG", "JPEG")),
    ("text_chunk_bomb", _text_chunk_bomb, 1, ("PNG",)),
    ("zero_bytes", _empty, 1, ALL_FORMATS),
)
KINDS = tuple(name for name, _, _, _ in _MUTATIONS) + ("pixel_bomb",)

# Images whose header is honest and whose pixels decode, but are huge once decoded: a few in every corpus.
PIXEL_BOMB_EVERY = 250


# name, pixel mode, size, format: honest, highly compressible images, all but the last just inside the default
# pixel limit (50 MP), each decoding to hundreds of MB.
PIXEL_BOMBS: tuple[tuple[str, str, tuple[int, int], str], ...] = (
    ("flat16-7000x7000.png", "I;16", (7000, 7000), "PNG"),
    ("flat-float-7000x7000.tif", "F", (7000, 7000), "TIFF"),
    ("flat-rgba-7000x7000.png", "RGBA", (7000, 7000), "PNG"),
    ("flat-8000x6000.jpg", "RGB", (8000, 6000), "JPEG"),
    ("flat-7000x7000.png", "L", (7000, 7000), "PNG"),
    ("flat-7100x7100.png", "1", (7100, 7100), "PNG"),
)


@lru_cache(maxsize=None)
def pixel_bomb(k: int) -> Mutant:
    """Bomb ``k`` of :data:`PIXEL_BOMBS`; built on first use (seconds each), its bytes independent of any index."""
    name, mode, size, fmt = PIXEL_BOMBS[k]
    fill = {"1": 1, "F": 0.5, "RGBA": (200, 180, 160, 128)}.get(mode, 200)
    options = {"JPEG": {"quality": 50}, "PNG": {"compress_level": 9}, "TIFF": {"compression": "tiff_adobe_deflate"}}
    data = _encode(Image.new(mode, size, fill), fmt, **options[fmt])
    expect = ("too_large",) if size[0] * size[1] > 50_000_000 else (ACCEPTED,)
    return Mutant(-1, "pixel_bomb", name, name, data, expect, expect)


def mutant(originals_: Sequence[Original], index: int, seed: int, bombs: bool = False) -> Mutant:
    """File ``index`` of the corpus of ``seed``; depends on nothing else. With ``bombs`` every
    :data:`PIXEL_BOMB_EVERY`-th file is one of :data:`PIXEL_BOMBS` in turn."""
    if bombs and index % PIXEL_BOMB_EVERY == PIXEL_BOMB_EVERY - 1:
        bomb = pixel_bomb((index // PIXEL_BOMB_EVERY) % len(PIXEL_BOMBS))
        return Mutant(index, bomb.kind, bomb.source, bomb.name, bomb.data, bomb.expect, bomb.expect_bytes)
    rng = random.Random(f"defectkit-chaos/{seed}/{index}")
    present = {o.format for o in originals_}
    usable = [m for m in _MUTATIONS if present.intersection(m[3])]
    kind, mutation, _, formats = rng.choices(usable, weights=[m[2] for m in usable])[0]
    original = rng.choice([o for o in originals_ if o.format in formats])
    data, extension, expect, expect_bytes = mutation(rng, original)
    stem, _, original_extension = original.name.rpartition(".")
    return Mutant(index, kind, original.name, f"{index:05d}-{kind}.{extension or original_extension}", data,
                  expect, expect_bytes)


def corpus(originals_: Sequence[Original], count: int, seed: int = 0, *, bombs: bool = True) -> Iterator[Mutant]:
    """``count`` mutated files, the same ones for the same originals and seed."""
    if not originals_:
        raise ValueError("no originals to mutate")
    for index in range(count):
        yield mutant(originals_, index, seed, bombs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.mutate", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    kinds: Counter[str] = Counter()
    for item in corpus(originals(args.out / "originals"), args.count, args.seed):
        (args.out / item.name).write_bytes(item.data)
        kinds[item.kind] += 1
    print(dict(sorted(kinds.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

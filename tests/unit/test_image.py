import io
import pickle
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from defectkit.image import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, ImageInfo, ImageRejected, decode

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}


def encode(picture: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **options)
    return buffer.getvalue()


def textured(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims ``width x height``; its pixel data is one row."""
    data = bytearray(encode(Image.new("L", (4, 1), 0), "PNG"))
    ihdr = 8 + 4  # signature, then the IHDR length field
    body = data[ihdr : ihdr + 4 + 13]
    body[4:12] = struct.pack(">II", width, height)
    data[ihdr : ihdr + 4 + 13] = body
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(body)))
    return bytes(data)


def constant_png(width: int, height: int) -> bytes:
    """A complete, valid 1-bit PNG of one colour: huge in pixels, tiny on disk (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + (width + 7) // 8)  # filter byte, then the packed bits
    deflate = zlib.compressobj(9)
    pixels = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def rejected(data: bytes, name: str = "", **kwargs) -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        decode(data, name=name, **kwargs)
    return caught.value


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_every_allowed_format_decodes_to_rgb(fmt):
    source = textured()
    options = {"lossless": True} if fmt == "WEBP" else {}
    picture, info = decode(encode(source, fmt, **options), name=f"train/good/a.{EXTENSIONS[fmt]}")
    assert picture.mode == "RGB" and picture.size == (64, 48)
    assert info == ImageInfo(fmt, 64, 48, "RGB")
    if fmt != "JPEG":
        assert np.array_equal(np.asarray(picture), np.asarray(source))


def test_multi_picture_camera_jpeg_counts_as_jpeg():
    first, second = textured(seed=1), textured(seed=2)
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    picture, info = decode(data, name="camera.jpg")
    assert info.format == "JPEG" and picture.size == (64, 48)
    assert np.abs(np.asarray(picture).astype(int) - np.asarray(first)).mean() < 5


@pytest.mark.parametrize("name", ["a.JPG", "a.jpeg", "dir/b.JpEg", "no_extension", ""])
def test_jpeg_names_that_are_accepted(name):
    picture, info = decode(encode(textured(), "JPEG"), name=name)
    assert info.format == "JPEG" and picture.mode == "RGB"


def test_zero_bytes_is_empty_and_names_the_file():
    error = rejected(b"", "train/good/zero.png")
    assert error.reason == "empty"
    assert "train/good/zero.png" in error.detail and "empty" in error.detail


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (encode(textured(), "GIF"), "GIF"),
        (encode(textured(), "PDF"), "PDF"),
        (encode(textured().resize((32, 32)), "ICO"), "ICO"),
        (b"label,value\nscratch,1\n", "text"),
        (bytes(range(256)) * 4, "unknown"),
    ],
    ids=["gif", "pdf", "ico", "text", "binary"],
)
def test_formats_outside_the_allow_list_are_unsupported(data, named):
    error = rejected(data, "train/good/x")
    assert error.reason == "unsupported_format"
    assert named in error.detail and "train/good/x" in error.detail


def test_gif_named_gif_is_unsupported_not_a_mismatch():
    assert rejected(encode(textured(), "GIF"), "a.gif").reason == "unsupported_format"


def test_damaged_png_pixel_data_is_corrupt():
    data = bytearray(encode(textured(200, 200), "PNG", compress_level=1))
    idat = data.index(b"IDAT")
    data[idat + 40 : idat + 400] = bytes(360)  # break the deflate stream, keep the file length
    error = rejected(bytes(data), "a.png")
    assert error.reason == "corrupt"
    assert "a.png" in error.detail


def test_broken_header_of_an_allowed_format_is_corrupt():
    data = bytearray(encode(textured(), "BMP"))
    data[28:30] = struct.pack("<H", 7)  # 7 bits per pixel does not exist
    error = rejected(bytes(data), "a.bmp")
    assert error.reason == "corrupt"
    assert "BMP" in error.detail


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_files_cut_short_are_truncated(fmt):
    data = encode(textured(128, 128), fmt)
    error = rejected(data[: len(data) * 2 // 3], f"cut.{EXTENSIONS[fmt]}")
    assert error.reason == "truncated", error.detail
    assert "cut." in error.detail


def test_header_pixel_count_is_checked_before_decoding():
    # 9000x9000 is under Pillow's own bomb limit, and the file has almost no pixel data:
    # decoding it first would report "truncated" instead.
    error = rejected(png_claiming(9000, 9000), "huge.png")
    assert error.reason == "too_large"
    assert "9000x9000" in error.detail and "huge.png" in error.detail


def test_max_pixels_is_configurable():
    data = encode(textured(100, 100), "PNG")
    assert rejected(data, max_pixels=9_999).reason == "too_large"
    assert decode(data, max_pixels=10_000)[0].size == (100, 100)


def test_constant_colour_bomb_is_too_large():
    data = constant_png(20000, 20000)  # 400 megapixels in about 50 kB
    assert len(data) < 100_000
    small = decode(constant_png(300, 200))[0]
    assert small.size == (300, 200) and pixel(small, (0, 0)) == (0, 0, 0)  # the construction is a real PNG
    error = rejected(data, "bomb.png")
    assert error.reason == "too_large"
    assert "400000000" in error.detail


def test_pillow_bomb_warning_as_error_still_gives_a_rejection():
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        error = rejected(png_claiming(10000, 9000), max_pixels=200_000_000)  # over Pillow's warning threshold
    assert error.reason == "too_large"
    assert Image.MAX_IMAGE_PIXELS == limit


def test_decode_leaves_pillows_global_limit_alone():
    limit = Image.MAX_IMAGE_PIXELS
    rejected(png_claiming(9000, 9000))
    decode(encode(textured(), "PNG"), max_pixels=DEFAULT_MAX_PIXELS * 10)
    assert Image.MAX_IMAGE_PIXELS == limit


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("PNG", "x.jpg"), ("JPEG", "x.png"), ("BMP", "x.tiff"), ("TIFF", "x.webp"), ("WEBP", "x.jpeg"), ("PNG", "x.txt")],
)
def test_extension_must_match_the_real_format(fmt, name):
    error = rejected(encode(textured(), fmt), f"train/good/{name}")
    assert error.reason == "extension_mismatch"
    assert fmt in error.detail and name in error.detail


def test_extension_mismatch_is_reported_before_size():
    assert rejected(png_claiming(9000, 9000), "huge.jpg").reason == "extension_mismatch"


def pixel(picture: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in picture.getpixel(xy))


def test_grey_l_is_replicated():
    picture, info = decode(encode(Image.new("L", (4, 4), 100), "PNG"))
    assert info.mode == "L" and picture.mode == "RGB"
    assert pixel(picture, (0, 0)) == (100, 100, 100)


def test_bilevel_1_becomes_black_and_white():
    source = Image.new("1", (4, 4), 0)
    source.putpixel((1, 1), 1)
    picture, info = decode(encode(source, "PNG"))
    assert info.mode == "1"
    assert pixel(picture, (0, 0)) == (0, 0, 0) and pixel(picture, (1, 1)) == (255, 255, 255)


def test_la_alpha_is_composited_on_white():
    source = Image.new("LA", (3, 1))
    source.putdata([(50, 0), (50, 255), (50, 128)])
    picture, info = decode(encode(source, "PNG"))
    assert info.mode == "LA"
    assert pixel(picture, (0, 0)) == (255, 255, 255)
    assert pixel(picture, (1, 0)) == (50, 50, 50)
    assert all(abs(v - 152) <= 1 for v in pixel(picture, (2, 0)))


def test_rgba_alpha_is_composited_on_white():
    source = Image.new("RGBA", (3, 1))
    source.putdata([(200, 0, 0, 0), (200, 0, 0, 255), (0, 0, 200, 128)])
    picture, info = decode(encode(source, "PNG"))
    assert info.mode == "RGBA"
    assert pixel(picture, (0, 0)) == (255, 255, 255)
    assert pixel(picture, (1, 0)) == (200, 0, 0)
    red, green, blue = pixel(picture, (2, 0))
    assert abs(red - 127) <= 1 and abs(green - 127) <= 1 and abs(blue - 227) <= 1


def test_rgba_webp_alpha_is_composited_on_white():
    source = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    picture, info = decode(encode(source, "WEBP", lossless=True), name="a.webp")
    assert info.mode == "RGBA"
    assert pixel(picture, (4, 4)) == (255, 255, 255)


def palette_image() -> Image.Image:
    source = Image.new("P", (2, 1))
    source.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    source.putdata([0, 1])
    return source


def test_palette_without_transparency_maps_colours():
    picture, info = decode(encode(palette_image(), "PNG"))
    assert info.mode == "P"
    assert pixel(picture, (0, 0)) == (255, 0, 0) and pixel(picture, (1, 0)) == (0, 0, 255)


def test_palette_with_transparency_is_composited_on_white():
    data = encode(palette_image(), "PNG", transparency=1)
    picture, info = decode(data)
    assert info.mode == "P"
    assert pixel(picture, (0, 0)) == (255, 0, 0)
    assert pixel(picture, (1, 0)) == (255, 255, 255)


def test_rgb_with_colour_key_transparency_is_composited_on_white():
    source = Image.new("RGB", (2, 1), (0, 0, 255))
    source.putpixel((0, 0), (9, 9, 9))
    picture, _ = decode(encode(source, "PNG", transparency=(0, 0, 255)))
    assert pixel(picture, (0, 0)) == (9, 9, 9) and pixel(picture, (1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk_is_converted(fmt):
    source = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
    source.paste((255, 0, 0, 0), (8, 0, 16, 16))  # full cyan on the right half
    picture, info = decode(encode(source, fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    assert info.mode == "CMYK" and picture.mode == "RGB"
    assert np.allclose(pixel(picture, (2, 8)), (255, 255, 255), atol=3)
    assert np.allclose(pixel(picture, (13, 8)), (0, 255, 255), atol=3)


def test_sixteen_bit_is_scaled_by_its_real_range_not_clipped():
    # A 12-bit sensor's values in a 16-bit PNG: clipping at 255 would make it almost all white,
    # dividing by 257 almost all black.
    values = np.linspace(1000, 4000, 64 * 8).reshape(8, 64).astype(np.uint16)
    picture, info = decode(encode(Image.fromarray(values), "PNG"))
    assert info.mode.startswith("I;16")
    grey = np.asarray(picture)[..., 0]
    assert grey.min() == 0 and grey.max() == 255
    expected = np.rint((values.astype(float) - 1000) * 255 / 3000)
    assert np.abs(grey - expected).max() <= 1


def test_constant_sixteen_bit_lands_on_the_nominal_scale():
    picture, _ = decode(encode(Image.fromarray(np.full((4, 4), 32896, np.uint16)), "PNG"))
    assert pixel(picture, (0, 0)) == (128, 128, 128)


def test_thirty_two_bit_integer_is_scaled():
    values = (np.arange(100, dtype=np.int32).reshape(10, 10) * 1000) - 20000
    picture, info = decode(encode(Image.fromarray(values), "TIFF"))
    assert info.mode == "I"
    grey = np.asarray(picture)[..., 0]
    assert grey[0, 0] == 0 and grey[9, 9] == 255


def test_float_is_scaled_and_tolerates_nan():
    values = np.linspace(-1.0, 3.0, 100, dtype=np.float32).reshape(10, 10)
    values[5, 5] = np.nan
    picture, info = decode(encode(Image.fromarray(values), "TIFF"))
    assert info.mode == "F"
    grey = np.asarray(picture)[..., 0]
    assert grey[0, 0] == 0 and grey[9, 9] == 255


def test_exif_orientation_6_is_applied():
    source = Image.new("RGB", (40, 20), (0, 0, 255))
    source.paste((255, 0, 0), (0, 0, 10, 10))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be turned 90 degrees clockwise for display
    picture, info = decode(encode(source, "JPEG", quality=95, exif=exif.tobytes()), name="rotated.jpg")
    assert (info.width, info.height) == (40, 20)
    assert picture.size == (20, 40)
    red, _, blue = pixel(picture, (15, 5))  # the corner is now top-right
    assert red > 200 and blue < 60
    red, _, blue = pixel(picture, (5, 5))
    assert red < 60 and blue > 200


def test_draft_decodes_jpeg_at_reduced_scale_only_when_asked():
    data = encode(textured(1024, 768), "JPEG", quality=90)
    full, info = decode(data)
    small, small_info = decode(data, draft=(224, 224))
    assert full.size == (1024, 768) and info == small_info
    assert small.size == (512, 384)  # 768 // 224 = 3 allows 1/2 scale, not 1/4
    assert decode(data, draft=(100, 100))[0].size == (256, 192)
    assert decode(encode(textured(1024, 768), "PNG"), draft=(100, 100))[0].size == (1024, 768)


def test_draft_size_follows_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(textured(1024, 256), "JPEG", exif=exif.tobytes())
    # Displayed 256x1024: asking for 128x512 allows 1/2 scale; without the swap it would allow none.
    assert decode(data, draft=(128, 512))[0].size == (128, 512)


def test_bad_draft_size_is_a_caller_error():
    with pytest.raises(ValueError, match="draft"):
        decode(encode(textured(), "PNG"), draft=(0, 10))


def test_rejection_survives_pickling_for_worker_processes():
    error = pickle.loads(pickle.dumps(ImageRejected("truncated", "a.png: cut short")))
    assert (error.reason, error.detail, str(error)) == ("truncated", "a.png: cut short", "a.png: cut short")
    with pytest.raises(ValueError, match="unknown rejection reason"):
        ImageRejected("bad", "x")


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about damaged TIFF tags it skips
@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_mangled_bytes_only_ever_raise_image_rejected(fmt):
    original = encode(textured(48, 32), fmt)
    rng = random.Random(fmt)
    for _ in range(60):
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(1, len(data))]
        try:
            picture, _ = decode(bytes(data))
        except ImageRejected as error:
            assert error.reason in ("corrupt", "truncated", "unsupported_format", "too_large"), error.reason
        else:
            assert picture.mode == "RGB"

"""The chaos suite's mutator: reproducible, covering every kind of damage, and right about the files it is sure of."""

from __future__ import annotations

import io
import struct
from collections import Counter

import pytest
from PIL import Image

from defectkit import image
from tests.chaos import mutate


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> list[mutate.Original]:
    return mutate.originals(tmp_path_factory.mktemp("originals"))


def test_originals_are_real_images_in_every_accepted_format(originals):
    assert {o.format for o in originals} == set(image.ALLOWED_FORMATS)
    for original in originals:
        picture, info = image.decode(original.data, name=original.name)
        assert info.format == original.format and picture.mode == "RGB"
    # The decoder's own conversion rules are exercised: 16-bit, 32-bit integer, float, palette, alpha, CMYK.
    modes = {Image.open(io.BytesIO(o.data)).mode for o in originals}
    assert {"I;16", "I", "F", "P", "RGBA", "CMYK", "L", "RGB"} <= modes


def test_each_file_depends_only_on_seed_and_index(originals):
    first = list(mutate.corpus(originals, 120, seed=3, bombs=False))
    again = [mutate.mutant(originals, i, 3) for i in (119, 5, 60)]
    assert [m.data for m in again] == [first[119].data, first[5].data, first[60].data]
    other = list(mutate.corpus(originals, 120, seed=4, bombs=False))
    assert sum(a.data != b.data for a, b in zip(first, other, strict=True)) > 100


def test_a_corpus_holds_every_kind_of_damage(originals):
    kinds = Counter(m.kind for m in mutate.corpus(originals, 600, bombs=False))
    assert set(kinds) == set(mutate.KINDS) - {"pixel_bomb"}
    assert kinds["bit_flips"] > kinds["zero_bytes"]  # weights are respected


def test_files_whose_fate_is_certain_get_it_from_the_decoder(originals):
    checked = 0
    for item in mutate.corpus(originals, 400, seed=1, bombs=False):
        for name, expect in ((item.name, item.expect), ("", item.expect_bytes)):
            if not expect:
                continue
            try:
                image.decode(item.data, name=name)
                outcome = mutate.ACCEPTED
            except image.ImageRejected as rejected:
                outcome = rejected.reason
            assert outcome in expect, (item.index, item.kind, item.source, name)
            checked += 1
    assert checked > 150


def test_declared_bombs_are_tiny_files_with_huge_headers():
    data = mutate._tiny_png(mutate.BOMB_SIDE, mutate.BOMB_SIDE)
    assert len(data) < 200
    ihdr = mutate.png_chunks(data)[0]
    assert ihdr[0] == b"IHDR" and struct.unpack(">II", ihdr[1][:8]) == (mutate.BOMB_SIDE, mutate.BOMB_SIDE)
    with pytest.raises(image.ImageRejected) as rejected:
        image.decode(data)
    assert rejected.value.reason == "too_large"


def test_pixel_bombs_are_small_files_of_tens_of_megapixels():
    assert sum(w * h > 50_000_000 for _, _, (w, h), _ in mutate.PIXEL_BOMBS) == 1
    for k in (4, 5):  # the quickest to build: one inside the 50 MP limit, one just over it
        bomb = mutate.pixel_bomb(k)
        width, height = Image.open(io.BytesIO(bomb.data)).size
        assert bomb.kind == "pixel_bomb" and len(bomb.data) < 1 << 20 and width * height >= 49_000_000
        assert bomb.expect == (("too_large",) if width * height > 50_000_000 else (mutate.ACCEPTED,))


def test_png_and_jpeg_structure_is_read_back(originals):
    png = next(o for o in originals if o.format == "PNG")
    chunks = mutate.png_chunks(png.data)
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    assert mutate.png_build(chunks) == png.data
    jpeg = next(o for o in originals if o.format == "JPEG")
    markers = [marker for marker, _, _ in mutate.jpeg_segments(jpeg.data)]
    assert markers[-1] == 0xDA and any(m in mutate.JPEG_SOF for m in markers)

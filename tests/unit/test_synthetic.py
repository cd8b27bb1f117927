import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectkit.data import GOOD, SOURCE_SPLITS, parse_layout
from defectkit.synthetic import DEFECT_TYPES, generate_sample
from defectkit.storage import Store

COUNT = 60
SIZE = 64


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    return generate_sample(root, count=COUNT, size=SIZE, seed=3)


def test_same_arguments_give_byte_identical_files(sample, tmp_path):
    again = generate_sample(tmp_path / "again", count=COUNT, size=SIZE, seed=3)
    assert files(again.root) == files(sample.root)
    assert again.counts == sample.counts


def test_another_seed_gives_other_images(sample, tmp_path):
    other = generate_sample(tmp_path / "other", count=COUNT, size=SIZE, seed=4)
    ours, theirs = files(sample.root), files(other.root)
    assert ours.keys() == theirs.keys()
    assert all(ours[rel] != theirs[rel] for rel in ours)


def test_counts_splits_and_classes(sample):
    layout = parse_layout(Store(str(sample.root)).list())
    assert layout.unexpected == ()
    on_disk: dict[str, dict[str, int]] = {}
    for image in layout.images:
        on_disk.setdefault(image.split, {}).setdefault(image.class_name, 0)
        on_disk[image.split][image.class_name] += 1
    assert on_disk == sample.counts
    assert sample.images == COUNT == len(layout.images)
    train, test = (sum(sample.counts[s].values()) for s in SOURCE_SPLITS)
    assert (train, test) == (42, 18)
    for split, total in (("train", train), ("test", test)):
        per_class = sample.counts[split]
        assert set(per_class) == {GOOD, *DEFECT_TYPES}
        assert per_class[GOOD] == total - total // 2
        defects = [per_class[d] for d in DEFECT_TYPES]
        assert sum(defects) == total // 2 and max(defects) - min(defects) <= 1
    assert all(p.suffix == ".jpg" for p in sample.root.glob("t*/*/*"))
    with Image.open(next(sample.root.glob("train/good/*.jpg"))) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (SIZE, SIZE))


def test_every_defect_image_has_a_binary_mask_over_the_defect(sample):
    layout = parse_layout(Store(str(sample.root)).list())
    defects = [f for f in layout.images if f.is_defect]
    assert len(layout.masks) == sample.masks == len(defects)
    for file in layout.images:
        if not file.is_defect:
            assert file.mask is None
            continue
        assert file.mask is not None, file.path
        mask = np.asarray(Image.open(sample.root / file.mask))
        assert mask.shape == (SIZE, SIZE)
        assert set(np.unique(mask)) == {0, 255}, file.mask
        inside = mask > 0
        pixels = np.asarray(Image.open(sample.root / file.path).convert("L"), dtype=np.float64)
        # The defect must stand out from the texture where the mask says it is.
        reference = np.median(pixels[~inside])
        excess = np.abs(pixels[inside] - reference).mean() - np.abs(pixels[~inside] - reference).mean()
        assert excess > 12, f"{file.path}: defect under the mask is hardly visible ({excess:.1f} grey levels)"


def test_logs_what_it_wrote(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="defectkit.synthetic"):
        summary = generate_sample(tmp_path / "s", count=30, size=32)
    assert f"wrote 30 images of 32x32 px and {summary.masks} masks to {tmp_path / 's'}" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 5}, "count=5"),
        ({"size": 16}, "size=16"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_sample(tmp_path / "s", **kwargs)


def test_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "old.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_sample(tmp_path, count=30, size=32)

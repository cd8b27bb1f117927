import json
import random
from pathlib import Path

import pytest

from defectkit.data import (
    GOOD,
    MANIFEST_FILE,
    ImageFile,
    Manifest,
    ManifestEntry,
    assign_validation,
    parse_layout,
    sha256_bytes,
)
from defectkit.storage import Store


def write_tree(root: Path, rel_paths: list[str]) -> list[str]:
    for rel in rel_paths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rel.encode())
    return Store(str(root)).list()


def test_parse_layout_sorts_images_masks_and_unexpected_files(tmp_path):
    listed = write_tree(tmp_path, [
        "train/good/001.png",
        "train/good/000.png",
        "test/good/005.png",
        "test/scratch/010.png",
        "test/hole/011.png",
        "ground_truth/scratch/010_mask.png",
        "ground_truth/hole/999_mask.png",  # no image of that name
        "README.md",  # at the root
        "train/stray.png",  # no class directory
        "test/scratch/deep/012.png",  # one level too deep
        "validation/good/000.png",  # not a split we know
        "train/good/.DS_Store",  # hidden: not data at all
        ".cache/x",
    ])

    layout = parse_layout(listed)

    assert [f.path for f in layout.images] == [
        "test/good/005.png", "test/hole/011.png", "test/scratch/010.png", "train/good/000.png", "train/good/001.png",
    ]
    by_path = {f.path: f for f in layout.images}
    assert by_path["test/scratch/010.png"] == ImageFile("test/scratch/010.png", "test", "scratch",
                                                        "ground_truth/scratch/010_mask.png")
    assert by_path["test/hole/011.png"].mask is None
    assert by_path["train/good/000.png"] == ImageFile("train/good/000.png", "train", GOOD, None)
    assert not by_path["train/good/000.png"].is_defect and by_path["test/hole/011.png"].is_defect
    assert layout.masks == ("ground_truth/scratch/010_mask.png",)
    assert layout.unexpected == (
        "README.md", "ground_truth/hole/999_mask.png", "test/scratch/deep/012.png", "train/stray.png",
        "validation/good/000.png",
    )


def test_a_mask_shared_by_train_and_test_stems_belongs_to_the_test_image():
    layout = parse_layout([
        "train/scratch/000.png", "test/scratch/000.png", "ground_truth/scratch/000_mask.png",
        "ground_truth/scratch/000_mask.bmp", "ground_truth/scratch/notes.txt",
    ])
    masks = {f.path: f.mask for f in layout.images}
    assert masks == {"test/scratch/000.png": "ground_truth/scratch/000_mask.bmp", "train/scratch/000.png": None}
    assert layout.unexpected == ("ground_truth/scratch/000_mask.png", "ground_truth/scratch/notes.txt")


def test_parse_layout_does_not_depend_on_listing_order():
    paths = ["train/good/a.png", "test/crack/b.png", "ground_truth/crack/b_mask.png", "notes.txt"]
    shuffled = paths[::-1]
    assert parse_layout(paths) == parse_layout(shuffled)


def images(per_class: dict[str, int], split: str = "train") -> list[ImageFile]:
    return [ImageFile(f"{split}/{c}/{i:03d}.png", split, c) for c, n in per_class.items() for i in range(n)]


def val_paths(files: list[ImageFile]) -> set[str]:
    return {f.path for f in files if f.split == "val"}


def test_validation_split_is_stratified_and_leaves_test_alone():
    files = images({GOOD: 50, "scratch": 10, "hole": 3}) + images({GOOD: 7, "scratch": 4}, split="test")

    assigned = assign_validation(files, 0.2, seed=0)

    assert [f.path for f in assigned] == [f.path for f in files]  # order and membership unchanged
    val = [f for f in assigned if f.split == "val"]
    per_class = {c: sum(f.class_name == c for f in val) for c in (GOOD, "scratch", "hole")}
    assert per_class == {GOOD: 10, "scratch": 2, "hole": 1}
    assert all(f.path.startswith("train/") for f in val)
    assert [f for f in assigned if f.split == "test"] == [f for f in files if f.split == "test"]
    # Every class keeps images for training.
    assert {f.class_name for f in assigned if f.split == "train"} == {GOOD, "scratch", "hole"}


def test_validation_split_is_deterministic_whatever_the_input_order():
    files = images({GOOD: 40, "scratch": 12, "crack": 9})
    reference = val_paths(assign_validation(files, 0.25, seed=7))
    for shuffle_seed in range(5):
        shuffled = files[:]
        random.Random(shuffle_seed).shuffle(shuffled)
        assert val_paths(assign_validation(shuffled, 0.25, seed=7)) == reference
    assert val_paths(assign_validation(files, 0.25, seed=8)) != reference
    assert val_paths(assign_validation(files, 0.0, seed=7)) == set()


def test_validation_split_keeps_masks():
    files = [ImageFile(f"train/crack/{i}.png", "train", "crack", f"ground_truth/crack/{i}_mask.png") for i in range(5)]
    assert [f.mask for f in assign_validation(files, 0.4, seed=0)] == [f.mask for f in files]


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_validation_fraction_out_of_range_is_rejected(fraction):
    with pytest.raises(ValueError, match=repr(fraction)):
        assign_validation(images({GOOD: 4}), fraction, seed=0)


def manifest_from_files(root: Path, source: str = "gs://bucket/data") -> Manifest:
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        split, class_name, _ = rel.split("/")
        data = path.read_bytes()
        entries.append(ManifestEntry(rel, split, class_name, sha256_bytes(data), len(data), 64, 48, "RGB",
                                     f"ground_truth/{class_name}/x_mask.png" if class_name != GOOD else None))
    return Manifest(tuple(entries), source=source)


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "data"
    write_tree(root, ["train/good/0.png", "train/good/1.png", "val/good/2.png", "test/good/3.png",
                      "test/scratch/4.png", "train/scratch/5.png"])
    return root


def test_manifest_round_trip(dataset, tmp_path):
    manifest = manifest_from_files(dataset)

    written = manifest.write(tmp_path / "artifact")
    read = Manifest.read(tmp_path / "artifact")

    assert written == tmp_path / "artifact" / MANIFEST_FILE
    assert read == manifest
    assert read.fingerprint == manifest.fingerprint
    assert read.source == "gs://bucket/data"
    assert read.classes == [GOOD, "scratch"]
    assert read.defect_types == ["scratch"]
    assert read.counts() == {"test": {GOOD: 1, "scratch": 1}, "train": {GOOD: 2, "scratch": 1}, "val": {GOOD: 1}}
    assert [e.path for e in read.split("val")] == ["val/good/2.png"]
    record = json.loads(written.read_text())
    assert record["format"] == "defectkit.manifest/v1"
    assert record["entries"][0]["class"] == GOOD and "class_name" not in record["entries"][0]


def test_fingerprint_changes_when_one_byte_of_content_changes(dataset):
    before = manifest_from_files(dataset)
    target = dataset / "test" / "scratch" / "4.png"
    content = bytearray(target.read_bytes())
    content[0] ^= 1
    target.write_bytes(bytes(content))

    after = manifest_from_files(dataset)

    assert after.fingerprint != before.fingerprint
    assert len(before.fingerprint) == 64


def test_fingerprint_does_not_depend_on_entry_order(dataset):
    manifest = manifest_from_files(dataset)
    reordered = Manifest(tuple(reversed(manifest.entries)), source=manifest.source)
    assert reordered.fingerprint == manifest.fingerprint


@pytest.mark.parametrize(("field", "value"), [("class", "hole"), ("split", "val"), ("sha256", "0" * 64),
                                              ("path", "train/good/9.png")])
def test_edited_manifest_is_rejected(dataset, tmp_path, field, value):
    manifest_from_files(dataset).write(tmp_path)
    path = tmp_path / MANIFEST_FILE
    record = json.loads(path.read_text())
    record["entries"][0][field] = value
    path.write_text(json.dumps(record))

    with pytest.raises(ValueError, match="fingerprint does not match"):
        Manifest.read(tmp_path)


def test_reading_a_directory_without_manifest_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a defectkit dataset artifact"):
        Manifest.read(tmp_path)


def test_unknown_split_is_rejected(dataset):
    with pytest.raises(ValueError, match="'validation'"):
        manifest_from_files(dataset).split("validation")


def test_source_fingerprint_changes_with_any_file_and_only_then(tmp_path):
    from defectkit.data import source_fingerprint

    root = tmp_path / "data"
    (root / "train/good").mkdir(parents=True)
    (root / "train/good/a.png").write_bytes(b"first")
    (root / "train/good/b.png").write_bytes(b"second")
    before = source_fingerprint(str(root))
    assert source_fingerprint(f"file://{root}") == before
    (root / "train/good/a.png").write_bytes(b"FIRST")  # same size, same name, other content
    changed = source_fingerprint(str(root))
    assert changed != before
    (root / "train/good/a.png").write_bytes(b"first")
    assert source_fingerprint(str(root)) == before
    (root / "train/good/c.png").write_bytes(b"third")
    assert source_fingerprint(str(root)) not in (before, changed)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        source_fingerprint(str(tmp_path / "empty"))

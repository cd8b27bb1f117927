import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from defectkit.data import GOOD, MANIFEST_FILE, Manifest, source_fingerprint
from defectkit.synthetic import generate_sample
from defectkit.validation.dataset import (
    QUARANTINE_FILE,
    ValidationConfig,
    ValidationFailed,
    required_images,
    validate_dataset,
)
from tests.unit.layouts import thin_train_defects

# The 60-image sample has 2 images of some defect classes in test: train good 21, crack/hole/stain/scratch 5 or 6;
# test good 9, scratch 3 and the other types 2.
CONFIG = ValidationConfig(min_images_per_class=2)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "data"
    generate_sample(root, count=60, size=64, seed=1)
    return root


@pytest.fixture
def source(pristine, tmp_path) -> Path:
    root = tmp_path / "source"
    shutil.copytree(pristine, root)
    return root


def encode(fmt: str, size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 120, 150)).save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with a valid header checksum."""
    data = bytearray(encode("PNG"))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def put(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_clean_sample_passes_and_becomes_a_dataset_artifact(source, tmp_path):
    out, quarantine = tmp_path / "dataset", tmp_path / "quarantine"

    report = validate_dataset(str(source), out, CONFIG, quarantine_dir=quarantine)

    assert report.passed and report.checks_passed, report.failure_message()
    assert report.quarantined == () and report.quarantine_fraction == 0.0
    assert report.failure_message() == ""
    assert report.total_files == 60 + 30
    written = tree(out)
    assert written.pop(MANIFEST_FILE)
    assert written == tree(source)  # every image and mask, byte for byte
    manifest = Manifest.read(out)
    assert manifest == report.manifest and manifest.source == str(source)
    assert len(manifest.entries) == 60
    assert {e.split for e in manifest.entries} == {"train", "val", "test"}
    assert sum(e.mask is not None for e in manifest.entries) == 30
    entry = manifest.entries[0]
    assert (entry.width, entry.height, entry.mode) == (64, 64, "RGB")
    assert json.loads((quarantine / QUARANTINE_FILE).read_text()) == []
    assert {c.name for c in report.checks} >= {"has_images", "width_between", "height_between", "mode_in_set",
                                               "min_images_per_class", "test_has_defect_images",
                                               "no_train_test_leakage", "path_not_null", "sha256_not_null"}
    counts = next(c for c in report.checks if c.name == "min_images_per_class").detail
    assert "train holds 21 defect images (crack 5, hole 5, scratch 6, stain 5)" in counts, counts
    record = json.loads(json.dumps(report.to_json()))
    assert record["passed"] is True and record["dataset_fingerprint"] == manifest.fingerprint
    page = report.to_html()
    assert "PASSED" in page and "No file was quarantined" in page and "no_train_test_leakage" in page


def test_same_source_gives_the_same_artifact_whatever_the_thread_count(source, tmp_path):
    one = validate_dataset(str(source), tmp_path / "one", CONFIG, workers=1)
    many = validate_dataset(str(source), tmp_path / "many", CONFIG, workers=8)
    assert (tmp_path / "one" / MANIFEST_FILE).read_bytes() == (tmp_path / "many" / MANIFEST_FILE).read_bytes()
    assert one.manifest.fingerprint == many.manifest.fingerprint


def test_the_source_fingerprint_is_checked_after_reading_and_kept_as_lineage(source, tmp_path):
    fingerprint = source_fingerprint(str(source))
    validate_dataset(str(source), tmp_path / "ok", CONFIG, source_fingerprint=fingerprint)
    assert json.loads((tmp_path / "ok" / MANIFEST_FILE).read_text())["source_fingerprint"] == fingerprint
    # What a pipeline would have cached under another fingerprint than the data it read is refused.
    with pytest.raises(ValueError, match="changed while they were validated"):
        validate_dataset(str(source), tmp_path / "stale", CONFIG, source_fingerprint="0" * 64)


def test_every_kind_of_bad_file_is_quarantined_with_its_reason(source, tmp_path):
    jpeg = (source / "train/good/0000.jpg").read_bytes()
    bad = {
        "train/good/corrupt.jpg": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "corrupt"),
        "train/good/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "train/good/empty.jpg": (b"", "empty"),
        "train/good/animation.gif": (encode("GIF"), "unsupported_format"),
        "train/good/notes.png": (b"not an image at all\n", "unsupported_format"),
        "train/good/bomb.png": (png_claiming(9000, 9000), "too_large"),
        "train/good/wide.png": (encode("PNG", (160, 40)), "too_large"),
        "train/good/renamed.jpg": (encode("PNG"), "extension_mismatch"),
        "train/good/tiny.png": (encode("PNG", (16, 16)), "too_small"),
        "train/stray.jpg": (jpeg, "unexpected_location"),
        "README <b>&.txt": (b"hello", "unexpected_location"),
        "ground_truth/crack/9999_mask.png": (encode("PNG"), "unexpected_location"),
    }
    for rel, (data, _) in bad.items():
        put(source, rel, data)
    # A mask of the wrong size: its image stays, without the mask.
    mismatched = next(source.glob("ground_truth/stain/*_mask.png"))
    mismatched.write_bytes(encode("PNG", (32, 32)))
    # A defect image that is damaged: its mask is set aside with it.
    damaged = next(source.glob("test/scratch/*.jpg"))
    damaged.write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    expected = {rel: reason for rel, (_, reason) in bad.items()}
    expected[mismatched.relative_to(source).as_posix()] = "mask_mismatch"
    expected[damaged.relative_to(source).as_posix()] = "corrupt"
    expected[f"ground_truth/scratch/{damaged.stem}_mask.png"] = "image_quarantined"
    originals = tree(source)
    out, quarantine = tmp_path / "dataset", tmp_path / "quarantine"
    config = ValidationConfig(min_images_per_class=2, max_side=128, max_quarantine_fraction=0.5)

    report = validate_dataset(str(source), out, config, quarantine_dir=quarantine)

    assert report.passed, report.failure_message()
    assert {q.path: q.reason for q in report.quarantined} == expected
    assert report.total_files == 60 + 30 + len(bad)
    assert report.quarantine_fraction == pytest.approx(len(expected) / report.total_files)
    assert all(q.detail for q in report.quarantined)
    listed = json.loads((quarantine / QUARANTINE_FILE).read_text())
    assert [(q["path"], q["reason"]) for q in listed] == sorted(expected.items())
    for rel in expected:
        assert (quarantine / "files" / rel).read_bytes() == originals[rel], rel
        assert not (out / rel).exists(), rel
    manifest = Manifest.read(out)
    paths = {e.path for e in manifest.entries}
    assert len(paths) == 60 - 1 and damaged.relative_to(source).as_posix() not in paths
    stain_image = f"{mismatched.parent.name}/{mismatched.stem.removesuffix('_mask')}.jpg"
    (stain_entry,) = [e for e in manifest.entries if e.path.endswith(stain_image)]
    assert stain_entry.mask is None
    page = report.to_html()
    assert "README &lt;b&gt;&amp;.txt" in page and "<b>&" not in page
    assert "extension_mismatch" in page and "truncated" in page


def test_too_many_bad_files_fail_after_everything_was_written(source, tmp_path):
    for i in range(12):
        put(source, f"train/good/broken{i}.jpg", b"\xff\xd8\xff" + bytes(40))
    out, quarantine = tmp_path / "dataset", tmp_path / "quarantine"

    with pytest.raises(ValidationFailed) as failure:
        validate_dataset(str(source), out, CONFIG, quarantine_dir=quarantine)

    report = failure.value.report
    assert not report.passed and report.checks_passed
    message = str(failure.value)
    assert message == report.failure_message()
    assert "12 of 102 files were quarantined (fraction 0.118)" in message
    assert "max_quarantine_fraction=0.1" in message
    assert "corrupt 12" in message
    assert len(Manifest.read(out).entries) == 60
    assert len(json.loads((quarantine / QUARANTINE_FILE).read_text())) == 12
    assert len(list((quarantine / "files" / "train" / "good").iterdir())) == 12
    assert "FAILED" in report.to_html()


def test_the_caller_may_decide_instead_of_an_exception(source, tmp_path):
    put(source, "train/good/broken.jpg", b"\xff\xd8\xff" + bytes(40))
    config = ValidationConfig(min_images_per_class=2, max_quarantine_fraction=0.0)
    report = validate_dataset(str(source), tmp_path / "dataset", config, raise_on_failure=False)
    assert not report.passed
    assert "max_quarantine_fraction=0.0" in report.failure_message()


def test_identical_content_in_train_and_test_is_named(source, tmp_path):
    shutil.copy(source / "train/good/0000.jpg", source / "test/good/copy.jpg")
    shutil.copy(source / "train/good/0001.jpg", source / "train/good/same-side-copy.jpg")  # not leakage

    report = validate_dataset(str(source), tmp_path / "dataset", CONFIG, raise_on_failure=False)

    failed = [c for c in report.checks if not c.success]
    assert [c.name for c in failed] == ["no_train_test_leakage"]
    assert "test/good/copy.jpg = train/good/0000.jpg" in failed[0].detail
    assert "same-side-copy" not in failed[0].detail
    message = report.failure_message()
    assert "no_train_test_leakage" in message and "test/good/copy.jpg" in message
    assert report.quarantined == ()


def test_classes_below_the_minimum_are_caught_even_when_absent_from_a_split(source, tmp_path):
    shutil.rmtree(source / "test" / "crack")
    config = ValidationConfig(min_images_per_class=3)

    with pytest.raises(ValidationFailed) as failure:
        validate_dataset(str(source), tmp_path / "dataset", config)

    (check,) = [c for c in failure.value.report.checks if not c.success]
    assert check.name == "min_images_per_class"
    assert "test/crack has 0 (needs 3)" in check.detail
    assert "test/hole has 2 (needs 3)" in check.detail and "test/stain has 2 (needs 3)" in check.detail
    assert "train/" not in check.detail
    assert "lower min_images_per_class" in str(failure.value)


def test_required_images_is_the_rule_for_good_and_defect_types():
    config = ValidationConfig(min_images_per_class=5)
    assert [required_images(split, GOOD, config) for split in ("train", "test")] == [5, 5]
    assert [required_images(split, "scratch", config) for split in ("train", "test")] == [0, 5]
    # A minimum of 0 still leaves the model good parts to learn from and be measured on.
    lax = ValidationConfig(min_images_per_class=0)
    assert [required_images(split, GOOD, lax) for split in ("train", "test")] == [1, 1]
    assert [required_images(split, "scratch", lax) for split in ("train", "test")] == [0, 0]


@pytest.mark.parametrize("val_fraction", [0.2, 0.5])
def test_train_with_good_images_only_passes_and_says_training_relies_on_synthetic_anomalies(source, tmp_path,
                                                                                            val_fraction):
    thin_train_defects(source)  # MVTec AD's layout: train/good only, test good and defect
    config = ValidationConfig(min_images_per_class=2, val_fraction=val_fraction)

    report = validate_dataset(str(source), tmp_path / "dataset", config, quarantine_dir=tmp_path / "quarantine")

    assert report.passed, report.failure_message()
    assert report.quarantined == ()
    counts = {c.name: c for c in report.checks}
    assert counts["min_images_per_class"].detail.endswith(
        "train holds 0 defect images: training relies on synthetic anomalies")
    assert "good needs 2 in train and in test, each defect type 2 in test and any number in train" in \
        counts["min_images_per_class"].detail
    assert counts["test_has_defect_images"].detail == "test holds 9 defect images of 4 defect types to measure the model on"
    table = report.manifest.counts()
    assert table["train"] == {GOOD: 21 - table["val"][GOOD]} and set(table["val"]) == {GOOD}
    assert table["test"] == {GOOD: 9, "crack": 2, "hole": 2, "scratch": 3, "stain": 2}


@pytest.mark.parametrize("val_fraction", [0.2, 0.5])
def test_a_few_train_defects_pass_and_a_lone_one_stays_in_train(source, tmp_path, val_fraction):
    thin_train_defects(source, keep={"crack": 1, "hole": 2})
    config = ValidationConfig(min_images_per_class=2, val_fraction=val_fraction)

    report = validate_dataset(str(source), tmp_path / "dataset", config)

    assert report.passed, report.failure_message()
    detail = next(c for c in report.checks if c.name == "min_images_per_class").detail
    assert detail.endswith("train holds 3 defect images (crack 1, hole 2); synthetic anomalies stand in for the "
                           "defect types it lacks (scratch, stain)"), detail
    table = report.manifest.counts()
    # The stratified val split: a lone image stays in train, two are shared one each.
    assert table["train"]["crack"] == 1 and "crack" not in table["val"]
    assert table["train"]["hole"] == 1 and table["val"]["hole"] == 1


def test_a_defect_type_with_too_few_test_images_fails_by_name(source, tmp_path):
    thin_train_defects(source)
    dropped = sorted((source / "test/crack").iterdir())[0]
    dropped.unlink()
    (source / "ground_truth/crack" / f"{dropped.stem}_mask.png").unlink()

    with pytest.raises(ValidationFailed) as failure:
        validate_dataset(str(source), tmp_path / "dataset", CONFIG)

    (check,) = [c for c in failure.value.report.checks if not c.success]
    assert check.name == "min_images_per_class"
    assert check.detail.startswith("too few images in 1 of 6 split/class pairs")
    assert check.detail.endswith(": test/crack has 1 (needs 2)")
    assert "test/crack has 1 (needs 2)" in str(failure.value)


def test_train_good_below_the_minimum_fails(source, tmp_path):
    thin_train_defects(source)
    for image in sorted((source / "train/good").iterdir())[4:]:
        image.unlink()
    config = ValidationConfig(min_images_per_class=5)

    report = validate_dataset(str(source), tmp_path / "dataset", config, raise_on_failure=False)

    (check,) = [c for c in report.checks if not c.success]
    assert check.name == "min_images_per_class"
    # test/good has 9 and every test defect type fewer than 5, but that is not all that is wrong: train/good too.
    assert "train/good has 4 (needs 5)" in check.detail
    assert "good needs 5 in train and in test" in check.detail


def test_a_test_split_without_defects_is_refused_whatever_the_minimum(source, tmp_path):
    for folder in (source / "test").iterdir():
        if folder.name != GOOD:
            shutil.rmtree(folder)
    shutil.rmtree(source / "ground_truth")  # the masks of the test defects, and of train's
    config = ValidationConfig(min_images_per_class=0)

    report = validate_dataset(str(source), tmp_path / "dataset", config, raise_on_failure=False)

    (check,) = [c for c in report.checks if not c.success]
    assert check.name == "test_has_defect_images"
    assert check.detail == ("test holds no defect image, so recall and AUROC cannot be measured (defect types "
                            "found only in train: crack, hole, scratch, stain)")
    assert "Add defect images under test/<defect type>/" in report.failure_message()

    thin_train_defects(source)  # good images only, anywhere: nothing at all to measure
    report = validate_dataset(str(source), tmp_path / "good-only", config, raise_on_failure=False)
    assert [c.name for c in report.checks if not c.success] == ["test_has_defect_images"]


def test_good_images_are_required_even_where_none_were_found(source, tmp_path):
    shutil.rmtree(source / "train" / GOOD)
    shutil.rmtree(source / "test" / GOOD)
    config = ValidationConfig(min_images_per_class=0)

    report = validate_dataset(str(source), tmp_path / "dataset", config, raise_on_failure=False)

    (check,) = [c for c in report.checks if not c.success]
    assert check.name == "min_images_per_class"
    assert check.detail.endswith(": train/good has 0 (needs 1); test/good has 0 (needs 1)"), check.detail


def test_classes_outside_allowed_classes_are_caught(source, tmp_path):
    config = ValidationConfig(min_images_per_class=2, allowed_classes=("good", "scratch", "hole", "stain"))
    report = validate_dataset(str(source), tmp_path / "dataset", config, raise_on_failure=False)
    (check,) = [c for c in report.checks if not c.success]
    assert check.name == "class_allowed"
    assert "class='crack'" in check.detail


def test_an_empty_source_fails_with_a_clear_message(tmp_path):
    (tmp_path / "source").mkdir()
    report = validate_dataset(str(tmp_path / "source"), tmp_path / "dataset", CONFIG, raise_on_failure=False)
    assert not report.passed
    assert "has_images failed: no image passed decoding" in report.failure_message()


def test_output_directories_must_be_fresh_and_separate(source, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        validate_dataset(str(source), tmp_path / "used", CONFIG)
    with pytest.raises(ValueError, match="must not contain each other"):
        validate_dataset(str(source), tmp_path / "out", CONFIG, quarantine_dir=tmp_path / "out" / "q")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_quarantine_fraction": 1.5}, "max_quarantine_fraction must be in \\[0, 1\\], got 1.5"),
        ({"val_fraction": 1.0}, "val_fraction must be in \\[0, 1\\), got 1.0"),
        ({"seed": -2}, "got -2"),
        ({"min_side": 0}, "min_side must be at least 1 px, got 0"),
        ({"min_side": 64, "max_side": 32}, "max_side \\(32\\) must not be below min_side \\(64\\)"),
        ({"max_pixels": 10}, "max_pixels \\(10\\)"),
        ({"min_images_per_class": -1}, "got -1"),
        ({"allowed_classes": ("good", "a/b")}, "'a/b'"),
        ({"allowed_classes": ("good", "good")}, "duplicates"),
    ],
)
def test_config_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ValidationConfig(**kwargs)


def test_config_accepts_a_list_of_classes():
    config = ValidationConfig(allowed_classes=["good", "scratch"])
    assert config.allowed_classes == ("good", "scratch")
    assert hash(config) == hash(ValidationConfig(allowed_classes=("good", "scratch")))

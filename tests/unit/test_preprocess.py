import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectkit.data import Manifest, ManifestEntry, sha256_bytes
from defectkit.image import ImageRejected
from defectkit.preprocess import (
    FEATURE_NAMES,
    PreprocessSpec,
    image_features,
    load_split,
    preprocess_dataset,
    read_info,
    read_spec,
    to_model_input,
)

SPEC = PreprocessSpec(image_size=32)


def textured(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), ((x // 8 + y // 8) % 2) * 200], axis=-1)
    return Image.fromarray(np.clip(base + rng.integers(0, 30, (height, width, 3)), 0, 255).astype(np.uint8))


def encode(picture: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **options)
    return buffer.getvalue()


# (path, split, class): manifest order is by path; val was carved from train and stays under train/.
LAYOUT = [
    ("test/good/t0.png", "test", "good"),
    ("test/good/t1.jpg", "test", "good"),
    ("test/hole/t2.png", "test", "hole"),
    ("test/scratch/t3.bmp", "test", "scratch"),
    ("train/good/a0.jpg", "train", "good"),
    ("train/good/a1.png", "train", "good"),
    ("train/good/a2.png", "val", "good"),
    ("train/good/a3.jpeg", "train", "good"),
    ("train/good/a4.tif", "train", "good"),
    ("train/good/a5.webp", "train", "good"),
    ("train/good/a6.png", "train", "good"),
    ("train/good/a7.jpg", "val", "good"),
    ("train/scratch/s0.png", "train", "scratch"),
]
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".webp": "WEBP"}


def make_dataset(root: Path, layout=LAYOUT) -> Manifest:
    entries = []
    for seed, (rel, split, class_name) in enumerate(layout):
        picture = textured(48 + 8 * seed, 40 + 4 * seed, seed)
        if seed % 3 == 1:
            picture = picture.convert("L")  # mixed modes, as real datasets have
        data = encode(picture, FORMATS[Path(rel).suffix])
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        entries.append(
            ManifestEntry(rel, split, class_name, sha256_bytes(data), len(data), picture.width, picture.height, picture.mode)
        )
    manifest = Manifest(tuple(entries), source="test")
    manifest.write(root)
    return manifest


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    make_dataset(root)
    return root


@pytest.fixture(scope="module")
def preprocessed(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preprocessed")
    preprocess_dataset(dataset, out, SPEC, workers=2, shard_size=3)
    return out


def test_spec_json_round_trip_and_validation():
    spec = PreprocessSpec(image_size=128, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert PreprocessSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(ValueError, match="unknown preprocess spec keys"):
        PreprocessSpec.from_json({**spec.to_json(), "crop": 0.9})
    with pytest.raises(ValueError, match="image_size"):
        PreprocessSpec(image_size=4)
    with pytest.raises(ValueError, match="std"):
        PreprocessSpec(std=(0.2, 0.0, 0.2))


def test_model_input_is_square_contiguous_uint8_and_deterministic():
    data = encode(textured(300, 120, 1), "PNG")
    pixels = to_model_input(data, SPEC, name="wide.png")
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert pixels.flags.c_contiguous and pixels.flags.writeable
    assert np.array_equal(pixels, to_model_input(data, SPEC, name="wide.png"))
    # The whole image is squashed, not cropped: the red ramp spans the full width.
    assert pixels[:, 0, 0].mean() < 40 and pixels[:, -1, 0].mean() > 215


def test_model_input_matches_a_plain_bilinear_resize_for_non_jpeg():
    source = textured(200, 150, 2)
    expected = np.asarray(source.resize((32, 32), Image.Resampling.BILINEAR))
    difference = np.abs(to_model_input(encode(source, "PNG"), SPEC).astype(int) - expected)
    assert difference.mean() < 0.5 and difference.max() <= 4  # reducing_gap's box prefilter, nothing more


def test_jpeg_draft_decoding_is_close_to_a_full_decode():
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:1024, 0:1024]
    scene = np.stack([x / 4, y / 4, 128 + 60 * np.sin(x / 23.0) * np.cos(y / 31.0)], axis=-1)
    data = encode(Image.fromarray(np.clip(scene + rng.normal(0, 4, scene.shape), 0, 255).astype(np.uint8)), "JPEG", quality=90)
    spec = PreprocessSpec(image_size=224)
    ours = to_model_input(data, spec).astype(float)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))
    difference = np.abs(ours - full)
    assert difference.mean() < 1.5 and np.percentile(difference, 99) < 8


def test_model_input_passes_rejections_through():
    with pytest.raises(ImageRejected) as caught:
        to_model_input(b"not an image", SPEC, name="upload.png")
    assert caught.value.reason == "unsupported_format"
    with pytest.raises(ImageRejected) as caught:
        to_model_input(encode(textured(100, 100, 0), "PNG"), SPEC, max_pixels=100)
    assert caught.value.reason == "too_large"


def reference_features(pixels: np.ndarray) -> dict[str, float]:
    rgb = pixels.astype(float)
    grey = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    height, width = grey.shape
    laplacian = [
        grey[i - 1, j] + grey[i + 1, j] + grey[i, j - 1] + grey[i, j + 1] - 4 * grey[i, j]
        for i in range(1, height - 1)
        for j in range(1, width - 1)
    ]
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    saturation = [(h - lo) / h if h else 0.0 for h, lo in zip(high.ravel(), low.ravel())]
    return {
        "brightness": grey.mean(),
        "contrast": grey.std(),
        "sharpness": float(np.var(laplacian)),
        **{f"{c}_mean": rgb[..., i].mean() for i, c in enumerate("rgb")},
        **{f"{c}_std": rgb[..., i].std() for i, c in enumerate("rgb")},
        "saturation": float(np.mean(saturation)),
    }


def test_image_features_match_a_direct_computation():
    pixels = np.asarray(textured(20, 12, 4))
    features = image_features(pixels)
    assert tuple(features) == FEATURE_NAMES
    expected = reference_features(pixels)
    for name in FEATURE_NAMES:
        assert features[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-4), name


def test_image_features_of_simple_images():
    grey = image_features(np.full((16, 16, 3), 90, np.uint8))
    assert grey["brightness"] == pytest.approx(90, abs=1e-3)
    assert grey["contrast"] == grey["sharpness"] == grey["saturation"] == 0
    red = image_features(np.tile(np.array([255, 0, 0], np.uint8), (8, 8, 1)))
    assert red["saturation"] == 1 and red["r_mean"] == 255 and red["g_mean"] == 0
    checkers = (np.indices((32, 32)).sum(axis=0) % 2 * 255).astype(np.uint8)
    sharp = np.repeat(checkers[..., None], 3, axis=2)
    blurred = np.asarray(Image.fromarray(sharp).resize((8, 8)).resize((32, 32)))
    assert image_features(sharp)["sharpness"] > 10 * image_features(blurred)["sharpness"]
    with pytest.raises(ValueError, match="uint8"):
        image_features(np.zeros((4, 4), np.uint8))


def test_preprocess_json_describes_the_output(preprocessed, dataset):
    info = read_info(preprocessed)
    assert info["format"] == "defectkit.preprocessed/v1"
    assert info["spec"] == SPEC.to_json() and read_spec(preprocessed) == SPEC
    assert info["dataset_fingerprint"] == Manifest.read(dataset).fingerprint
    assert info["classes"] == ["good", "hole", "scratch"]
    assert info["defect_types"] == ["hole", "scratch"]
    assert info["counts"] == {"train": 7, "val": 2, "test": 4}
    assert info["shards"] == {
        "train": ["train-00000.npz", "train-00001.npz", "train-00002.npz"],
        "val": ["val-00000.npz"],
        "test": ["test-00000.npz", "test-00001.npz"],
    }
    assert sorted(p.name for p in (preprocessed / "shards").iterdir()) == sorted(sum(info["shards"].values(), []))


def test_shards_hold_images_labels_classes_and_paths_in_manifest_order(preprocessed, dataset):
    with np.load(preprocessed / "shards" / "test-00000.npz", allow_pickle=False) as shard:
        assert set(shard.files) == {"images", "labels", "class_index", "paths"}
        assert shard["images"].shape == (3, 32, 32, 3) and shard["images"].dtype == np.uint8
        assert shard["labels"].dtype == np.uint8 and shard["class_index"].dtype == np.int16
        assert list(shard["paths"]) == ["test/good/t0.png", "test/good/t1.jpg", "test/hole/t2.png"]
        assert list(shard["labels"]) == [0, 0, 1]
        assert list(shard["class_index"]) == [0, 0, 1]
        assert np.array_equal(
            shard["images"][2], to_model_input((dataset / "test/hole/t2.png").read_bytes(), SPEC)
        )


def test_load_split_round_trip(preprocessed, dataset):
    for split in ("train", "val", "test"):
        expected = [row for row in LAYOUT if row[1] == split]
        loaded = load_split(preprocessed, split)
        assert loaded.paths == tuple(rel for rel, _, _ in expected)
        assert loaded.class_names == tuple(class_name for _, _, class_name in expected)
        assert loaded.labels.tolist() == [int(class_name != "good") for _, _, class_name in expected]
        assert loaded.images.shape == (len(expected), 32, 32, 3)
        for pixels, rel in zip(loaded.images, loaded.paths):
            assert np.array_equal(pixels, to_model_input((dataset / rel).read_bytes(), SPEC, name=rel))
    with pytest.raises(ValueError, match="unknown split"):
        load_split(preprocessed, "holdout")


def test_features_csv_has_one_row_per_image(preprocessed):
    with (preprocessed / "features.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "split", "class", *FEATURE_NAMES]
    order = [row for split in ("train", "val", "test") for row in LAYOUT if row[1] == split]
    assert [(r["path"], r["split"], r["class"]) for r in rows] == order
    first = load_split(preprocessed, "train").images[0]
    expected = image_features(first)
    assert {name: float(rows[0][name]) for name in FEATURE_NAMES} == expected


def test_output_is_identical_whatever_the_worker_count(preprocessed, dataset, tmp_path):
    inline = tmp_path / "inline"
    preprocess_dataset(dataset, inline, SPEC, workers=1, shard_size=3)
    assert (inline / "features.csv").read_bytes() == (preprocessed / "features.csv").read_bytes()
    assert read_info(inline) == read_info(preprocessed)
    for name in sorted(p.name for p in (preprocessed / "shards").iterdir()):
        with np.load(inline / "shards" / name) as a, np.load(preprocessed / "shards" / name) as b:
            for key in ("images", "labels", "class_index", "paths"):
                assert np.array_equal(a[key], b[key]), (name, key)


def test_empty_split_loads_as_empty_arrays(tmp_path):
    dataset = tmp_path / "dataset"
    make_dataset(dataset, [row for row in LAYOUT if row[1] != "val"][:4])
    result = preprocess_dataset(dataset, tmp_path / "out", SPEC, workers=1)
    assert result.counts == {"train": 0, "val": 0, "test": 4}
    assert result.shards == {"train": (), "val": (), "test": ("test-00000.npz",)}
    empty = load_split(tmp_path / "out", "val")
    assert empty.images.shape == (0, 32, 32, 3) and empty.labels.shape == (0,)
    assert empty.paths == () and empty.class_names == ()


def test_rerun_into_the_same_directory_replaces_the_old_output(tmp_path):
    dataset = tmp_path / "dataset"
    make_dataset(dataset, LAYOUT[:2])
    out = tmp_path / "out"
    preprocess_dataset(dataset, out, SPEC, workers=1, shard_size=1)
    preprocess_dataset(dataset, out, SPEC, workers=1, shard_size=2)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["test-00000.npz"]
    assert read_info(out)["shards"]["test"] == ["test-00000.npz"]


def test_progress_is_logged_with_a_rate(dataset, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="defectkit.preprocess"):
        preprocess_dataset(dataset, tmp_path / "out", SPEC, workers=1)
    progress = [r.getMessage() for r in caplog.records if "images/s" in r.getMessage() and "%" in r.getMessage()]
    assert 5 <= len(progress) <= 13  # about one per 10% of 13 images
    assert progress[-1].startswith("preprocessed 13/13 images (100%")


@pytest.mark.parametrize("workers", [1, 2])
def test_an_undecodable_file_fails_naming_it(dataset, tmp_path, workers):
    broken = tmp_path / "dataset"
    make_dataset(broken)
    data = (broken / "train/good/a6.png").read_bytes()
    (broken / "train/good/a6.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match=r"train/good/a6\.png.*truncated.*re-run validation"):
        preprocess_dataset(broken, tmp_path / "out", SPEC, workers=workers)
    assert not (tmp_path / "out" / "preprocess.json").exists()
    assert not list((tmp_path / "out" / "shards").glob(".*.tmp"))


def test_a_missing_file_fails_naming_it(tmp_path):
    broken = tmp_path / "dataset"
    make_dataset(broken)
    (broken / "test/hole/t2.png").unlink()
    with pytest.raises(RuntimeError, match=r"test/hole/t2\.png"):
        preprocess_dataset(broken, tmp_path / "out", SPEC, workers=2)


def test_reading_something_that_is_not_preprocessed_output_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete preprocessed artifact"):
        read_info(tmp_path)
    (tmp_path / "preprocess.json").write_text(json.dumps({"format": "other/v9"}))
    with pytest.raises(ValueError, match="other/v9"):
        read_spec(tmp_path)


def test_a_dataset_with_another_fingerprint_is_refused_before_anything_is_written(dataset, tmp_path):
    fingerprint = Manifest.read(dataset).fingerprint
    with pytest.raises(ValueError, match=f"does not match the expected {'0' * 64}"):
        preprocess_dataset(dataset, tmp_path / "refused", SPEC, workers=1, expected_fingerprint="0" * 64)
    assert not (tmp_path / "refused").exists()
    preprocess_dataset(dataset, tmp_path / "out", SPEC, workers=1, expected_fingerprint=fingerprint)
    assert read_info(tmp_path / "out")["dataset_fingerprint"] == fingerprint

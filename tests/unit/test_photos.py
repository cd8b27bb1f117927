"""The real-photograph benchmark dataset: deterministic, in the MVTec layout, and checked against its sources."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from defectkit.data import parse_layout
from defectkit.synthetic import DEFECT_TYPES, draw_defect
from tests import photos


def _tree(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_same_seed_gives_the_same_files_and_another_seed_others(tmp_path):
    photos.build(tmp_path / "a", train=20, test=10, size=64, seed=3)
    photos.build(tmp_path / "b", train=20, test=10, size=64, seed=3)
    photos.build(tmp_path / "c", train=20, test=10, size=64, seed=4)
    a, b, c = (_tree(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_the_layout_is_mvtec_with_a_mask_for_every_defect(tmp_path):
    counts = photos.build(tmp_path, train=20, test=10, size=64, seed=0)
    assert counts == {"train": {"good": 10, **{t: 10 // 4 + (i < 10 % 4) for i, t in enumerate(DEFECT_TYPES)}},
                      "test": {"good": 5, **{t: 5 // 4 + (i < 5 % 4) for i, t in enumerate(DEFECT_TYPES)}}}
    layout = parse_layout([p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()])
    assert not layout.unexpected
    defects = [image for image in layout.images if image.is_defect]
    assert defects and all(image.mask for image in defects)
    assert not any(image.mask for image in layout.images if not image.is_defect)
    surfaces = {image.path.split("/")[-1].split("_")[0] for image in layout.images}
    assert surfaces == set(photos.PHOTOGRAPHS)


@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
def test_a_defect_changes_the_photograph_where_its_mask_says(defect_type):
    rng = np.random.default_rng(7)
    crop = photos.crop(rng, "gravel", 128)
    image, mask = draw_defect(defect_type, rng, crop.copy())
    difference = np.abs(image - crop).mean(axis=2)
    assert 0 < mask.mean() < 0.3
    assert difference[mask].mean() > 5 * difference[~mask].mean()


def test_a_changed_photograph_is_refused(monkeypatch):
    name, _, tint = photos.PHOTOGRAPHS["brick"]
    monkeypatch.setitem(photos.PHOTOGRAPHS, "brick", (name, "0" * 64, tint))
    photos.photograph.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="brick.png has sha256 .* not 0000"):
            photos.photograph("brick")
    finally:
        photos.photograph.cache_clear()


def test_a_non_empty_directory_and_too_few_images_are_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        photos.build(tmp_path / "x", train=20, test=10)
    with pytest.raises(ValueError, match="train=4"):
        photos.build(tmp_path / "y", train=4, test=10)

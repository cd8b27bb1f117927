"""The validation split of classes with one or two train images: what few-defect product lines have."""

from __future__ import annotations

import pytest

from defectkit.data import GOOD, ImageFile, assign_validation


def _train(class_name: str, count: int) -> list[ImageFile]:
    return [ImageFile(f"train/{class_name}/{i}.png", "train", class_name) for i in range(count)]


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5, 0.9])
def test_a_lone_image_stays_in_train_and_two_are_shared_one_each(fraction):
    files = _train(GOOD, 10) + _train("crack", 1) + _train("hole", 2)

    assigned = assign_validation(files, fraction, seed=3)

    splits = {name: sorted(f.split for f in assigned if f.class_name == name) for name in (GOOD, "crack", "hole")}
    assert splits["crack"] == ["train"]
    assert splits["hole"] == ["train", "val"]
    assert "train" in splits[GOOD] and "val" in splits[GOOD]


def test_no_fraction_moves_nothing_even_for_two_images():
    assert {f.split for f in assign_validation(_train("hole", 2), 0.0, seed=0)} == {"train"}

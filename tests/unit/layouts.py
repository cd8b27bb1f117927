"""Dataset layouts of product lines with few or no real defect images yet, cut from a full sample on disk."""

from __future__ import annotations

from pathlib import Path

from defectkit.data import GOOD, MASK_DIR


def thin_train_defects(root: Path, keep: dict[str, int] | None = None) -> None:
    """Delete train defect images under ``root`` (with their masks), keeping the first ``keep[type]`` of a type.

    With no ``keep`` only ``train/good`` is left: MVTec AD's layout, where train holds good images only.
    """
    keep = keep or {}
    for folder in sorted((root / "train").iterdir()):
        if folder.name == GOOD:
            continue
        for index, image in enumerate(sorted(folder.iterdir())):
            if index < keep.get(folder.name, 0):
                continue
            image.unlink()
            (root / MASK_DIR / folder.name / f"{image.stem}_mask.png").unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()

"""The golden set: a few test images with the scores offline evaluation gave them.

Before a candidate gets any traffic, it must reproduce these scores when
served; that proves serving decodes, resizes and normalises exactly as
evaluation did. Built where torch is (the evaluation step), read anywhere.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from defectkit.files import write_json_atomic

log = logging.getLogger(__name__)

GOLDEN_FILE = "golden.json"
GOLDEN_FORMAT = "defectkit.golden/v1"
GOLDEN_IMAGES = "images"


@dataclass(frozen=True)
class Golden:
    """Test-set images and the scores offline evaluation gave them; the candidate must reproduce the scores."""

    names: tuple[str, ...]
    images: tuple[bytes, ...]
    scores: tuple[float, ...]
    weights_sha256: str


def build_golden(dataset_dir: Path, model_dir: Path, out_dir: Path, *, count: int = 8, device: str = "cpu") -> Path:
    """Copy ``count`` test images of the dataset artifact (good and defective alike) to ``out_dir/images`` and
    write ``out_dir/golden.json`` with the model's offline scores for them. Needs torch."""
    import numpy as np

    from defectkit import models, preprocess
    from defectkit.data import GOOD, Manifest

    if count < 1:
        raise ValueError(f"golden image count {count} must be at least 1")
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    entries = sorted(Manifest.read(dataset_dir).split("test"), key=lambda e: e.path)
    if not entries:
        raise ValueError(f"{dataset_dir} has no test images to take golden images from")
    good = [e for e in entries if e.class_name == GOOD]
    defects = [e for e in entries if e.class_name != GOOD]
    # Both kinds, so that a candidate that calls everything good (or defective) is caught too.
    chosen = [e for pair in zip(good, defects) for e in pair] + good[len(defects):] + defects[len(good):]
    chosen = chosen[:count]
    model = models.load_model(Path(model_dir), device)
    spec = model.metadata.preprocess
    files = [(dataset_dir / e.path).read_bytes() for e in chosen]
    scores = model.scores(np.stack([preprocess.to_model_input(data, spec, name=e.path)
                                    for data, e in zip(files, chosen)]))
    (out_dir / GOLDEN_IMAGES).mkdir(parents=True, exist_ok=True)
    images = []
    for index, (entry, data, score) in enumerate(zip(chosen, files, scores.tolist())):
        name = f"{index:03d}-{Path(entry.path).name}"
        (out_dir / GOLDEN_IMAGES / name).write_bytes(data)
        images.append({"file": f"{GOLDEN_IMAGES}/{name}", "source": entry.path, "class": entry.class_name,
                       "score": score})
    write_json_atomic(out_dir / GOLDEN_FILE, {"format": GOLDEN_FORMAT,
                                              "weights_sha256": model.metadata.weights_sha256, "images": images})
    log.info("golden set of %d images written to %s", len(images), out_dir)
    return out_dir


def read_golden(golden_dir: Path) -> Golden:
    golden_dir = Path(golden_dir)
    path = golden_dir / GOLDEN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; build a golden set with "
                                f"defectkit.golden.build_golden(dataset_dir, model_dir, out_dir)")
    record_ = json.loads(path.read_text())
    if record_.get("format") != GOLDEN_FORMAT:
        raise ValueError(f"{path} format {record_.get('format')!r} is not {GOLDEN_FORMAT!r}")
    items = record_["images"]
    return Golden(names=tuple(i["source"] for i in items),
                  images=tuple((golden_dir / i["file"]).read_bytes() for i in items),
                  scores=tuple(float(i["score"]) for i in items), weights_sha256=record_.get("weights_sha256", ""))

"""The golden set: a few test images with the scores offline evaluation gave them.

Before a candidate gets any traffic, it must reproduce these scores when
served; that proves serving decodes, resizes and normalises exactly as
evaluation did. Built where torch is (``evaluation.build_golden``), read
anywhere: this module needs neither torch nor numpy.
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
    precision: str = "fp32"  # what computed ``scores``; sets of an earlier format were all fp32


def write_golden(out_dir: Path, chosen: list[tuple[str, str, bytes, float]], weights_sha256: str,
                 precision: str) -> Path:
    """Write the golden set: ``chosen`` holds (source path, class, image bytes, offline score) per image,
    scored in ``precision``."""
    out_dir = Path(out_dir)
    (out_dir / GOLDEN_IMAGES).mkdir(parents=True, exist_ok=True)
    images = []
    for index, (source, class_name, data, score) in enumerate(chosen):
        name = f"{index:03d}-{Path(source).name}"
        (out_dir / GOLDEN_IMAGES / name).write_bytes(data)
        images.append({"file": f"{GOLDEN_IMAGES}/{name}", "source": source, "class": class_name, "score": score})
    write_json_atomic(out_dir / GOLDEN_FILE, {"format": GOLDEN_FORMAT, "weights_sha256": weights_sha256,
                                              "precision": precision, "images": images})
    log.info("golden set of %d images written to %s", len(images), out_dir)
    return out_dir


def read_golden(golden_dir: Path) -> Golden:
    golden_dir = Path(golden_dir)
    path = golden_dir / GOLDEN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; build a golden set with "
                                f"defectkit.evaluation.build_golden(dataset_dir, model_dir, out_dir)")
    record_ = json.loads(path.read_text())
    if record_.get("format") != GOLDEN_FORMAT:
        raise ValueError(f"{path} format {record_.get('format')!r} is not {GOLDEN_FORMAT!r}")
    items = record_["images"]
    return Golden(names=tuple(i["source"] for i in items),
                  images=tuple((golden_dir / i["file"]).read_bytes() for i in items),
                  scores=tuple(float(i["score"]) for i in items), weights_sha256=record_.get("weights_sha256", ""),
                  precision=record_.get("precision", "fp32"))

"""The ONNX export of a judged model, loaded and scored with ONNX Runtime: no torch needed.

The file is self-describing: the decision threshold, the preprocessing
(input size, mean and std) and the weights it came from are in its metadata
(``defectkit.*`` keys), and the graph itself takes uint8 NHWC pixels and
returns defect probabilities, so the normalisation cannot be lost on the way
(the failure anomalib's users report for exports). Its record
(``model.onnx.json``, written by :mod:`defectkit.export`) holds the file's
sha256 and the scores PyTorch gave for a seeded batch: every load checks both,
so a file that scores differently from the model it was exported from is
refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectkit.artifact import ONNX_FILE, ONNX_RECORD, ModelIntegrityError, sha256_bytes
from defectkit.cores import usable_cores

log = logging.getLogger(__name__)

FORMAT = "defectkit.onnx/v1"
INPUT, OUTPUT = "pixels", "score"
PARITY_TOLERANCE = 1e-4  # max |score difference| from PyTorch fp32 accepted at export and at every load
REFERENCE_SEED, REFERENCE_COUNT = 0, 4


def reference_images(image_size: int, seed: int = REFERENCE_SEED, count: int = REFERENCE_COUNT) -> np.ndarray:
    """The seeded uint8 NHWC batch whose PyTorch scores the record keeps, regenerated identically at load."""
    return np.random.default_rng(seed).integers(0, 256, (count, image_size, image_size, 3), dtype=np.uint8)


@dataclass(frozen=True)
class ExportMetadata:
    """What the ONNX file's metadata says about the model it holds."""

    threshold: float | None
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    preprocess: dict
    weights_sha256: str
    architecture: str

    def to_props(self) -> dict[str, str]:
        return {"defectkit.format": FORMAT, "defectkit.threshold": json.dumps(self.threshold),
                "defectkit.image_size": str(self.image_size), "defectkit.mean": json.dumps(list(self.mean)),
                "defectkit.std": json.dumps(list(self.std)), "defectkit.preprocess": json.dumps(self.preprocess),
                "defectkit.weights_sha256": self.weights_sha256, "defectkit.architecture": self.architecture,
                "defectkit.input": f"{INPUT}: uint8 [N, {self.image_size}, {self.image_size}, 3] RGB, resized as "
                                   "defectkit.preprocess says; normalised inside the graph",
                "defectkit.output": f"{OUTPUT}: float32 [N] defect probability; defect where >= defectkit.threshold"}

    @classmethod
    def from_props(cls, props: dict[str, str], where: str) -> ExportMetadata:
        if props.get("defectkit.format") != FORMAT:
            raise ValueError(f"{where}: ONNX metadata defectkit.format {props.get('defectkit.format')!r} is not "
                             f"{FORMAT!r}; not a defectkit export")
        return cls(threshold=json.loads(props["defectkit.threshold"]), image_size=int(props["defectkit.image_size"]),
                   mean=tuple(json.loads(props["defectkit.mean"])), std=tuple(json.loads(props["defectkit.std"])),
                   preprocess=json.loads(props["defectkit.preprocess"]),
                   weights_sha256=props["defectkit.weights_sha256"], architecture=props["defectkit.architecture"])


def session_options(threads: int = 0):
    """ONNX Runtime options: ``threads`` intra-op threads (0: one per core the process may use)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cores()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class ExportedModel:
    """An ONNX export loaded into ONNX Runtime after its sha256 and its parity with PyTorch were checked."""

    def __init__(self, model_dir: Path, *, threads: int = 0, check: bool = True) -> None:
        import onnxruntime as ort

        model_dir = Path(model_dir)
        self.path = model_dir / ONNX_FILE
        record_path = model_dir / ONNX_RECORD
        if not self.path.is_file() or not record_path.is_file():
            raise FileNotFoundError(f"{model_dir}: no ONNX export ({ONNX_FILE} + {ONNX_RECORD}); export the judged "
                                    f"model first (evaluation does)")
        data = self.path.read_bytes()
        self.record = json.loads(record_path.read_text())
        if sha256_bytes(data) != self.record.get("sha256"):
            raise ModelIntegrityError(f"{self.path}: sha256 {sha256_bytes(data)[:12]} does not match "
                                      f"{str(self.record.get('sha256'))[:12]} in {ONNX_RECORD}; the file was "
                                      f"modified or corrupted, export the model again")
        self.session = ort.InferenceSession(data, sess_options=session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.metadata = ExportMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        if check:
            self.check_parity()

    def scores(self, images: np.ndarray) -> np.ndarray:
        """float32 defect probabilities for uint8 NHWC images at the export's input size."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        size = self.metadata.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"images must be uint8 [N, {size}, {size}, 3], got {images.shape}")
        return self.session.run([OUTPUT], {INPUT: images})[0].astype(np.float32, copy=False)

    def check_parity(self) -> float:
        """Score the record's seeded batch; raise unless it matches PyTorch's scores within PARITY_TOLERANCE."""
        reference = self.record["reference"]
        images = reference_images(self.metadata.image_size, reference["seed"], len(reference["scores"]))
        worst = float(np.max(np.abs(self.scores(images) - np.asarray(reference["scores"], np.float32))))
        if not worst <= PARITY_TOLERANCE:
            raise ModelIntegrityError(f"{self.path}: ONNX Runtime {ort_version()} scores the reference batch up to "
                                      f"{worst:.2g} away from PyTorch (tolerance {PARITY_TOLERANCE:g}); not served")
        log.info("ONNX export %s loaded: parity with PyTorch %.2g (tolerance %g)", self.path, worst,
                 PARITY_TOLERANCE)
        return worst


def ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__

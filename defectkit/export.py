"""Export a judged model to ONNX, with its threshold and preprocessing inside, checked against PyTorch.

The exported graph is the whole scoring path from uint8 NHWC pixels to the
defect probability (:func:`defectkit.models.normalize`, the network, the
sigmoid), so a runtime cannot feed it unnormalised input. The parity check at
export scores the golden set with both PyTorch (fp32) and ONNX Runtime and
refuses an export whose scores differ by more than
:data:`defectkit.exported.PARITY_TOLERANCE`; the record beside the file keeps
PyTorch's scores of a seeded batch, which every load checks again
(:class:`defectkit.exported.ExportedModel`).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from defectkit import models
from defectkit.artifact import ONNX_FILE, ONNX_RECORD, sha256_bytes
from defectkit.exported import (
    FORMAT,
    INPUT,
    OUTPUT,
    PARITY_TOLERANCE,
    REFERENCE_SEED,
    ExportedModel,
    ExportMetadata,
    ort_version,
    reference_images,
)
from defectkit.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

OPSET = 17  # ONNX Runtime 1.32 runs opsets up to 23; 17 keeps older runtimes able to load the file


class ParityError(ValueError):
    """The export scores differently from the PyTorch model it came from."""


class ScoringGraph(torch.nn.Module):
    """uint8 NHWC pixels -> defect probability: what the server computes, as one graph."""

    def __init__(self, module: torch.nn.Module, spec: PreprocessSpec) -> None:
        super().__init__()
        self.module = module
        self.spec = spec

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.module(models.normalize(pixels, self.spec)).reshape(-1))


def export_onnx(model_dir: Path, parity_images: np.ndarray) -> dict:
    """Write ``model.onnx`` and ``model.onnx.json`` into the judged model directory ``model_dir``; returns the record.

    ``parity_images`` (uint8 NHWC at the model's input size, e.g. the golden set) are scored by both
    PyTorch fp32 and ONNX Runtime; an export that differs by more than the tolerance is removed and
    ParityError raised.
    """
    model_dir = Path(model_dir)
    model = models.load_model(model_dir, "cpu", precision="fp32")
    spec = model.metadata.preprocess
    graph = ScoringGraph(model.module.to(memory_format=torch.contiguous_format), spec).eval()
    example = torch.as_tensor(reference_images(spec.image_size, count=2))
    target = model_dir / ONNX_FILE
    # The TorchScript exporter: the torch.export-based one needs onnxscript, and the parity check below holds
    # whichever exporter wrote the file.
    with warnings.catch_warnings():
        # The mean and std become constants of the graph, as intended; the exporter's own deprecation notice.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        torch.onnx.export(graph, (example,), str(target), dynamo=False, opset_version=OPSET, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    metadata = ExportMetadata(threshold=model.metadata.threshold, image_size=spec.image_size, mean=tuple(spec.mean),
                              std=tuple(spec.std), preprocess=spec.to_json(),
                              weights_sha256=model.metadata.weights_sha256, architecture=model.metadata.architecture)
    data = _with_metadata(target, metadata.to_props())
    target.write_bytes(data)

    reference = reference_images(spec.image_size)
    record = {"format": FORMAT, "sha256": sha256_bytes(data), "weights_sha256": model.metadata.weights_sha256,
              "opset": OPSET, "torch": torch.__version__, "onnxruntime": ort_version(),
              "reference": {"seed": REFERENCE_SEED, "scores": model.scores(reference).tolist()}}
    (model_dir / ONNX_RECORD).write_text(json.dumps(record, indent=1))
    try:
        exported = ExportedModel(model_dir)  # checks the sha256 and the seeded batch
        parity_images = np.asarray(parity_images, dtype=np.uint8)
        ours, theirs = model.scores(parity_images), exported.scores(parity_images)
        worst = float(np.max(np.abs(ours - theirs))) if len(parity_images) else 0.0
        if not worst <= PARITY_TOLERANCE:
            raise ParityError(f"the ONNX export of {model_dir} scores {len(parity_images)} parity images up to "
                              f"{worst:.2g} away from PyTorch fp32 (tolerance {PARITY_TOLERANCE:g}); not exported")
    except Exception:
        target.unlink(missing_ok=True)
        (model_dir / ONNX_RECORD).unlink(missing_ok=True)
        raise
    record["parity"] = {"images": int(len(parity_images)), "max_abs_diff": worst, "tolerance": PARITY_TOLERANCE,
                        "pytorch_scores": ours.tolist(), "onnxruntime_scores": theirs.tolist()}
    (model_dir / ONNX_RECORD).write_text(json.dumps(record, indent=1))
    log.info("exported %s to ONNX (opset %d, %d bytes): parity with PyTorch on %d images %.2g (tolerance %g)",
             model_dir, OPSET, len(data), len(parity_images), worst, PARITY_TOLERANCE)
    return record


def _with_metadata(path: Path, props: dict[str, str]) -> bytes:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()

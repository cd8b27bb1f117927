"""What a request to the model server carries and what its answer holds: the names both sides use.

The predictor serves under these names; the delivery backends (which run where
there is no torch) build requests and read answers with them.
"""

from __future__ import annotations

IMAGE_INPUT = "image"  # encoded image files, BYTES
PIXELS_INPUT = "pixels"  # preprocessed pixels, UINT8 or FP32 [N, S, S, 3]
SCORE_OUTPUT = "score"  # defect probability, FP32
LABEL_OUTPUT = "label"  # good or defect at the model's threshold, BYTES
# A parameter of every answer: the precision the forward pass ran in (fp32, or bf16 on a GPU).
PRECISION_PARAMETER = "precision"
# A model served without a registry version is served under this many hex digits of its weights' sha256.
VERSION_PREFIX_LENGTH = 12
# What a server scores with (its --runtime): auto is ONNX Runtime where the model carries an export and the
# device is the CPU. Both the torch-free options and the predictor check against it.
RUNTIMES = ("auto", "torch", "onnxruntime")

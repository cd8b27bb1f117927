"""Bad input on a small scale: a mutated corpus at a real model server and through dataset validation, and the
memory a large image costs the decoder."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from defectkit import image
from tests.chaos import scenario_bad_input
from tests.chaos.stack import ROOT


def test_a_model_server_answers_mutated_images_with_clear_4xx_and_stays_ready(tmp_path):
    mutated, well_formed = scenario_bad_input.serve_corpus(tmp_path, 80, warm_up=10)
    assert mutated.met, mutated.details
    assert mutated.attempted == 80 and mutated.details["statuses"].get("400", 0) > 30
    assert well_formed.met and well_formed.attempted > 10


def test_validation_accounts_for_every_file_of_a_mutated_dataset(tmp_path):
    every_file, certain = scenario_bad_input.validate_corpus(tmp_path, 200)
    assert every_file.met, every_file.details
    assert every_file.attempted == every_file.details["accepted"] + every_file.details["quarantined"] > 200
    assert certain.met, certain.details
    reasons = every_file.details["reasons"]
    assert {"corrupt", "truncated", "unsupported_format", "empty", "too_large", "extension_mismatch",
            "unexpected_location", "mask_mismatch"} <= set(reasons)


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def test_a_16_bit_image_is_scaled_without_float64_copies_of_it():
    side = 3000
    data = _png(Image.new("I;16", (side, side), 1000))
    tracemalloc.start()
    try:
        picture, info = image.decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.mode == "I;16" and picture.size == (side, side)
    # The 16-bit values themselves (2 bytes a pixel) and the 8-bit result; one float64 copy would be 8 bytes.
    assert peak < 5 * side * side, f"{peak / side / side:.1f} bytes a pixel"


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_depth_scaling_is_the_same_in_chunks(monkeypatch, mode):
    rng = np.random.default_rng(0)
    if mode == "F":
        values = (rng.standard_normal((37, 53)) * 1e3).astype(np.float32)
        values[rng.random(values.shape) < 0.05] = np.nan
        values[0, 0], values[1, 1] = np.inf, -np.inf
    else:
        values = rng.integers(0, 65535 if mode == "I;16" else 1 << 30, (37, 53)).astype(
            np.uint16 if mode == "I;16" else np.int32)
    whole = image._scale_to_uint8(values, mode)
    monkeypatch.setattr(image, "_SCALE_CHUNK", 7)
    assert np.array_equal(image._scale_to_uint8(values, mode), whole)
    finite = np.where(np.isfinite(values), values, np.nan).astype(np.float64)
    assert whole.dtype == np.uint8
    assert whole.flat[int(np.nanargmax(finite))] == 255 and whole.flat[int(np.nanargmin(finite))] == 0


def test_memory_of_large_images_goes_back_to_the_system_after_decoding():
    """In a fresh interpreter: decode large images in two threads, as the model server's decode pool does, and
    compare resident memory after two rounds with before."""
    script = textwrap.dedent("""
        import io, json, sys
        from concurrent.futures import ThreadPoolExecutor
        import psutil
        from PIL import Image
        from defectkit import image, preprocess

        def png(mode, fill):
            buffer = io.BytesIO()
            Image.new(mode, (3000, 3000), fill).save(buffer, format="PNG", compress_level=1)
            return buffer.getvalue()

        files = [png("RGBA", (200, 180, 160, 128)), png("L", 200), png("I;16", 1000), png("RGB", (1, 2, 3))]
        spec = preprocess.PreprocessSpec(image_size=32)
        rss = lambda: psutil.Process().memory_info().rss
        preprocess.to_model_input(files[1], spec)  # the first decode loads Pillow's plugins
        before = rss()
        with ThreadPoolExecutor(2) as pool:
            for _ in range(2):
                list(pool.map(lambda data: preprocess.to_model_input(data, spec), files))
        print(json.dumps({"growth": rss() - before}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    growth = json.loads(result.stdout.strip().splitlines()[-1])["growth"]
    assert growth < 100 << 20, f"resident memory grew by {growth / 2**20:.0f} MiB"

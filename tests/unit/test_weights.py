"""Starting weights: torchvision's published ImageNet weights served over real HTTP on 127.0.0.1, checked by the
hash in their file name and cached; explicit state dict paths; and the specs that are refused."""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.hub
import torchvision

from defectkit import models
from defectkit.weights import (
    HASH_REGEX,
    IMAGENET,
    PublishedWeights,
    WeightsIntegrityError,
    hash_prefix,
    published_weights,
    resolve_pretrained,
)


class FileServer:
    """Files over HTTP on 127.0.0.1, like download.pytorch.org: ``files`` maps a path to its bytes; anything
    else is a 404. The first ``fail_first`` GETs of a file are answered with ``fail_status``. ``gets`` counts
    the GETs of the files; ``others`` lists the other paths asked for (a process of an earlier test that still
    polls a port this server now has, say)."""

    def __init__(self, files: dict[str, bytes], *, fail_first: int = 0, fail_status: int = 503) -> None:
        self.gets = 0
        self.others: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                data = files.get(self.path)
                if data is None:
                    server.others.append(self.path)
                    self.send_error(404)
                    return
                server.gets += 1
                if server.gets <= fail_first:
                    self.send_error(fail_status)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _saved(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def small_weights() -> bytes:
    """A small real state dict (resnet18's first convolution): what a resolver sees is a file, not a model."""
    return _saved({"conv1.weight": torch.randn(64, 3, 7, 7, generator=torch.Generator().manual_seed(0))})


@pytest.fixture(scope="module")
def resnet18_weights() -> bytes:
    """A whole resnet18 state dict with torchvision's 1000-class head, as torchvision publishes them."""
    torch.manual_seed(0)
    return _saved(torchvision.models.resnet18(weights=None).state_dict())


@pytest.fixture
def serve(monkeypatch):
    """``serve(data, prefix=None)`` serves ``data`` as torchvision's resnet18 ImageNet weights: the URL
    torchvision publishes is pointed at a server on 127.0.0.1, under a file name carrying ``prefix`` (by default
    the true sha256 prefix, as download.pytorch.org names its files). Returns the running FileServer."""
    started: list[FileServer] = []

    def start(data: bytes, prefix: str | None = None, **kwargs) -> FileServer:
        name = f"resnet18-{prefix if prefix is not None else _sha256(data)[:8]}.pth"
        server = FileServer({f"/models/{name}": data}, **kwargs)
        started.append(server)
        # Only torchvision's registry entry changes; defectkit.weights reads it as it would in production.
        monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.value, "url",
                            f"{server.url}/models/{name}")
        return server

    yield start
    for server in started:
        server.close()


def test_resnet18_weights_are_torchvisions_published_url_and_hash():
    published = published_weights("resnet18")
    assert published == PublishedWeights(
        architecture="resnet18", weights="ResNet18_Weights.IMAGENET1K_V1",
        url="https://download.pytorch.org/models/resnet18-f37072fd.pth", file_name="resnet18-f37072fd.pth",
        hash_prefix="f37072fd")
    assert published.matches("f37072fd" + "0" * 56) and not published.matches("0" * 64)


def test_the_hash_rule_is_torch_hubs():
    assert HASH_REGEX.pattern == torch.hub.HASH_REGEX.pattern
    assert hash_prefix("resnet18-f37072fd.pth") == "f37072fd"
    # The first match counts, as in torch.hub: torchvision's own mnasnet file names have dots before the hash.
    assert hash_prefix("mnasnet0.5_top1_67.823-3ffadce67e.pth") == "3ffadce67e"
    assert hash_prefix("model.pth") == "" and hash_prefix("model-.pth") == ""


def test_every_supported_architecture_has_hash_checked_imagenet_weights():
    for architecture in models.supported_architectures():
        published = published_weights(architecture)
        assert published is not None and published.hash_prefix, architecture
        assert published.weights.split(".")[1].startswith("IMAGENET1K"), published


def test_non_imagenet_and_unknown_architectures():
    assert published_weights("fasterrcnn_resnet50_fpn") is None  # torchvision's default there is COCO
    with pytest.raises(ValueError, match="unknown architecture 'resnet19'"):
        published_weights("resnet19")


def test_first_run_downloads_into_the_cache_and_the_next_reads_it_without_the_server(serve, small_weights,
                                                                                     tmp_path):
    server = serve(small_weights)
    cache = tmp_path / "cache"
    first = resolve_pretrained(IMAGENET, "resnet18", scratch=tmp_path / "run1", cache_uri=str(cache))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    name = url.rsplit("/", 1)[1]
    assert server.gets == 1
    assert first.path == tmp_path / "run1" / name and first.path.read_bytes() == small_weights
    assert (first.source, first.sha256) == (url, _sha256(small_weights))
    assert (cache / name).read_bytes() == small_weights, "the checked download is written into the cache"
    assert url in first.note and first.sha256 in first.note and f"now cached at {cache}/{name}" in first.note
    assert not list(tmp_path.rglob(".*.tmp")), "downloads and cache writes leave no temporary files"

    server.close()
    second = resolve_pretrained(IMAGENET, "resnet18", scratch=tmp_path / "run2", cache_uri=str(cache))
    assert second.path == cache / name and second.sha256 == first.sha256
    assert second.source == f"{cache}/{name}" and "from cache" in second.note
    assert server.gets == 1


def test_without_a_cache_every_run_downloads(serve, small_weights, tmp_path):
    server = serve(small_weights)
    for run in ("a", "b"):
        resolved = resolve_pretrained(IMAGENET, "resnet18", scratch=tmp_path / run)
        assert resolved.path is not None and resolved.path.read_bytes() == small_weights
    assert server.gets == 2


def test_build_model_loads_the_served_imagenet_weights(serve, resnet18_weights, tmp_path):
    serve(resnet18_weights)
    resolved = resolve_pretrained(IMAGENET, "resnet18", scratch=tmp_path, cache_uri=str(tmp_path / "cache"))
    module = models.build_model("resnet18", pretrained_weights=resolved.path)
    served = torch.load(io.BytesIO(resnet18_weights), weights_only=True)
    state = module.state_dict()
    assert torch.equal(state["conv1.weight"], served["conv1.weight"])
    assert torch.equal(state["layer4.1.bn2.running_var"], served["layer4.1.bn2.running_var"])
    assert state["fc.weight"].shape == (1, 512), "the 1000-class head is skipped: one defect logit"


def test_a_download_whose_hash_does_not_match_its_name_is_refused_and_not_cached(serve, small_weights,
                                                                                 tmp_path):
    wrong = "0" * 8
    assert not _sha256(small_weights).startswith(wrong)
    serve(small_weights, prefix=wrong)
    cache = tmp_path / "cache"
    with pytest.raises(WeightsIntegrityError, match=f"sha256 {_sha256(small_weights)}.*publishes {wrong}"):
        resolve_pretrained(IMAGENET, "resnet18", scratch=tmp_path / "scratch", cache_uri=str(cache))
    assert not cache.exists(), "nothing is written to the cache"
    assert not list((tmp_path / "scratch").iterdir()), "nor left in scratch, temporary files included"


def test_a_corrupted_cached_copy_is_refused_naming_both_hashes_and_kept(serve, small_weights, tmp_path):
    server = serve(small_weights)
    name = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    cache = tmp_path / "cache"
    cache.mkdir()
    corrupted = small_weights[:-10] + b"0123456789"
    (cache / name).write_bytes(corrupted)
    with pytest.raises(WeightsIntegrityError) as raised:
        resolve_pretrained(IMAGENET, "resnet18", scratch=tmp_path / "scratch", cache_uri=str(cache))
    message = str(raised.value)
    assert _sha256(corrupted) in message and _sha256(small_weights)[:8] in message and str(cache / name) in message
    assert (cache / name).read_bytes() == corrupted, "neither deleted nor replaced"
    assert server.gets == 0, "never silently downloaded instead"


@pytest.mark.parametrize("reachable", [False, True], ids=["connection-refused", "http-404"])
def test_weights_that_cannot_be_had_mean_training_from_scratch_after_one_warning(serve, small_weights, tmp_path,
                                                                                 caplog, reachable, monkeypatch):
    server = serve(small_weights)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    if reachable:
        monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.value, "url",
                            url.replace("/models/", "/moved/"))
        url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    else:
        server.close()
    caplog.set_level(logging.DEBUG)
    resolved = resolve_pretrained(IMAGENET, "resnet18", scratch=tmp_path / "scratch",
                                  cache_uri=str(tmp_path / "cache"), timeout_s=5)
    assert (resolved.path, resolved.source, resolved.sha256) == (None, "", "")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].getMessage() == resolved.note
    assert resolved.note.startswith(f"no pretrained weights: {url} could not be reached (")
    assert resolved.note.endswith("training from scratch")
    assert ("HTTP 404" if reachable else "Connection refused") in resolved.note
    assert not (tmp_path / "cache").exists()


def test_a_server_hiccup_is_tried_again(serve, small_weights, tmp_path):
    server = serve(small_weights, fail_first=1, fail_status=503)
    resolved = resolve_pretrained(IMAGENET, "resnet18", scratch=tmp_path)
    assert resolved.sha256 == _sha256(small_weights) and server.gets == 2


def test_an_architecture_without_imagenet_weights_trains_from_scratch(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    resolved = resolve_pretrained(IMAGENET, "fasterrcnn_resnet50_fpn", scratch=tmp_path)
    assert resolved.path is None and "no ImageNet weights for fasterrcnn_resnet50_fpn" in resolved.note
    assert [r.getMessage() for r in caplog.records if r.name == "defectkit.weights"] == [resolved.note]


def test_no_spec_is_training_from_scratch(tmp_path):
    resolved = resolve_pretrained("", "resnet18", scratch=tmp_path)
    assert (resolved.path, resolved.source, resolved.sha256) == (None, "", "")
    assert "training from scratch" in resolved.note


def test_an_explicit_state_dict_by_path_or_file_uri(small_weights, tmp_path):
    path = tmp_path / "mine.pth"
    path.write_bytes(small_weights)
    for spec in (str(path), f"file://{path}"):
        resolved = resolve_pretrained(spec, "resnet18", scratch=tmp_path / "scratch")
        assert (resolved.path, resolved.source, resolved.sha256) == (path, spec, _sha256(small_weights))
        assert spec in resolved.note
    assert models.build_model("resnet18", pretrained_weights=resolved.path) is not None


def test_an_explicit_missing_file_is_an_error_not_a_fallback(tmp_path):
    missing = tmp_path / "nope" / "weights.safetensors"
    with pytest.raises(FileNotFoundError, match=f"pretrained weights {missing} not found"):
        resolve_pretrained(str(missing), "resnet18", scratch=tmp_path)


@pytest.mark.parametrize("spec", [
    "imagenet21k", "ImageNet", "weights.bin", "http://example.com/resnet18-f37072fd.pth",
    "https://download.pytorch.org/models/resnet18-f37072fd.pth", "hf://org/model.safetensors",
])
def test_specs_that_are_refused(spec, tmp_path):
    with pytest.raises(ValueError, match=f"pretrained weights '{spec}'.*Accepted: '' \\(train from scratch\\), "
                                         f"'imagenet'"):
        resolve_pretrained(spec, "resnet18", scratch=tmp_path)


def test_timeout_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="timeout_s=0"):
        resolve_pretrained(IMAGENET, "resnet18", scratch=tmp_path, timeout_s=0)


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_weights(serve, small_weights, tmp_path, caplog):
    serve(small_weights)
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    caplog.set_level(logging.DEBUG)
    resolved = resolve_pretrained(IMAGENET, "resnet18", scratch=tmp_path / "scratch", cache_uri=str(not_a_folder))
    assert resolved.path is not None and resolved.sha256 == _sha256(small_weights)
    assert "not cached" in resolved.note
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith(f"could not write {not_a_folder}/") and "downloads it again" in warning

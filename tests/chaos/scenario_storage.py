"""Storage faults: 503, 429, held connections, resets and slow answers from GCS and S3 during real work.

A fault-injecting proxy (:mod:`tests.chaos.proxy`) stands in front of the GCS
emulator (``STORAGE_EMULATOR_HOST``) and moto's S3 server (``AWS_ENDPOINT_URL``).
For each store and fault kind, the proxy answers a seeded share of requests with
that fault while defectkit's own code paths run through it:

- dataset reads: :class:`defectkit.storage.Store` list and reads, and
  :func:`defectkit.validation.dataset.validate_dataset` on its remote read path;
- artifact writes: ``Store.write`` replacing objects, and creating them with ``overwrite=False``;
- sample writes: the production :class:`defectkit.sampling.Sampler` writing shards;
- registry uploads: :func:`defectkit.registry.register` into an experiment whose
  artifact root is ``gs://`` or ``s3://`` (MLflow's own artifact clients upload).

Afterwards every object is read back from the emulator directly, not through the
proxy: each write that reported success must be there byte-identical, and no
object a reader can see may be partial (every shard a whole tar, every registered
version's files complete). Creates must carry their precondition
(``ifGenerationMatch=0`` / ``If-None-Match: *``) on every try, and a create of an
existing object must be refused, never clobber it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import statistics
import sys
import tarfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.harness import Outcome, Scenario, rate_meets
from tests.chaos.proxy import FAULT_KINDS, FaultPlan, ProxyControl
from tests.chaos.stack import environ
from tests.servers import ServerProcess, free_port, start_s3_server, start_server

NAME = "storage"
BUCKET = "defectkit-chaos"
GOAL = ">= 99.9% of operations succeed (exact binomial test, 99% confidence), nothing lost, creates never clobber"
SUCCESS_GOAL = 0.999
# Our Store calls get a short per-attempt timeout, so that a held connection costs seconds, not a minute.
STORE_TIMEOUT_S = 1.5
# Clients whose timeout the scenario cannot set (the sampler's and validate_dataset's Store, MLflow's artifact
# clients) wait 60 s on a held
# connection: in the short run they are spared holds, in the full run they meet at most this many.
UNSET_TIMEOUT_HOLDS_FULL = 1
# validate_dataset reads through the same Store.read as the dataset reads: the short run runs it under these only.
SHORT_VALIDATE_KINDS = ("reset",)
# Data-plane requests only: bucket metadata calls are not what is under test.
GCS_DATA_PATHS = r"^/(upload/)?(download/)?storage/v1/b/[^/]+/o"
S3_DATA_PATHS = rf"^/{BUCKET}/"


@dataclass(frozen=True)
class Sizes:
    reads: int  # Store.read calls of dataset files
    writes: int  # Store.write(overwrite=True)
    creates: int  # Store.write(overwrite=False)
    samples: int  # images offered to the sampler
    registrations: int
    probability: float


SHORT = Sizes(reads=16, writes=8, creates=8, samples=24, registrations=1, probability=0.2)
FULL = Sizes(reads=80, writes=40, creates=40, samples=160, registrations=4, probability=0.2)


@dataclass
class Tally:
    """One (store, fault kind) row: what was tried, what succeeded, what a reader lost."""

    attempted: int = 0
    succeeded: int = 0
    lost: int = 0
    clobbered: int = 0
    durations: list[float] = field(default_factory=list)
    per_operation: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def count(self, operation: str, ok: bool, seconds: float | None = None) -> None:
        self.attempted += 1
        self.succeeded += ok
        entry = self.per_operation.setdefault(operation, {"attempted": 0, "succeeded": 0, "lost": 0})
        entry["attempted"] += 1
        entry["succeeded"] += ok
        if seconds is not None:
            self.durations.append(seconds)
            entry["seconds"] = round(entry.get("seconds", 0) + seconds, 2)

    def lose(self, operation: str, items: int) -> None:
        self.lost += items
        self.per_operation.setdefault(operation, {"attempted": 0, "succeeded": 0, "lost": 0})["lost"] += items


# --------------------------------------------------------------------------- direct readers (no proxy)


class DirectGcs:
    """The GCS emulator's JSON API, read without the proxy."""

    def __init__(self, url: str) -> None:
        self.url = url

    def list(self, prefix: str) -> list[str]:
        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}/o?{query}", timeout=30) as response:
                page = json.loads(response.read())
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return names

    def read(self, name: str) -> bytes | None:
        quoted = urllib.parse.quote(name, safe="")
        try:
            with urllib.request.urlopen(f"{self.url}/download/storage/v1/b/{BUCKET}/o/{quoted}?alt=media",
                                        timeout=30) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def put(self, name: str, data: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        request = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{BUCKET}/o?{query}", data=data,
                                         method="POST", headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=30):
            pass


class DirectS3:
    """moto's S3 server, read without the proxy."""

    def __init__(self, url: str) -> None:
        import boto3

        self.url = url
        self._client = boto3.client("s3", endpoint_url=url)

    def list(self, prefix: str) -> list[str]:
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", ())]

    def read(self, name: str) -> bytes | None:
        try:
            return self._client.get_object(Bucket=BUCKET, Key=name)["Body"].read()
        except self._client.exceptions.NoSuchKey:
            return None

    def put(self, name: str, data: bytes) -> None:
        self._client.put_object(Bucket=BUCKET, Key=name, Body=data)


# --------------------------------------------------------------------------- servers


@dataclass
class Backend:
    """One store behind its proxy: ``scheme`` gs or s3, ``proxy`` to steer it, ``direct`` to check it."""

    scheme: str
    proxy: ProxyControl
    direct: DirectGcs | DirectS3
    data_paths: str

    def uri(self, prefix: str) -> str:
        return f"{self.scheme}://{BUCKET}/{prefix}"

    def object_name(self, uri: str) -> str:
        return uri.removeprefix(f"{self.scheme}://{BUCKET}/")


@contextmanager
def servers(work: Path) -> Iterator[tuple[Backend, Backend]]:
    """The GCS emulator, moto's S3 server and a proxy in front of each, stopped by PID at the end; this
    process's storage variables point at the proxies meanwhile."""
    started: list[ServerProcess] = []
    root = str(Path(__file__).resolve().parents[2])

    def start(cmd: list[str], label: str, health: str) -> ServerProcess:
        port = free_port()
        server = start_server([a.replace("{port}", str(port)) for a in cmd], url=f"http://127.0.0.1:{port}",
                              health_path=health, log_path=work / f"{label}.log", env={"PYTHONPATH": root})
        started.append(server)
        return server

    try:
        gcs = start([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port",
                     "{port}", "--default-bucket", BUCKET, "--in-memory", "--quiet"], "gcs-emulator", "/")
        s3 = start_s3_server(work / "moto.log")
        started.append(s3)
        proxies = {}
        for flavour, upstream in (("gcs", gcs.url), ("s3", s3.url)):
            proxies[flavour] = start([sys.executable, "-m", "tests.chaos.proxy", "--upstream", upstream,
                                      "--flavour", flavour, "--port", "{port}"], f"proxy-{flavour}", "/__proxy__/health")
        variables = {"STORAGE_EMULATOR_HOST": proxies["gcs"].url, "AWS_ENDPOINT_URL": proxies["s3"].url,
                     "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                     "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH", "")]))}
        with environ(variables, unset=("AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL")):
            direct_s3 = DirectS3(s3.url)
            direct_s3._client.create_bucket(Bucket=BUCKET)
            yield (Backend("gs", ProxyControl(proxies["gcs"].url), DirectGcs(gcs.url), GCS_DATA_PATHS),
                   Backend("s3", ProxyControl(proxies["s3"].url), direct_s3, S3_DATA_PATHS))
    finally:
        for server in reversed(started):
            server.stop()


# --------------------------------------------------------------------------- operations


def _timed(call: Callable[[], Any]) -> tuple[Any, float, BaseException | None]:
    started = time.monotonic()
    try:
        return call(), time.monotonic() - started, None
    except Exception as exc:  # noqa: BLE001 - an operation's failure is counted, the others still run
        return None, time.monotonic() - started, exc


def dataset_reads(backend: Backend, dataset: dict[str, bytes], sizes: Sizes, tally: Tally, draw: random.Random,
                  validate: bool, work: Path) -> None:
    from defectkit import storage
    from defectkit.validation.dataset import ValidationConfig, validate_dataset

    store = storage.Store(backend.uri("dataset"), timeout_s=STORE_TIMEOUT_S)
    listed, seconds, error = _timed(store.list)
    tally.count("dataset read", error is None and listed == sorted(dataset), seconds)
    if error is not None:
        tally.notes.append(f"list: {type(error).__name__}: {error}"[:300])
    for rel in [draw.choice(sorted(dataset)) for _ in range(sizes.reads)]:
        data, seconds, error = _timed(lambda rel=rel: store.read(rel))
        tally.count("dataset read", error is None and data == dataset[rel], seconds)
        if error is not None or data != dataset[rel]:
            tally.notes.append(f"read {rel}: {'wrong bytes' if error is None else f'{type(error).__name__}: {error}'}"[:300])
    if not validate:
        return
    out = work / f"validated-{backend.scheme}-{time.monotonic_ns()}"
    report, seconds, error = _timed(lambda: validate_dataset(
        backend.uri("dataset"), out, ValidationConfig(min_images_per_class=2, min_side=16), workers=4))
    images = sorted(hashlib.sha256(data).hexdigest() for rel, data in dataset.items() if "ground_truth" not in rel)
    whole = (error is None and not report.quarantined
             and sorted(e.sha256 for e in report.manifest.entries) == images)
    if error is None and not whole:
        tally.notes.append(f"validate_dataset: {len(report.quarantined)} quarantined, "
                           f"{len(report.manifest.entries)} accepted of {len(images)} images")
    tally.count("validate_dataset", whole, seconds)
    if error is not None:
        tally.notes.append(f"validate_dataset: {type(error).__name__}: {error}"[:300])


def artifact_writes(backend: Backend, row: str, sizes: Sizes, tally: Tally, draw: random.Random,
                    expected: dict[str, bytes]) -> list[str]:
    """Replacing writes (some of the same key) and creates; ``expected`` gets what each successful write left.
    Returns the names of the created objects."""
    from defectkit import storage

    store = storage.Store(backend.uri(f"artifacts/{row}"), timeout_s=STORE_TIMEOUT_S)
    for i in range(sizes.writes):
        rel = f"replaced/{i % max(1, sizes.writes // 2)}.bin"  # every key written twice: the second replaces
        data = draw.randbytes(draw.randint(1, 64 * 1024))
        _, seconds, error = _timed(lambda: store.write(rel, data))
        tally.count("artifact write", error is None, seconds)
        if error is None:
            expected[f"{store.root}/{rel}"] = data
        else:
            tally.notes.append(f"write {rel}: {type(error).__name__}: {error}"[:300])
    created = []
    for i in range(sizes.creates):
        rel = f"created/{i}.json"
        data = json.dumps({"row": row, "i": i, "pad": draw.randbytes(512).hex()}).encode()
        _, seconds, error = _timed(lambda: store.write(rel, data, overwrite=False))
        tally.count("artifact create", error is None, seconds)
        if error is None:
            expected[f"{store.root}/{rel}"] = data
            created.append(f"{store.root}/{rel}")
        else:
            tally.notes.append(f"create {rel}: {type(error).__name__}: {error}"[:300])
    return created


def sample_writes(sampler: Any, row: str, images: list[bytes], sizes: Sizes, tally: Tally) -> dict[str, int]:
    """Offer ``sizes.samples`` images, labelled with the row as their model version, in a few batches (one shard
    each); the sampler's counts of this row once it wrote them."""
    before = sampler.stats()
    batches = 4
    for b in range(batches):
        chunk = [images[i % len(images)] for i in range(b * sizes.samples // batches, (b + 1) * sizes.samples // batches)]
        sampler.offer(chunk, [0.5] * len(chunk), ["good"] * len(chunk), row)
        time.sleep(0.25)  # the sampler batches what arrives within 0.2 s into one shard
    if not sampler.flush(timeout_s=600):
        tally.notes.append("sampler: queue not written within 600 s")
    return {k: v - before[k] for k, v in sampler.stats().items()}


def registry_uploads(backend: Backend, row: str, model_dir: Path, sizes: Sizes, tally: Tally, work: Path,
                     ) -> list[Any]:
    from defectkit import registry

    config = registry.RegistryConfig(tracking_uri=f"sqlite:///{work / f'mlflow-{backend.scheme}.db'}",
                                     model_name=f"chaos-{backend.scheme}", experiment=f"chaos-{backend.scheme}",
                                     artifact_location=backend.uri("mlflow"))
    refs = []
    for _ in range(sizes.registrations):
        # A failed step is retried once, as the pipeline's retry policy would.
        ref, seconds, error = _timed(lambda: registry.register(config, model_dir, tags={"chaos_row": row}))
        if error is not None:
            tally.notes.append(f"register: {type(error).__name__}: {error}"[:300])
            ref, more, error = _timed(lambda: registry.register(config, model_dir, tags={"chaos_row": row}))
            seconds += more
        tally.count("registry upload", error is None, seconds)
        if error is None:
            refs.append(ref)
    return refs


# --------------------------------------------------------------------------- verification (direct)


def verify_writes(backend: Backend, expected: dict[str, bytes], tally: Tally) -> None:
    for uri, data in expected.items():
        found = backend.direct.read(backend.object_name(uri))
        if found != data:
            operation = "artifact create" if "/created/" in uri else "artifact write"
            tally.lose(operation, 1)
            tally.notes.append(f"{uri}: {'missing' if found is None else f'{len(found)} bytes, not {len(data)}'}")


def verify_samples(backend: Backend, row: str, images: list[bytes], stats: dict, tally: Tally) -> None:
    """Every shard whole; every sample of ``row`` the sampler counted as written there, with the image offered."""
    offered = {hashlib.sha256(data).hexdigest() for data in images}
    intact = 0
    for name in backend.direct.list("samples/"):
        data = backend.direct.read(name) or b""
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as shard:
                members = {m.name: shard.extractfile(m).read() for m in shard.getmembers() if m.isfile()}
            for key, body in members.items():
                if key.endswith(".json"):
                    record = json.loads(body)
                    if record["model_version"] == row and hashlib.sha256(members[record["image"]]).hexdigest() in offered:
                        intact += 1
        except (tarfile.TarError, KeyError, ValueError) as exc:
            tally.lose("sample write", 1)
            tally.notes.append(f"partial shard {name}: {exc}")
    ok = min(intact, stats["offered"])
    tally.attempted += stats["offered"]
    tally.succeeded += ok
    entry = tally.per_operation.setdefault("sample write", {"attempted": 0, "succeeded": 0, "lost": 0})
    entry["attempted"] += stats["offered"]
    entry["succeeded"] += ok
    entry["sampler"] = stats  # type: ignore[assignment]
    if intact < stats["written"]:
        tally.lose("sample write", stats["written"] - intact)


def verify_registry(backend: Backend, refs: list[Any], model_dir: Path, tally: Tally, work: Path) -> None:
    """Each registered version's files whole at its source; every version the registry holds, and the
    challenger alias, point at complete files."""
    from mlflow import MlflowClient

    expected = {name: (model_dir / name).read_bytes() for name in ("model.safetensors", "model.json")}
    tracking = f"sqlite:///{work / f'mlflow-{backend.scheme}.db'}"
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    model = f"chaos-{backend.scheme}"

    def complete(source: str) -> bool:
        prefix = backend.object_name(source.rstrip("/"))
        return all(backend.direct.read(f"{prefix}/{name}") == data for name, data in expected.items())

    for ref in refs:
        if not complete(ref.source):
            tally.lose("registry upload", 1)
            tally.notes.append(f"version {ref.version}: files at {ref.source} incomplete")
    if refs:
        for version in client.search_model_versions(f"name='{model}'"):
            if not complete(version.source):
                tally.lose("registry upload", 1)
                tally.notes.append(f"registry holds version {version.version} with incomplete files")
        challenger = client.get_registered_model(model).aliases.get("challenger")
        if challenger is not None and not complete(client.get_model_version(model, str(challenger)).source):
            tally.lose("registry upload", 1)
            tally.notes.append(f"alias challenger -> {challenger}, whose files are incomplete")


def check_preconditions(backend: Backend, created: list[str], log: list[dict], tally: Tally) -> dict[str, int]:
    """Every create request carried its precondition; a create over an existing object is refused, not applied."""
    from defectkit import storage

    marker = "ifGenerationMatch" if backend.scheme == "gs" else "If-None-Match"
    creates = [e for e in log if "/created/" in e["object"] and e["method"] in ("POST", "PUT")]
    carried = [e for e in creates if (e["if_generation_match"] == "0" if backend.scheme == "gs"
                                      else e["if_none_match"] == "*")]
    refused = [e for e in creates if e["status"] == 412]
    landed_then_lost = [e for e in creates if e["fault"] in ("hold", "reset") and e["phase"] in ("after", "mid-body")]
    result = {"create_requests": len(creates), f"with_{marker}": len(carried),
              "answer_lost_after_landing": len(landed_then_lost), "refused_412": len(refused)}
    if len(carried) != len(creates):
        tally.clobbered += len(creates) - len(carried)
        tally.notes.append(f"{len(creates) - len(carried)} create requests without {marker}")
    if created:
        uri = created[0]
        parent, _, rel = uri.rpartition("/")
        before = backend.direct.read(backend.object_name(uri))
        _, _, error = _timed(lambda: storage.Store(parent, timeout_s=STORE_TIMEOUT_S).write(
            rel, b"a second writer", overwrite=False))
        after = backend.direct.read(backend.object_name(uri))
        refused_clearly = isinstance(error, FileExistsError)
        result["second_create_refused"] = int(refused_clearly)
        if not refused_clearly or after != before:
            tally.clobbered += 1
            tally.notes.append(f"a second create of {uri} was {'applied' if after != before else 'not refused'}: "
                               f"{error!r}")
    return result


def recovery(backend: Backend) -> float | None:
    """Seconds from the end of the fault to the first write and read back through the proxy, without retries."""
    from defectkit import storage

    store = storage.Store(backend.uri("recovery"), storage.RetryPolicy(attempts=1), timeout_s=STORE_TIMEOUT_S)
    started = time.monotonic()
    while time.monotonic() - started < 60:
        try:
            store.write("probe", b"probe")
            if store.read("probe") == b"probe":
                return time.monotonic() - started
        except Exception:  # noqa: BLE001 - not recovered yet
            time.sleep(0.05)
    return None


# --------------------------------------------------------------------------- the scenario


def plan_for(backend: Backend, kind: str, sizes: Sizes, seed: int, unset_timeout: bool, short: bool) -> FaultPlan:
    """``kind`` on a seeded share of data requests; clients with an unset timeout meet few or no holds."""
    holds = 0 if short else UNSET_TIMEOUT_HOLDS_FULL
    return FaultPlan(kinds=(kind,), probability=sizes.probability, seed=seed, path_pattern=backend.data_paths,
                     max_faults=holds if (kind == "hold" and unset_timeout) else None, hold_max_s=90.0,
                     enforce_create_preconditions=True)


def run_row(backend: Backend, sampler: Any, kind: str, sizes: Sizes, short: bool, dataset: dict[str, bytes],
            images: list[bytes], model_dir: Path, work: Path, seed: int) -> Outcome:
    tally = Tally()
    draw = random.Random(seed)
    row = kind
    expected: dict[str, bytes] = {}
    injected_before = backend.proxy.counts()["injected"]
    backend.proxy.request_log(clear=True)

    backend.proxy.set_plan(plan_for(backend, kind, sizes, seed, False, short))
    dataset_reads(backend, dataset, sizes, tally, draw, validate=False, work=work)
    created = artifact_writes(backend, row, sizes, tally, draw, expected)
    log = backend.proxy.request_log(clear=True)
    # validate_dataset and the sampler use defectkit's default Store (a 60 s timeout per attempt).
    backend.proxy.set_plan(plan_for(backend, kind, sizes, seed + 1, True, short))
    dataset_reads(backend, dataset, Sizes(0, 0, 0, 0, 0, 0.0), tally, draw,
                  validate=not short or kind in SHORT_VALIDATE_KINDS, work=work)
    stats = sample_writes(sampler, row, images, sizes, tally)
    # MLflow's artifact clients keep their libraries' 60 s timeouts too.
    backend.proxy.set_plan(plan_for(backend, kind, sizes, seed + 2, True, short))
    refs = registry_uploads(backend, row, model_dir, sizes, tally, work)
    backend.proxy.set_plan(FaultPlan(enforce_create_preconditions=True))
    fault_ended = time.monotonic()
    recover_s = recovery(backend)
    injected_after = backend.proxy.counts()["injected"]
    injected = {k: v - injected_before.get(k, 0) for k, v in injected_after.items() if v - injected_before.get(k, 0)}

    verify_writes(backend, expected, tally)
    verify_samples(backend, row, images, stats, tally)
    verify_registry(backend, refs, model_dir, tally, work)
    preconditions = check_preconditions(backend, created, log, tally)

    met = (sum(injected.values()) > 0 and rate_meets(tally.succeeded, tally.attempted, SUCCESS_GOAL)
           and tally.lost == 0 and tally.clobbered == 0
           and recover_s is not None)
    details = {"injected": injected, "operations": tally.per_operation, "preconditions": preconditions,
               "clobbered": tally.clobbered, "median_op_s": round(statistics.median(tally.durations), 3)
               if tally.durations else None, "slowest_op_s": round(max(tally.durations, default=0.0), 3),
               "recovery_probe_started_after_s": round(time.monotonic() - fault_ended, 3),
               "notes": tally.notes[:20]}
    if kind == "hold":
        details["holds"] = ("our Store calls: every drawn request; the sampler, validate_dataset and MLflow's "
                            f"clients (60 s timeouts): {0 if short else UNSET_TIMEOUT_HOLDS_FULL} at most")
    return Outcome(NAME, f"{'gcs' if backend.scheme == 'gs' else 's3'}: {kind}", tally.attempted, tally.succeeded,
                   tally.lost, recover_s, GOAL, met, details)


def small_model(out: Path) -> Path:
    """A judged model artifact for registration. The registry never loads weights, so a small safetensors
    file (resnet18's classifier head) keeps each upload quick; model.json is the real format."""
    import torch

    from defectkit.models import ModelMetadata, save_model
    from defectkit.preprocess import PreprocessSpec

    torch.manual_seed(0)
    head = torch.nn.Linear(512, 2)
    metadata = ModelMetadata(architecture="resnet18", classes=("good", "crack"),
                             preprocess=PreprocessSpec(image_size=32), threshold=0.5,
                             threshold_policy={"kind": "max_f1"})
    return save_model(head, metadata, out)


def run(work_dir: Path, short: bool) -> list[Outcome]:
    from defectkit.synthetic import generate_sample

    import mlflow  # noqa: F401 - its import time is not an upload's
    from defectkit.sampling import Sampler, SamplingConfig

    sizes = SHORT if short else FULL
    sample = work_dir / "sample"
    generate_sample(sample, count=60, size=64, seed=0)
    dataset = {p.relative_to(sample).as_posix(): p.read_bytes() for p in sorted(sample.rglob("*")) if p.is_file()}
    images = [data for rel, data in dataset.items() if "ground_truth" not in rel][:20]
    model_dir = small_model(work_dir / "model")
    outcomes = []
    with servers(work_dir) as backends:
        for backend in backends:
            for rel, data in dataset.items():
                backend.direct.put(f"dataset/{rel}", data)
        samplers = [Sampler(SamplingConfig(rate=1.0, uri=b.uri("samples"), queue_size=4 * sizes.samples))
                    for b in backends]
        try:
            for index, kind in enumerate(FAULT_KINDS):
                for backend, sampler in zip(backends, samplers):
                    outcomes.append(run_row(backend, sampler, kind, sizes, short, dataset, images, model_dir,
                                            work_dir, seed=1000 * index + (backend.scheme == "s3")))
        finally:
            for sampler in samplers:
                sampler.close(timeout_s=60)
    return outcomes


SCENARIOS = (Scenario(NAME, run),)

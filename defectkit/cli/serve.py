"""``defectkit serve``: one model server over the Open Inference Protocol v2 (KServe model server)."""

from __future__ import annotations

import argparse
import logging

from defectkit.serving.contract import RUNTIMES
from defectkit.serving.server import DEFAULT_PORT, MIB, PRECISIONS, ServingOptions, serve

log = logging.getLogger(__name__)


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve", help="serve a model over the Open Inference Protocol v2 (KServe model server), with "
        "micro-batching, a circuit breaker and Prometheus metrics",
        description="Start one model server and block until SIGTERM or SIGINT. The local serving stack of "
        "`defectkit rollout` starts its servers with this command; `defectkit stack stop` stops them.")
    add_arguments(parser)
    parser.set_defaults(func=cmd_serve)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options; beyond --model, --fallback, --tracking-uri, --host, --port and --served-name each one is a
    field of :class:`~defectkit.serving.server.ServingOptions` of the same name, which holds its default."""
    defaults = ServingOptions()
    parser.add_argument("--model", required=True, help="model artifact directory, its gs:// or s3:// copy, or "
                        "models:/<name>@<alias> or models:/<name>/<version> in the registry (needs --tracking-uri)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default %(default)s; 0.0.0.0 for all interfaces, as in a pod)")
    parser.add_argument("--fallback", help="model answering while the primary's circuit breaker is open, e.g. the "
                        "previous champion: a directory, a gs:// or s3:// directory (downloaded at start) or a "
                        "models:/ URI")
    parser.add_argument("--served-name", dest="served_name", default="defectkit",
                        help="model name in the /v2/models/<name> routes (default %(default)s)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI of the registry, for models:/ URIs")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument("--precision", default=defaults.precision, choices=PRECISIONS,
                        help="what the forward pass computes in: auto is bf16 on CUDA, fp32 elsewhere; every answer "
                        "says which (default %(default)s)")
    parser.add_argument("--runtime", default=defaults.runtime, choices=RUNTIMES,
                        help="what scores: torch, onnxruntime (the model's ONNX export, checked against PyTorch at "
                        "load), or auto: onnxruntime where the model carries an export and the device is the CPU "
                        "(default %(default)s)")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="threads of each forward, torch's or ONNX Runtime's (default 0: the cores divided by --batch-workers)")

    batching = parser.add_argument_group("micro-batching")
    batching.add_argument("--max-batch", type=int, default=defaults.max_batch, help="images per forward (default %(default)s)")
    batching.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                          help="longest a request waits for the clients of the last batch to come back and share its "
                               "forward; a lone client never waits (default %(default)s)")
    batching.add_argument("--batch-workers", type=int, default=defaults.batch_workers,
                          help="forwards running at the same time (default 0: 1 on a GPU, 2 on a CPU)")

    limits = parser.add_argument_group("limits")
    limits.add_argument("--timeout-s", type=float, default=defaults.timeout_s,
                        help="per-request model timeout; timeouts count as failures (default %(default)s)")
    limits.add_argument("--max-body-mb", type=float, default=defaults.max_body_mb,
                        help="largest request body, 413 beyond (default %(default)s)")
    limits.add_argument("--max-images", type=int, default=defaults.max_images, help="images per request (default %(default)s)")
    limits.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help="pixels per image, checked before decoding (default: defectkit.image's limit)")
    limits.add_argument("--access-log", action="store_true", help="log every request (off by default: it costs "
                        "CPU at high request rates; /metrics counts requests)")

    sampling = parser.add_argument_group("production sampling (for drift monitoring and retraining)")
    sampling.add_argument("--sample-rate", type=float, default=defaults.sample_rate,
                          help="share of images written with their answers to --sample-uri, off the request path "
                          "(default %(default)s: none)")
    sampling.add_argument("--sample-uri", default=defaults.sample_uri, help="where samples go: a directory, gs:// or s3:// URI, "
                          "one tar shard per batch under date=YYYY-MM-DD/HH/")
    sampling.add_argument("--sample-seed", type=int, default=defaults.sample_seed, help="seed of the sampling draws (default %(default)s)")

    breaker = parser.add_argument_group("circuit breaker (protects the primary model)")
    breaker.add_argument("--breaker-failures", type=int, default=defaults.breaker_failures,
                         help="failures or timeouts within the window that open it (default %(default)s)")
    breaker.add_argument("--breaker-window-s", type=float, default=defaults.breaker_window_s,
                         help="how long a failure counts (default %(default)s)")
    breaker.add_argument("--breaker-cooldown-s", type=float, default=defaults.breaker_cooldown_s,
                         help="time open before one probe request is let through (default %(default)s)")

    faults = parser.add_argument_group(
        "fault injection, FOR CANARY TESTS ONLY",
        "Make the primary model misbehave on purpose, to rehearse canary analysis and the circuit breaker. "
        "Never set these in production.")
    faults.add_argument("--fault-error-rate", type=float, default=defaults.fault_error_rate,
                        help="share of requests whose model call fails: answered 500 (or by the --fallback, "
                        "when one is set, so leave it out to see 5xx)")
    faults.add_argument("--fault-latency-ms", type=float, default=defaults.fault_latency_ms, help="latency added to every model call")
    faults.add_argument("--fault-score-shift", type=float, default=defaults.fault_score_shift,
                        help="added to every defect score (clipped to 0-1)")
    faults.add_argument("--fault-duration-s", type=float, default=defaults.fault_duration_s,
                        help="faults stop this long after the first request (default 0: never)")
    faults.add_argument("--fault-seed", type=int, default=defaults.fault_seed, help="seed of the fault draws (default %(default)s)")


def config_from_args(args: argparse.Namespace):
    """The :class:`~defectkit.serving.predictor.ServingConfig` the options describe."""
    return ServingOptions.from_namespace(args).serving_config()


def cmd_serve(args: argparse.Namespace) -> int:
    """0 after a clean shutdown, 2 when the model cannot be served (logged)."""
    try:
        options = ServingOptions.from_namespace(args)
        serve(args.model, port=args.port, host=args.host, fallback=args.fallback, name=args.served_name,
              tracking_uri=args.tracking_uri, config=options.serving_config(),
              max_body_bytes=int(options.max_body_mb * MIB), torch_threads=options.threads,
              access_log=options.access_log)
    except (ValueError, LookupError, OSError) as exc:
        log.error("cannot serve %s: %s", args.model, exc)
        return 2
    return 0

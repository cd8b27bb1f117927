"""The ``defectkit`` command.

    defectkit sample  --out DIR [--count N --size PX --seed S]
    defectkit train   --data URI --out DIR [--epochs --image-size --arch --device]
    defectkit demo    [--work DIR]          (what `make run` does)
    defectkit submit  --host URL [--param k=v ...]
    defectkit schedule --host URL --cron "0 0 * * * *" --param k=v ...   (the drift monitor)
    defectkit serve   --model DIR|models:/name@alias --port P   |   serve --stop
    defectkit deploy  --backend local|kserve [--dry-run] ...

``train``, ``demo``, ``submit`` and ``schedule`` run the committed compiled
pipeline YAML, locally through kfp.local or on a cluster through the KFP API.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from defectkit.demo import DemoDefaults

log = logging.getLogger("defectkit")


def _training_package() -> Path:
    from defectkit_kfp.pipelines.run import TRAINING_YAML

    return TRAINING_YAML


class PipelineFailed(RuntimeError):
    pass


def _run_training(arguments: dict, work: Path):
    from defectkit_kfp.pipelines.run import run_local

    try:
        return run_local(_training_package(), arguments, work)
    except RuntimeError as exc:
        raise PipelineFailed(f"{exc} The failing step's log is above; its artifacts are kept under {work}.") from exc


def _collect(run, out: Path | None) -> dict:
    """Copy the judged model next to a metrics.json made from the run's verdict."""
    verdict = json.loads(run.path("verdict").read_text())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if (out / "model").exists():
            shutil.rmtree(out / "model")
        shutil.copytree(run.path("model"), out / "model")
        (out / "metrics.json").write_text(json.dumps(verdict, indent=2))
    return verdict


def _summary(run, verdict: dict, *, started: float, model_dir: Path | None = None) -> str:
    approved = "APPROVED" if verdict["approved"] else "NOT APPROVED"
    lines = [
        "",
        "defectkit training run",
        "=" * 60,
        f"validation   {run.outputs['images']} images accepted, {run.outputs['quarantined']} quarantined",
        f"image AUROC  {verdict['image_auroc']:.4f}",
        f"threshold    {verdict['threshold']:.4f} ({verdict.get('threshold_policy', {}).get('kind', 'max_f1')})",
        f"precision    {verdict['precision']:.4f}   recall {verdict['recall']:.4f}   F1 {verdict['f1']:.4f}",
    ]
    per_type = verdict.get("recall_by_defect_type") or {}
    if per_type:
        lines.append("recall/type  " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(per_type.items())))
    lines.append(f"verdict      {approved}")
    lines += [f"  - {reason}" for reason in verdict["reasons"]]
    lines += [
        f"model        {model_dir or run.path('model')}",
        f"artifacts    {run.pipeline_root}",
        f"pipeline     {_training_package()}  (upload this file in the Kubeflow UI)",
        f"wall time    {time.perf_counter() - started:.0f} s",
        "=" * 60,
    ]
    return "\n".join(lines)


def cmd_sample(args: argparse.Namespace) -> int:
    from defectkit.synthetic import generate_sample

    generate_sample(Path(args.out), count=args.count, size=args.size, seed=args.seed)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = Path(args.out).resolve()
    arguments = {
        "source_uri": args.data if "://" in args.data else str(Path(args.data).resolve()),
        "epochs": args.epochs,
        "image_size": args.image_size,
        "architecture": args.arch,
        "device": args.device,
        "batch_size": args.batch_size,
        "champion_uri": args.champion or "",
    }
    run = _run_training(arguments, out / "work")
    verdict = _collect(run, out)
    print(_summary(run, verdict, started=started, model_dir=out / "model"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from defectkit import demo

    started = time.perf_counter()
    work = Path(args.work).resolve()
    try:
        run = demo.train_and_ship(work)
    except RuntimeError as exc:
        raise PipelineFailed(f"{exc} The failing step's log is above; its artifacts are kept under {work}.") from exc
    verdict = _collect(run, None)
    print(_summary(run, verdict, started=started) + _serving_summary(work))
    return 0


def cmd_demo_rollback(args: argparse.Namespace) -> int:
    from defectkit import demo

    work = Path(args.work).resolve()
    record = demo.ship_broken_candidate(work)
    print(_delivery_lines(record, title="broken candidate (calls every image defective)")
          + _serving_summary(work, last_delivery=False))
    return 0 if record.get("verdict") == "rolled_back" else 1


def cmd_demo_drift(args: argparse.Namespace) -> int:
    from defectkit import demo, monitor

    work = Path(args.work).resolve()
    try:
        record = demo.drift_loop(work)
    except RuntimeError as exc:
        raise PipelineFailed(f"{exc} The failing step's log is above; its artifacts are kept under {work}.") from exc
    lines = ["", monitor.render_record(record)]
    verdict = record.get("retraining_verdict")
    if verdict:
        lines.append(f"retrained    image AUROC {verdict['image_auroc']:.4f}: "
                     f"{'APPROVED' if verdict['approved'] else 'NOT APPROVED'}")
        lines += [f"  - {reason}" for reason in verdict["reasons"]]
    print("\n".join(lines) + _serving_summary(work))
    return 0


def _delivery_lines(record: dict | None, *, title: str) -> str:
    if not record:
        return "\ndelivery     none (not approved, or no registry)"
    candidate = record["candidate"]
    lines = ["", f"canary       {title}, version {candidate.get('version')}: {record['verdict'].upper()} "
                 f"after {record.get('duration_s')} s, candidate at {record['final_weight']}% traffic"]
    if record.get("reason"):
        lines.append(f"  why        {record['reason']}")
    for entry in record.get("analyses", []):
        lines.append(f"  step {entry['step']} at {entry['weight']}%: {entry['verdict']}: {entry['explanation']}")
    return "\n".join(lines)


def _serving_summary(work: Path, *, last_delivery: bool = True) -> str:
    from defectkit import demo
    from defectkit.delivery.local import read_stack

    lines = [_delivery_lines(demo.delivery_outcome(work), title="last delivery")] if last_delivery else [""]
    stack = read_stack(work)
    if stack is not None and stack.router is not None:
        lines += [
            f"serving      champion at {stack.router.url}/v2/models/{demo.DemoDefaults.model_name}/infer "
            f"(Open Inference Protocol v2)",
            f"             stop it with: .venv/bin/defectkit serve --stop --work {work}",
        ]
    lines.append(f"registry     {demo.tracking_uri(work)}")
    return "\n".join(lines) + "\n"


def cmd_submit(args: argparse.Namespace) -> int:
    from defectkit_kfp.pipelines.run import parse_arguments, submit

    package = Path(args.package) if args.package else _training_package()
    arguments = parse_arguments(package, args.param)
    run_id = submit(args.host, package, arguments, experiment=args.experiment, run_name=args.run_name, namespace=args.namespace)
    print(run_id)
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from defectkit import monitor
    from defectkit_kfp.pipelines.run import MONITOR_YAML, parse_arguments

    package = Path(args.package) if args.package else MONITOR_YAML
    arguments = parse_arguments(package, args.param)
    print(monitor.create_recurring_run(args.host, package, args.cron, arguments, experiment=args.experiment,
                                       job_name=args.job_name, namespace=args.namespace))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defectkit", description="Defect detection pipelines for Kubeflow and KServe.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="write a deterministic sample dataset of textured surfaces with defects")
    sample.add_argument("--out", required=True, help="directory to write")
    sample.add_argument("--count", type=int, default=DemoDefaults.count, help="total images (default %(default)s)")
    sample.add_argument("--size", type=int, default=DemoDefaults.sample_size, help="image side in pixels (default %(default)s)")
    sample.add_argument("--seed", type=int, default=0, help="seed (default %(default)s)")
    sample.set_defaults(func=cmd_sample)

    train = commands.add_parser("train", help="run the training pipeline locally on a dataset")
    train.add_argument("--data", required=True, help="dataset root: path, file:// or gs:// URI")
    train.add_argument("--out", required=True, help="writes OUT/metrics.json and OUT/model/")
    train.add_argument("--epochs", type=int, default=DemoDefaults.epochs)
    train.add_argument("--image-size", type=int, default=224)
    train.add_argument("--arch", default="resnet18", help="torchvision model name")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    train.add_argument("--batch-size", type=int, default=DemoDefaults.batch_size)
    train.add_argument("--champion", help="champion model directory to judge against")
    train.set_defaults(func=cmd_train)

    demo = commands.add_parser("demo", help="sample data, train, judge, register and canary-ship: the main job "
                               "on embedded defaults")
    demo.add_argument("--work", default="runs", help="work directory (default %(default)s)")
    demo.set_defaults(func=cmd_demo)

    rollback = commands.add_parser("demo-rollback", help="ship a deliberately broken candidate against the "
                                   "champion of `demo` and show it rolled back")
    rollback.add_argument("--work", default="runs", help="work directory of `demo` (default %(default)s)")
    rollback.set_defaults(func=cmd_demo_rollback)

    drift = commands.add_parser("demo-drift", help="serve the champion, send it shifted images, detect the drift, "
                                "retrain on the new data and canary the retrained model")
    drift.add_argument("--work", default="runs", help="work directory of `demo` (default %(default)s)")
    drift.set_defaults(func=cmd_demo_drift)

    submit = commands.add_parser("submit", help="create a run of the compiled pipeline on a Kubeflow Pipelines cluster")
    submit.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    submit.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline argument (repeatable)")
    submit.add_argument("--package", help="compiled pipeline YAML (default: the training pipeline)")
    submit.add_argument("--experiment", default="defectkit")
    submit.add_argument("--run-name")
    submit.add_argument("--namespace")
    submit.set_defaults(func=cmd_submit)

    schedule = commands.add_parser("schedule", help="run the drift monitor pipeline on a schedule on a Kubeflow "
                                   "Pipelines cluster (a recurring run, one at a time)")
    schedule.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    schedule.add_argument("--cron", required=True, help="KFP cron with seconds first, e.g. '0 0 * * * *' hourly")
    schedule.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                          help="monitor pipeline argument (repeatable); sample_uri, model_uri, state_uri, "
                          "base_dataset_uri and retraining_data_uri are required")
    schedule.add_argument("--package", help="compiled pipeline YAML (default: the monitor pipeline)")
    schedule.add_argument("--experiment", default="defectkit")
    schedule.add_argument("--job-name", default="defectkit-monitor", help="name of the recurring run")
    schedule.add_argument("--namespace")
    schedule.set_defaults(func=cmd_schedule)

    # Each of these imports nothing heavy until its command runs.
    from defectkit.delivery import manifest
    from defectkit.serving import add_commands as add_serve_commands

    add_serve_commands(commands)
    manifest.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per replayed request otherwise
    try:
        return args.func(args)
    except (ValueError, LookupError, FileNotFoundError, PipelineFailed, RuntimeError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``defectkit train`` and ``defectkit pipeline submit|schedule``: the committed compiled pipeline YAML,
run locally through kfp.local or on a cluster through the KFP API."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

KFP_HOST_HELP = "KFP API endpoint, e.g. https://kubeflow.example.com/pipeline"
NAMESPACE_HELP = "Kubeflow profile namespace the run belongs to (multi-user Kubeflow)"
TOKEN_PATH_HELP = ("file holding the bearer token for the KFP API, read for every call (default: "
                   "$KF_PIPELINES_SA_TOKEN_PATH, else /var/run/secrets/kubeflow/pipelines/token when present)")


class PipelineFailed(RuntimeError):
    pass


def add_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="run the training pipeline locally (kfp.local) on a dataset")
    train.add_argument("--data", required=True, help="dataset root: path, file:// or gs:// URI")
    train.add_argument("--out", required=True, help="writes OUT/metrics.json and OUT/model/")
    # Unset options are left to the training pipeline, so that its compiled defaults are the only ones.
    train.add_argument("--steps", type=int, help="budget of training steps (default: the pipeline's)")
    train.add_argument("--image-size", type=int, help="side of the square model input in px (default: the pipeline's)")
    train.add_argument("--arch", help="torchvision model name (default: the pipeline's)")
    train.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the pipeline's)")
    train.add_argument("--batch-size", type=int, help="(default: the pipeline's)")
    train.add_argument("--pretrained-weights", help="'imagenet', '' (from scratch) or a state dict path/URI "
                       "(default: the pipeline's)")
    train.add_argument("--pretrained-cache", help="directory or gs:// / s3:// URI where downloaded ImageNet weights "
                       "are kept (default: none)")
    train.add_argument("--champion", help="champion model directory to judge against")
    train.set_defaults(func=cmd_train)

    pipeline = commands.add_parser("pipeline", help="run the compiled pipelines on a Kubeflow Pipelines cluster")
    verbs = pipeline.add_subparsers(dest="verb", required=True, metavar="VERB")
    submit = verbs.add_parser("submit", help="create a run of a compiled pipeline (default: the training pipeline)")
    submit.add_argument("--host", required=True, help=KFP_HOST_HELP)
    submit.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="pipeline argument, checked against the pipeline's inputs (repeatable)")
    submit.add_argument("--package", help="compiled pipeline YAML (default: the training pipeline)")
    submit.add_argument("--experiment", default="defectkit", help="(default %(default)s)")
    submit.add_argument("--run-name")
    submit.add_argument("--namespace", help=NAMESPACE_HELP)
    submit.add_argument("--token-path", help=TOKEN_PATH_HELP)
    submit.set_defaults(func=cmd_submit)

    schedule = verbs.add_parser("schedule", help="run the drift monitor pipeline on a schedule (a recurring run, "
                                "one at a time)")
    schedule.add_argument("--host", required=True, help=KFP_HOST_HELP)
    schedule.add_argument("--cron", required=True, help="KFP cron with seconds first, e.g. '0 0 * * * *' hourly")
    schedule.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                          help="monitor pipeline argument (repeatable); sample_uri, model_uri, state_uri, "
                          "base_dataset_uri and retraining_data_uri are required")
    schedule.add_argument("--package", help="compiled pipeline YAML (default: the monitor pipeline)")
    schedule.add_argument("--experiment", default="defectkit", help="(default %(default)s)")
    schedule.add_argument("--job-name", default="defectkit-monitor", help="name of the recurring run "
                          "(default %(default)s)")
    schedule.add_argument("--namespace", help=NAMESPACE_HELP)
    schedule.add_argument("--token-path", help=TOKEN_PATH_HELP)
    schedule.set_defaults(func=cmd_schedule)


def training_package() -> Path:
    from defectkit_kfp.pipelines.run import TRAINING_YAML

    return TRAINING_YAML


def run_failed(exc: RuntimeError, work: Path) -> PipelineFailed:
    return PipelineFailed(f"{exc} The failing step's log is above; its artifacts are kept under {work}.")


def collect(run, out: Path | None) -> dict:
    """The run's verdict; with ``out``, the judged model copied there next to a metrics.json of the verdict."""
    verdict = json.loads(run.path("verdict").read_text())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if (out / "model").exists():
            shutil.rmtree(out / "model")
        shutil.copytree(run.path("model"), out / "model")
        (out / "metrics.json").write_text(json.dumps(verdict, indent=2))
    return verdict


def summary(run, verdict: dict, *, started: float, model_dir: Path | None = None) -> str:
    approved = "APPROVED" if verdict["approved"] else "NOT APPROVED"
    lines = [
        "",
        "defectkit training run",
        "=" * 60,
        f"validation   {run.outputs['images']} images accepted, {run.outputs['quarantined']} quarantined",
        f"image AUROC  {verdict['image_auroc']:.4f}",
        f"threshold    {verdict['threshold']:.4f} ({_policy_words(verdict.get('threshold_policy') or {})})",
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
        f"pipeline     {training_package()}  (upload this file in the Kubeflow UI)",
        f"wall time    {time.perf_counter() - started:.0f} s",
        "=" * 60,
    ]
    return "\n".join(lines)


def _policy_words(policy: dict) -> str:
    kind = policy.get("kind", "max_f1")
    if policy.get("requested"):
        return f"{kind} instead of {policy['requested']}: {policy.get('reason', '')}"
    return kind


def cmd_train(args: argparse.Namespace) -> int:
    from defectkit_kfp.pipelines.run import run_local

    started = time.perf_counter()
    out = Path(args.out).resolve()
    given = {"steps": args.steps, "image_size": args.image_size, "architecture": args.arch, "device": args.device,
             "batch_size": args.batch_size, "champion_uri": args.champion,
             "pretrained_weights": args.pretrained_weights, "pretrained_cache": args.pretrained_cache}
    arguments = {"source_uri": args.data if "://" in args.data else str(Path(args.data).resolve()),
                 **{name: value for name, value in given.items() if value is not None}}
    work = out / "work"
    try:
        run = run_local(training_package(), arguments, work)
    except RuntimeError as exc:
        raise run_failed(exc, work) from exc
    verdict = collect(run, out)
    print(summary(run, verdict, started=started, model_dir=out / "model"))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from defectkit_kfp.pipelines.run import parse_arguments, submit

    package = Path(args.package) if args.package else training_package()
    arguments = parse_arguments(package, args.param)
    print(submit(args.host, package, arguments, experiment=args.experiment, run_name=args.run_name,
                 namespace=args.namespace, token_path=args.token_path))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from defectkit_kfp.pipelines.run import MONITOR_YAML, create_recurring_run, parse_arguments

    package = Path(args.package) if args.package else MONITOR_YAML
    arguments = parse_arguments(package, args.param)
    print(create_recurring_run(args.host, package, args.cron, arguments, experiment=args.experiment,
                               job_name=args.job_name, namespace=args.namespace, token_path=args.token_path))
    return 0

"""The ``defectkit`` command: nouns and verbs, one module per noun.

    defectkit sample     --out DIR [--count N --size PX --seed S]
    defectkit train      --data URI --out DIR [--steps --image-size --arch --device]
    defectkit demo       [rollback | drift] [--work DIR]            (`make run`, `make demo-rollback`, ...)
    defectkit pipeline   submit | schedule --host URL ...
    defectkit serve      --model DIR|models:/<name>@<alias> --port P ...
    defectkit rollout    start | status | restore | manifest ...
    defectkit stack      status | stop [--work DIR]

This is the only layer above both the core library and the compiled pipelines
(``defectkit_kfp.pipelines``): ``train``, ``demo`` and ``pipeline`` run the committed
pipeline YAML, locally through kfp.local or on a cluster through the KFP API.
"""

from __future__ import annotations

import argparse
import logging
import sys

from defectkit.cli import demo, pipeline, rollout, sample, serve, stack

log = logging.getLogger("defectkit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defectkit", description="Defect detection pipelines for Kubeflow and KServe.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for noun in (sample, pipeline, demo, serve, rollout, stack):
        noun.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per replayed request or scrape otherwise
    try:
        return args.func(args)
    except (ValueError, LookupError, FileNotFoundError, RuntimeError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())

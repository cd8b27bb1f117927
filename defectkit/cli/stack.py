"""``defectkit stack status|stop``: the local serving stack (router and model servers) of a work directory."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_commands(commands: argparse._SubParsersAction) -> None:
    stack = commands.add_parser("stack", help="look at or stop the local serving stack (router and model servers "
                                "on 127.0.0.1) that `rollout start --backend local` and `demo` run")
    verbs = stack.add_subparsers(dest="verb", required=True, metavar="VERB")
    status = verbs.add_parser("status", help="print each process of the stack with its URL, model and whether it runs")
    stop = verbs.add_parser("stop", help="stop the router and the model servers")
    for parser in (status, stop):
        parser.add_argument("--work", default="runs", help="work directory of the stack (default %(default)s)")
    status.set_defaults(func=cmd_status)
    stop.set_defaults(func=cmd_stop)


def cmd_status(args: argparse.Namespace) -> int:
    from defectkit.delivery.local import stack_status

    status = stack_status(Path(args.work))
    print(f"no local serving stack in {args.work}" if status is None else json.dumps(status, indent=2))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from defectkit.delivery.local import stop_stack

    stopped = stop_stack(Path(args.work))
    log.info("local serving stack of %s %s", args.work, "stopped" if stopped else "was not running")
    return 0

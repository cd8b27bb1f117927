"""``defectkit sample``: a deterministic sample dataset of textured surfaces with defects."""

from __future__ import annotations

import argparse
from pathlib import Path

from defectkit.cli.demo import DemoDefaults


def add_commands(commands: argparse._SubParsersAction) -> None:
    sample = commands.add_parser("sample", help="write a deterministic sample dataset of textured surfaces with "
                                 "defects (MVTec AD layout)")
    sample.add_argument("--out", required=True, help="directory to write")
    sample.add_argument("--count", type=int, default=DemoDefaults.count, help="total images (default %(default)s)")
    sample.add_argument("--size", type=int, default=DemoDefaults.sample_size,
                        help="image side in pixels (default %(default)s)")
    sample.add_argument("--seed", type=int, default=0, help="seed (default %(default)s)")
    sample.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    from defectkit.synthetic import generate_sample

    generate_sample(Path(args.out), count=args.count, size=args.size, seed=args.seed)
    return 0

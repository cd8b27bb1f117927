"""Importing kserve safely: the one place that does it, below every serving module that needs it."""

from __future__ import annotations

import sys


def import_kserve() -> None:
    """Import kserve with a bare argv: its model_server module parses sys.argv on import, where our options
    (``--model`` abbreviates its ``--model_name``) or pytest's (``--co`` abbreviates ``--configure_logging``)
    would be misread or abort the process. Every module of ours that uses kserve calls this first."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        import kserve  # noqa: F401
    finally:
        sys.argv = argv

"""Decision records: what was decided and why, as JSON for tools and Markdown for people, side by side.

The rollout (:mod:`defectkit.delivery.record`) and the drift monitor
(:mod:`defectkit.monitor`) each build their own record and Markdown; this
module owns what they share: the file names (under which
:mod:`defectkit.registry` logs them too), the time format, and writing and
reading the pair.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from defectkit.files import write_json_atomic, write_text_atomic

JSON_NAME = "decision_record.json"
MARKDOWN_NAME = "decision_record.md"


def iso(at: float) -> str:
    """UNIX seconds as a UTC ISO 8601 time with milliseconds, as every record shows times."""
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="milliseconds")


def write(record: Mapping[str, Any], markdown: str, out_dir: Path) -> tuple[Path, Path]:
    """Replace the record's JSON and Markdown in ``out_dir`` (each file whole or not at all); returns both paths."""
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / JSON_NAME, record)
    write_text_atomic(out_dir / MARKDOWN_NAME, markdown)
    return out_dir / JSON_NAME, out_dir / MARKDOWN_NAME


def read(out_dir: Path) -> dict[str, Any]:
    """The JSON record that :func:`write` left in ``out_dir``."""
    path = Path(out_dir) / JSON_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out_dir} holds no decision record; give the folder it was "
                                f"written to")
    return json.loads(path.read_text())

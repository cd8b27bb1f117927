"""Local files replaced atomically: a reader sees the old content or the new, never half of one.

The one home for atomic writes. Each write goes to a temporary file beside the
target, is fsynced, renamed over the target (``os.replace``, atomic on POSIX)
and the directory is fsynced, so a crash leaves either file whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def replacing(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it replaces ``path``.

    On error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    """Replace ``path`` by ``data``, durably."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def create_bytes(path: Path | str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; False when it did, and then it is left as it was.

    Of two writers racing for the same name exactly one creates it, and a reader sees it whole or not at all:
    the data goes to a temporary file, which is then hard-linked into place (a link fails if the name is taken).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(temporary)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8), durably."""
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path | str, record: Any, *, indent: int = 1) -> None:
    """Replace ``path`` by ``record`` as JSON, durably; NaN and infinities are refused, as JSON has none."""
    write_bytes_atomic(path, json.dumps(record, indent=indent, allow_nan=False).encode())

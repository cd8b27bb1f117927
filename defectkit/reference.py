"""Reference statistics of training data: per column, the sorted values and PSI bins.

Stored with the model artifact at training time (numpy only, so the training
image writes it without the monitoring stack); defectkit.drift compares
production data against it.

A judged model carries its training data's reference in ``reference/``
(:data:`MODEL_DIR`): the rows of the training images in ``features.csv`` and a
saved :class:`Reference` of their embeddings in ``embeddings.npz``, the layout
``defectkit.drift.detect_artifact_drift`` reads as its reference.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "defectkit.drift-reference/v1"
MODEL_DIR = "reference"  # inside a judged model artifact
EMBEDDINGS_FILE = "embeddings.npz"
DEFAULT_BINS = 10
EMBEDDING_PREFIX = "embedding_"
_KNOT_SPACING = 32
_TRANSPOSE_BLOCK = 64


@dataclass(frozen=True, eq=False)
class Reference:
    """What drift is measured against, per column: every (sorted) reference value and the PSI bins.

    ``values`` is (columns, rows) float32, each row sorted: the exact empirical
    distribution, so the KS statistic against it is exact. ``edges`` (columns,
    bins - 1) are the inner PSI bin edges (reference quantiles; bins are
    ``(-inf, e1], (e1, e2], ..., (e_last, inf)``) and ``proportions`` (columns,
    bins) the share of reference values in each bin.
    """

    names: tuple[str, ...]
    values: np.ndarray
    edges: np.ndarray
    proportions: np.ndarray

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        object.__setattr__(self, "names", names)
        if len(set(names)) != len(names):
            duplicated = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"column names must be unique, {duplicated} appear more than once")
        if self.values.ndim != 2 or self.values.shape[0] != len(names) or self.values.shape[1] < 1:
            raise ValueError(f"values must be (columns={len(names)}, rows>=1), got shape {self.values.shape}")
        if self.edges.ndim != 2 or self.edges.shape[0] != len(names):
            raise ValueError(f"edges must be (columns={len(names)}, bins-1), got shape {self.edges.shape}")
        if self.proportions.shape != (len(names), self.edges.shape[1] + 1):
            raise ValueError(f"proportions must be (columns, bins)={(len(names), self.edges.shape[1] + 1)}, "
                             f"got {self.proportions.shape}")
        # The KS search relies on both; Reference.from_array guarantees them.
        if self.values.dtype != np.float32 or not np.all(self.values[:, 1:] >= self.values[:, :-1]):
            raise ValueError(f"values must be float32 with every row sorted (got {self.values.dtype}); "
                             f"build references with Reference.from_array")
        for array in (self.values, self.edges, self.proportions):
            array.flags.writeable = False

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[1])

    @property
    def n_columns(self) -> int:
        return len(self.names)

    @cached_property
    def knots(self) -> np.ndarray:
        """Every K-th sorted value per column (positions K-1, 2K-1, ...; K = _KNOT_SPACING): the KS search's index."""
        return np.ascontiguousarray(self.values[:, _KNOT_SPACING - 1::_KNOT_SPACING])

    @classmethod
    def from_array(
        cls,
        values: np.ndarray,
        names: Sequence[str],
        max_rows: int = 20000,
        seed: int = 0,
        bins: int = DEFAULT_BINS,
    ) -> Reference:
        """Summarise (rows, columns) reference data; above ``max_rows`` rows a seeded random subset is kept."""
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[0] < 1:
            raise ValueError(f"reference values must be a (rows, columns) array with rows, got shape {values.shape}")
        if values.shape[1] != len(names):
            raise ValueError(f"{len(names)} names for {values.shape[1]} columns; give one name per column")
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if bins < 2:
            raise ValueError(f"bins must be at least 2, got {bins}")
        if values.shape[0] > max_rows:
            keep = np.sort(np.random.default_rng(seed).choice(values.shape[0], max_rows, replace=False))
            log.info("reference: keeping %d of %d rows (seed %d)", max_rows, values.shape[0], seed)
            values = values[keep]
        columns = _transposed(values)
        _require_finite(columns, names, "reference")
        columns.sort(axis=1)
        quantiles = np.arange(1, bins) / bins
        edges = np.ascontiguousarray(np.quantile(columns, quantiles, axis=1).T.astype(np.float32))
        return cls(tuple(names), columns, edges, _bin_proportions(columns, edges))

    def save(self, path: Path) -> None:
        """Write an .npz (plain arrays; names as a JSON string), readable without pickle."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A file object keeps np.savez from appending ".npz" to a path that lacks it.
        with path.open("wb") as out:
            np.savez(out, format=np.array(FORMAT), names=np.array(json.dumps(list(self.names))),
                     values=self.values, edges=self.edges, proportions=self.proportions)

    @classmethod
    def load(cls, path: Path) -> Reference:
        with np.load(Path(path), allow_pickle=False) as data:
            found = str(data["format"]) if "format" in data else None
            if found != FORMAT:
                raise ValueError(f"{path}: format is {found!r}, expected {FORMAT!r}; "
                                 f"write it with Reference.save")
            return cls(tuple(json.loads(str(data["names"]))), data["values"], data["edges"], data["proportions"])


def _require_finite(columns: np.ndarray, names: Sequence[str], what: str) -> None:
    finite = np.isfinite(columns).all(axis=1)
    if not finite.all():
        bad = [names[i] for i in np.flatnonzero(~finite)[:5]]
        raise ValueError(f"{what} data has NaN or infinite values in columns {bad}; "
                         f"drop or repair those rows before measuring drift")


def _bin_proportions(sorted_columns: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of each sorted row in the bins (-inf, e1], (e1, e2], ..., (e_last, inf)."""
    n = sorted_columns.shape[1]
    at_most = np.empty((sorted_columns.shape[0], edges.shape[1] + 2), np.int64)
    at_most[:, 0], at_most[:, -1] = 0, n
    for k, (column, column_edges) in enumerate(zip(sorted_columns, edges, strict=True)):
        at_most[k, 1:-1] = np.searchsorted(column, column_edges, side="right")
    return np.diff(at_most, axis=1) / n


def _transposed(values: np.ndarray) -> np.ndarray:
    """(rows, columns) as a C-contiguous float32 (columns, rows) array."""
    out = np.empty((values.shape[1], values.shape[0]), np.float32)
    for start in range(0, values.shape[0], _TRANSPOSE_BLOCK):
        out[:, start:start + _TRANSPOSE_BLOCK] = values[start:start + _TRANSPOSE_BLOCK].T
    return out


def copy_model_reference(model_dir: Path, dest: Path, *, name: str | None = None) -> Path:
    """Copy the drift reference a judged model carries into ``dest`` (merged into what is there); returns ``dest``.

    ``name`` is how errors name the model (e.g. the URI it was fetched from); ``model_dir`` by default.
    """
    source = Path(model_dir) / MODEL_DIR
    if not source.is_dir():
        raise ValueError(f"{name or model_dir} has no {MODEL_DIR}/ (drift reference); evaluate it with this version "
                         f"of defectkit")
    shutil.copytree(source, dest, dirs_exist_ok=True)
    return Path(dest)


# --------------------------------------------------------------------------- statistics


def embedding_names(width: int) -> tuple[str, ...]:
    """Column names for ``width`` embedding dimensions, as a Reference of embeddings should use."""
    digits = len(str(max(width - 1, 0)))
    return tuple(f"{EMBEDDING_PREFIX}{i:0{digits}d}" for i in range(width))


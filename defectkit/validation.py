"""Dataset validation: decode every file, quarantine the bad ones, check the rest.

``validate_dataset`` turns a raw image tree (local path, ``file://`` or
``gs://``) into a dataset artifact: every image that decodes and has sensible
dimensions is copied byte-for-byte with its mask, a validation split is carved
from train, and ``manifest.json`` is written. Files that fail are kept, with
the reason, in a quarantine directory. A Great Expectations suite then checks
the metadata of the accepted images (completeness, dimensions, pixel modes,
classes, images per class, train/test leakage). The report says what passed,
what failed, and what to do about it.

``validate_window`` checks a window of production samples (what
:func:`defectkit.sampling.window_to_dataset` wrote) the same way before the
drift monitor trusts it: the share of samples that no longer decode, and a
suite over the answers and image features (scores in [0, 1], known labels,
a model version, features present and in range).
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from defectkit import image
from defectkit.data import (
    MASK_DIR,
    SOURCE_SPLITS,
    SPLITS,
    ImageFile,
    Manifest,
    ManifestEntry,
    assign_validation,
    parse_layout,
    sha256_bytes,
)
from defectkit.preprocess import FEATURE_NAMES, FEATURES_FILE
from defectkit.sampling import LABELS, QUARANTINE_DIR, SAMPLES_FILE
from defectkit.sampling import QUARANTINE_FILE as WINDOW_QUARANTINE_FILE
from defectkit.storage import Store

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.json"
QUARANTINE_FILES_DIR = "files"

UNEXPECTED_LOCATION = "unexpected_location"  # a file that fits nowhere in the layout
MASK_MISMATCH = "mask_mismatch"  # a mask whose size differs from its image's
IMAGE_QUARANTINED = "image_quarantined"  # a mask whose image was quarantined
REASONS = (*image.REASONS, UNEXPECTED_LOCATION, MASK_MISMATCH, IMAGE_QUARANTINED)

# Pixel modes that image.decode converts to RGB by an explicit rule.
DECODED_MODES = (
    "1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
    "I;16", "I;16L", "I;16B", "I;16N", "I", "F",
)

METADATA_COLUMNS = ("path", "split", "class", "width", "height", "mode", "sha256", "size")

_EXAMPLES = 10  # offending rows named in a check's detail; the rest are counted
_LOGGED_QUARANTINE = 20  # quarantined files logged one by one; the report has them all


@dataclass(frozen=True)
class ValidationConfig:
    max_quarantine_fraction: float = 0.1
    val_fraction: float = 0.2
    seed: int = 0
    min_side: int = 32
    max_side: int = 8192
    max_pixels: int = image.DEFAULT_MAX_PIXELS
    min_images_per_class: int = 5
    allowed_classes: tuple[str, ...] = ()  # empty: any class name is accepted

    def __post_init__(self) -> None:
        # Lists arrive from JSON and pipeline parameters; the config must stay hashable.
        object.__setattr__(self, "allowed_classes", tuple(self.allowed_classes))
        if not 0.0 <= self.max_quarantine_fraction <= 1.0:
            raise ValueError(f"max_quarantine_fraction must be in [0, 1], got {self.max_quarantine_fraction!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be at least 1 px, got {self.min_side!r}")
        if self.max_side < self.min_side:
            raise ValueError(f"max_side ({self.max_side!r}) must not be below min_side ({self.min_side!r})")
        if self.max_pixels < self.min_side * self.min_side:
            raise ValueError(
                f"max_pixels ({self.max_pixels!r}) must allow at least a min_side x min_side image "
                f"({self.min_side * self.min_side} pixels)"
            )
        if self.min_images_per_class < 0:
            raise ValueError(f"min_images_per_class must be 0 or more, got {self.min_images_per_class!r}")
        for name in self.allowed_classes:
            if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
                raise ValueError(f"allowed_classes entry {name!r} is not a class directory name")
        if len(set(self.allowed_classes)) != len(self.allowed_classes):
            raise ValueError(f"allowed_classes has duplicates: {self.allowed_classes!r}")

    def to_json(self) -> dict:
        record = asdict(self)
        record["allowed_classes"] = list(self.allowed_classes)
        return record


@dataclass(frozen=True)
class Quarantined:
    path: str
    reason: str
    detail: str


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one expectation; ``detail`` gives observed values or failing examples."""

    name: str
    success: bool
    detail: str


# What to do when a check fails, by check name (or by suffix for one check per column).
_REMEDIES = {
    "has_images": "Check that the source holds files at train/<class>/<image> and test/<class>/<image>.",
    "width_between": "Resize or remove these images, or change min_side/max_side.",
    "height_between": "Resize or remove these images, or change min_side/max_side.",
    "mode_in_set": "Convert these images to RGB or greyscale.",
    "class_allowed": "Rename the class directories, or add the classes to allowed_classes.",
    "min_images_per_class": "Add images of these classes to that split, or lower min_images_per_class.",
    "no_train_test_leakage": "Remove the duplicates from test or from train, so that test scores measure "
                             "generalisation rather than memory.",
    "_not_null": "Missing metadata means the decoder returned incomplete information; report it with these files.",
}


def _remedy(check_name: str, remedies: dict[str, str] = _REMEDIES) -> str:
    """What to do about a failed check: by its name, or by a ``_suffix`` entry that covers one check per column."""
    return remedies.get(check_name) or next(
        (text for suffix, text in remedies.items() if suffix.startswith("_") and check_name.endswith(suffix)), "")


@dataclass(frozen=True)
class ValidationReport:
    manifest: Manifest
    quarantined: tuple[Quarantined, ...]
    checks: tuple[CheckResult, ...]
    total_files: int
    config: ValidationConfig = field(default_factory=ValidationConfig)

    @property
    def quarantine_fraction(self) -> float:
        """Quarantined files over all files found (images, masks and files that fit nowhere)."""
        return len(self.quarantined) / self.total_files if self.total_files else 0.0

    @property
    def quarantine_within_limit(self) -> bool:
        return self.quarantine_fraction <= self.config.max_quarantine_fraction

    @property
    def checks_passed(self) -> bool:
        return all(check.success for check in self.checks)

    @property
    def passed(self) -> bool:
        return self.quarantine_within_limit and self.checks_passed

    def reason_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(q.reason for q in self.quarantined).items()))

    def failure_message(self) -> str:
        """What failed, with the numbers and what to do; empty when the dataset passed."""
        if self.passed:
            return ""
        lines = [f"dataset validation failed for {self.manifest.source or 'the source'}:"]
        if not self.quarantine_within_limit:
            reasons = ", ".join(f"{reason} {n}" for reason, n in self.reason_counts().items())
            lines.append(
                f"- {len(self.quarantined)} of {self.total_files} files were quarantined "
                f"(fraction {self.quarantine_fraction:.3f}), above max_quarantine_fraction="
                f"{self.config.max_quarantine_fraction} ({reasons}). Fix or remove the quarantined files "
                f"(listed with reasons in {QUARANTINE_FILE}), or raise max_quarantine_fraction if losing them "
                f"is acceptable."
            )
        for check in self.checks:
            if not check.success:
                lines.append(f"- expectation {check.name} failed: {check.detail}. {_remedy(check.name)}".rstrip())
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "format": "defectkit.validation/v1",
            "passed": self.passed,
            "source": self.manifest.source,
            "dataset_fingerprint": self.manifest.fingerprint,
            "total_files": self.total_files,
            "images": len(self.manifest.entries),
            "quarantine_fraction": self.quarantine_fraction,
            "max_quarantine_fraction": self.config.max_quarantine_fraction,
            "checks_passed": self.checks_passed,
            "failure_message": self.failure_message(),
            "config": self.config.to_json(),
            "counts": self.manifest.counts(),
            "quarantine_reasons": self.reason_counts(),
            "checks": [asdict(check) for check in self.checks],
            "quarantined": [asdict(q) for q in self.quarantined],
        }

    def to_html(self) -> str:
        """A self-contained page: summary, expectations, counts per split and class, quarantine."""
        e = html.escape
        verdict = "PASSED" if self.passed else "FAILED"
        summary = [
            ("Source", self.manifest.source or "-"),
            ("Dataset fingerprint", self.manifest.fingerprint),
            ("Files found", str(self.total_files)),
            ("Images accepted", str(len(self.manifest.entries))),
            ("Files quarantined", f"{len(self.quarantined)} ({self.quarantine_fraction:.1%}; "
                                  f"limit {self.config.max_quarantine_fraction:.1%})"),
            ("Expectations passed", f"{sum(c.success for c in self.checks)} of {len(self.checks)}"),
        ]
        parts = [f'<h1>Dataset validation: <span class="{"pass" if self.passed else "fail"}">{e(verdict)}</span></h1>',
                 *_summary_html(summary, self.failure_message()), *_checks_html(self.checks),
                 "<h2>Images per split and class</h2>", self._counts_html(),
                 *_quarantine_html(self.quarantined, self.reason_counts())]
        return _page(f"Dataset validation: {verdict}", parts)

    def _counts_html(self) -> str:
        counts = self.manifest.counts()
        splits = [s for s in SPLITS if s in counts]
        rows = []
        for class_name in self.manifest.classes:
            values = [counts[s].get(class_name, 0) for s in splits]
            rows.append((html.escape(class_name), *map(str, values), str(sum(values))))
        totals = [sum(counts[s].values()) for s in splits]
        rows.append(("<b>total</b>", *map(str, totals), str(sum(totals))))
        return _html_table(("Class", *splits, "total"), rows, numeric_from=1)


def _page(title: str, parts: list[str]) -> str:
    """A self-contained HTML page around ``parts`` (already escaped)."""
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>",
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:70em}",
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}",
        "th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:left;vertical-align:top}",
        "th{background:#f3f3f3}td.n{text-align:right}",
        ".pass{color:#176f2c;font-weight:bold}.fail{color:#b00020;font-weight:bold}",
        "pre{background:#fff4f4;border:1px solid #e0b4b4;padding:0.8em;white-space:pre-wrap}",
        "</style></head><body>",
        *parts,
        "</body></html>",
    ]) + "\n"


def _summary_html(summary: list[tuple[str, str]], failure_message: str) -> list[str]:
    e = html.escape
    parts = ["<h2>Summary</h2>", _html_table(("", ""), [(e(k), e(v)) for k, v in summary], header=False)]
    if failure_message:
        parts += ["<h2>What failed</h2>", f"<pre>{e(failure_message)}</pre>"]
    return parts


def _checks_html(checks: tuple[CheckResult, ...]) -> list[str]:
    e = html.escape
    return ["<h2>Expectations</h2>", _html_table(("Expectation", "Result", "Detail"), [
        (e(c.name), f'<span class="{"pass" if c.success else "fail"}">{"pass" if c.success else "FAIL"}</span>',
         e(c.detail)) for c in checks])]


def _quarantine_html(quarantined: tuple[Quarantined, ...], reasons: dict[str, int]) -> list[str]:
    e = html.escape
    parts = [f"<h2>Quarantine ({len(quarantined)} files)</h2>"]
    if not quarantined:
        return [*parts, "<p>No file was quarantined.</p>"]
    return [*parts,
            _html_table(("Reason", "Files"), [(e(r), str(n)) for r, n in reasons.items()], numeric_last=True),
            _html_table(("File", "Reason", "Detail"), [(e(q.path), e(q.reason), e(q.detail)) for q in quarantined])]


def _html_table(headers: tuple[str, ...], rows: list[tuple[str, ...]], *, header: bool = True,
                numeric_from: int | None = None, numeric_last: bool = False) -> str:
    """Rows must already be escaped."""
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>")
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            numeric = (numeric_from is not None and i >= numeric_from) or (numeric_last and i == len(row) - 1)
            cells.append(f'<td class="n">{cell}</td>' if numeric else f"<td>{cell}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


class ValidationFailed(Exception):
    """The dataset failed validation; ``report`` says why. Outputs were written before this was raised."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.failure_message())
        self.report = report


@dataclass(frozen=True)
class _Accepted:
    file: ImageFile
    sha256: str
    size: int
    info: image.ImageInfo


def _check_sides(info: image.ImageInfo, path: str, config: ValidationConfig) -> None:
    if min(info.width, info.height) < config.min_side:
        raise image.ImageRejected(
            "too_small",
            f"{path}: {info.width}x{info.height} is smaller than min_side={config.min_side} px; "
            f"use a larger image or lower min_side",
        )
    if max(info.width, info.height) > config.max_side:
        raise image.ImageRejected(
            "too_large",
            f"{path}: {info.width}x{info.height} is larger than max_side={config.max_side} px; "
            f"downscale the image or raise max_side",
        )


def _write(root: Path | None, rel: str, data: bytes) -> None:
    if root is None:
        return
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def _require_empty(directory: Path, what: str) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(
            f"{what} {directory} is not an empty directory; files of an earlier run would mix in. "
            f"Choose a new directory or remove it first"
        )


def _inside(path: Path, other: Path) -> bool:
    path, other = path.resolve(), other.resolve()
    return path == other or other in path.parents


def validate_dataset(
    source: str,
    out_dir: Path,
    config: ValidationConfig = ValidationConfig(),
    *,
    quarantine_dir: Path | None = None,
    raise_on_failure: bool = True,
    workers: int | None = None,
) -> ValidationReport:
    """Validate the image tree at ``source`` and write the accepted files as a dataset artifact to ``out_dir``.

    Quarantined files are copied to ``quarantine_dir/files/<rel path>`` and listed
    in ``quarantine_dir/quarantine.json``; with no ``quarantine_dir`` they are only
    listed in the report (the source is never modified). Everything is written
    before the verdict: with ``raise_on_failure`` a failing dataset raises
    ValidationFailed (carrying the report) afterwards, otherwise the caller
    checks ``report.passed``.
    """
    out_dir = Path(out_dir)
    _require_empty(out_dir, "output directory")
    if quarantine_dir is not None:
        quarantine_dir = Path(quarantine_dir)
        _require_empty(quarantine_dir, "quarantine directory")
        if _inside(quarantine_dir, out_dir) or _inside(out_dir, quarantine_dir):
            raise ValueError(f"quarantine directory {quarantine_dir} and output directory {out_dir} "
                             f"must not contain each other; use two separate directories")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers!r}")
    started = time.perf_counter()
    store = Store(source)
    layout = parse_layout(store.list())
    total_files = len(layout.images) + len(layout.masks) + len(layout.unexpected)
    log.info("validating %s: %d images, %d masks, %d files outside the layout",
             source, len(layout.images), len(layout.masks), len(layout.unexpected))
    out_dir.mkdir(parents=True, exist_ok=True)
    quarantine_files = quarantine_dir / QUARANTINE_FILES_DIR if quarantine_dir is not None else None
    # Threads, not processes: reads from gs:// wait on the network, and Pillow releases the GIL while decoding.
    pool_size = workers or min(32, 4 * (os.cpu_count() or 1))

    def check_image(file: ImageFile) -> _Accepted | Quarantined:
        data = store.read(file.path)
        try:
            _, info = image.decode(data, name=file.path, max_pixels=config.max_pixels)
            _check_sides(info, file.path, config)
        except image.ImageRejected as rejected:
            _write(quarantine_files, file.path, data)
            return Quarantined(file.path, rejected.reason, rejected.detail)
        _write(out_dir, file.path, data)
        return _Accepted(file, sha256_bytes(data), len(data), info)

    def set_aside(rel: str, reason: str, detail: str) -> Quarantined:
        _write(quarantine_files, rel, store.read(rel))
        return Quarantined(rel, reason, detail)

    with ThreadPoolExecutor(max_workers=pool_size) as pool:
        outcomes = list(_with_progress(pool.map(check_image, layout.images), len(layout.images)))
        accepted = [o for o in outcomes if isinstance(o, _Accepted)]
        quarantined = [o for o in outcomes if isinstance(o, Quarantined)]
        mask_owners: dict[str, list[ImageFile]] = {}
        for file in layout.images:
            if file.mask is not None:
                mask_owners.setdefault(file.mask, []).append(file)
        sizes = {a.file.path: (a.info.width, a.info.height) for a in accepted}

        def check_mask(rel: str) -> Quarantined | None:
            owners = mask_owners.get(rel, [])
            if not owners:
                return set_aside(rel, UNEXPECTED_LOCATION,
                                 f"{rel}: mask without an image of the same class and name under "
                                 f"{' or '.join(f'{split}/' for split in SOURCE_SPLITS)}; add the image or "
                                 f"delete the mask")
            kept = [f for f in owners if f.path in sizes]
            if not kept:
                return set_aside(rel, IMAGE_QUARANTINED,
                                 f"{rel}: its image {owners[0].path} was quarantined; kept beside it")
            data = store.read(rel)
            try:
                _, info = image.decode(data, name=rel, max_pixels=config.max_pixels)
            except image.ImageRejected as rejected:
                _write(quarantine_files, rel, data)
                return Quarantined(rel, rejected.reason, rejected.detail)
            wrong = [f.path for f in kept if sizes[f.path] != (info.width, info.height)]
            if wrong:
                width, height = sizes[wrong[0]]
                _write(quarantine_files, rel, data)
                return Quarantined(rel, MASK_MISMATCH,
                                   f"{rel}: mask is {info.width}x{info.height} but its image {wrong[0]} is "
                                   f"{width}x{height}; the image is kept without a mask. Regenerate the mask "
                                   f"at the image's size")
            _write(out_dir, rel, data)
            return None

        def misplaced(rel: str) -> Quarantined:
            return set_aside(rel, UNEXPECTED_LOCATION,
                             f"{rel}: not at {'|'.join(SOURCE_SPLITS)}/<class>/<image> or "
                             f"{MASK_DIR}/<class>/<name>_mask.png; move it into the layout or delete it")

        mask_outcomes = dict(zip(layout.masks, pool.map(check_mask, layout.masks), strict=True))
        quarantined += [q for q in mask_outcomes.values() if q is not None]
        quarantined += list(pool.map(misplaced, layout.unexpected))

    def with_good_mask(file: ImageFile) -> ImageFile:
        if file.mask is None or mask_outcomes.get(file.mask) is None:
            return file
        return ImageFile(file.path, file.split, file.class_name, None)

    files = assign_validation([with_good_mask(a.file) for a in accepted], config.val_fraction, config.seed)
    entries = tuple(
        ManifestEntry(f.path, f.split, f.class_name, a.sha256, a.size, a.info.width, a.info.height, a.info.mode, f.mask)
        for f, a in zip(files, accepted, strict=True)
    )
    manifest = Manifest(entries, source=source)
    manifest.write(out_dir)
    quarantined.sort(key=lambda q: q.path)
    if quarantine_dir is not None:
        quarantine_dir.mkdir(parents=True, exist_ok=True)
        (quarantine_dir / QUARANTINE_FILE).write_text(json.dumps([asdict(q) for q in quarantined], indent=1))
    for q in quarantined[:_LOGGED_QUARANTINE]:
        log.warning("quarantined %s (%s): %s", q.path, q.reason, q.detail)
    if len(quarantined) > _LOGGED_QUARANTINE:
        log.warning("quarantined %d more files; all are listed with reasons in the report and %s",
                    len(quarantined) - _LOGGED_QUARANTINE, QUARANTINE_FILE)

    classes = sorted({f.class_name for f in layout.images})
    checks = _run_expectations(_metadata_frame(entries), classes, config)
    report = ValidationReport(manifest, tuple(quarantined), tuple(checks), total_files, config)
    log.info(
        "validated %s in %.1f s: %d images accepted, %d of %d files quarantined (%.1f%%, limit %.1f%%), "
        "%d of %d expectations passed, fingerprint %s",
        source, time.perf_counter() - started, len(entries), len(quarantined), total_files,
        100 * report.quarantine_fraction, 100 * config.max_quarantine_fraction,
        sum(c.success for c in checks), len(checks), manifest.fingerprint[:12],
    )
    if not report.passed:
        if raise_on_failure:
            raise ValidationFailed(report)
        log.error("%s", report.failure_message())
    return report


def _with_progress(outcomes: Iterator, total: int) -> Iterator:
    step = max(100, total // 10)
    for done, outcome in enumerate(outcomes, start=1):
        if done % step == 0 or done == total:
            log.info("checked %d/%d images", done, total)
        yield outcome


def _metadata_frame(entries: tuple[ManifestEntry, ...]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(
        [(e.path, e.split, e.class_name, e.width, e.height, e.mode, e.sha256, e.size) for e in entries],
        columns=list(METADATA_COLUMNS),
    )
    # An empty frame has object columns; fix the numeric dtypes so the range checks can run.
    return frame.astype({"width": "int64", "height": "int64", "size": "int64"})


def _source_split(split: str) -> str:
    return "test" if split == "test" else "train"  # val is carved from train and lives under train/


def _class_counts_frame(metadata: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Images per (split as on disk, class) for every class found, including zero rows for absent pairs."""
    import pandas as pd

    found = Counter(zip(metadata["split"].map(_source_split), metadata["class"], strict=True))
    rows = [(split, name, found.get((split, name), 0)) for split in SOURCE_SPLITS for name in classes]
    return pd.DataFrame(rows, columns=["split", "class", "count"]).astype({"count": "int64"})


def _sides_frame(metadata: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct content per side: a sha256 seen twice here is in both train/val and test."""
    sides = metadata.assign(side=metadata["split"].map(_source_split))[["sha256", "side"]]
    return sides.drop_duplicates().reset_index(drop=True)


def _examples(items: list[str]) -> str:
    shown = "; ".join(items[:_EXAMPLES])
    return shown + (f"; and {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else "")


@dataclass(frozen=True)
class _Check:
    name: str
    table: str
    expectation: Callable[[], object]  # builds the GX expectation once GX is imported
    describe: Callable[[dict, bool], str]  # (GX result dict, success) -> detail in plain words


def _checks(metadata: pd.DataFrame, counts: pd.DataFrame, config: ValidationConfig) -> list[_Check]:
    import great_expectations as gx

    expect = gx.expectations
    n = len(metadata)

    def unexpected_paths(result: dict, column: str) -> list[str]:
        return [f"{row['path']} ({column}={row.get(column)!r})" for row in result.get("unexpected_index_list") or []]

    def not_null(column: str) -> _Check:
        return _Check(
            f"{column}_not_null", "images",
            lambda: expect.ExpectColumnValuesToNotBeNull(column=column),
            lambda r, ok: f"all {n} rows have a {column}" if ok else
            f"{column} missing in {r.get('unexpected_count')} of {n} rows: "
            + _examples([str(row.get("path")) for row in r.get("unexpected_index_list") or []]),
        )

    def side_between(column: str) -> _Check:
        observed = f"observed {metadata[column].min()}..{metadata[column].max()} px" if n else "no images"
        return _Check(
            f"{column}_between", "images",
            lambda: expect.ExpectColumnValuesToBeBetween(column=column, min_value=config.min_side,
                                                         max_value=config.max_side),
            lambda r, ok: f"{column} within [{config.min_side}, {config.max_side}] px for all {n} images ({observed})"
            if ok else f"{column} outside [{config.min_side}, {config.max_side}] px in "
                       f"{r.get('unexpected_count')} of {n} images: " + _examples(unexpected_paths(r, column)),
        )

    modes = ", ".join(f"{mode} ({count})" for mode, count in sorted(Counter(metadata["mode"]).items())) or "none"
    checks = [
        _Check(
            "has_images", "images",
            lambda: expect.ExpectTableRowCountToBeBetween(min_value=1),
            lambda r, ok: f"{n} images passed decoding" if ok else "no image passed decoding; there is nothing "
                                                                   "to train or test on",
        ),
        *(not_null(column) for column in METADATA_COLUMNS),
        side_between("width"),
        side_between("height"),
        _Check(
            "mode_in_set", "images",
            lambda: expect.ExpectColumnValuesToBeInSet(column="mode", value_set=list(DECODED_MODES)),
            lambda r, ok: f"pixel modes found: {modes}" if ok else
            f"pixel mode not converted by the decoder in {r.get('unexpected_count')} of {n} images: "
            + _examples(unexpected_paths(r, "mode")),
        ),
    ]
    if config.allowed_classes:
        allowed = ", ".join(config.allowed_classes)
        found = ", ".join(sorted(set(metadata["class"]))) or "none"
        checks.append(_Check(
            "class_allowed", "images",
            lambda: expect.ExpectColumnValuesToBeInSet(column="class", value_set=list(config.allowed_classes)),
            lambda r, ok: f"classes found ({found}) are all in allowed_classes ({allowed})" if ok else
            f"class outside allowed_classes ({allowed}) in {r.get('unexpected_count')} of {n} images: "
            + _examples(unexpected_paths(r, "class")),
        ))

    def describe_counts(r: dict, ok: bool) -> str:
        if ok:
            if counts.empty:
                return "no classes found"
            low = counts.loc[counts["count"].idxmin()]
            return (f"every class has at least {config.min_images_per_class} images in each of "
                    f"{' and '.join(SOURCE_SPLITS)} (fewest: {low['split']}/{low['class']} with {low['count']})")
        short = [f"{row['split']}/{row['class']} has {row['count']}"
                 for row in r.get("unexpected_index_list") or []]
        return (f"fewer than {config.min_images_per_class} images (val counts as train) in "
                f"{len(short)} of {len(counts)} split/class pairs: " + _examples(short))

    checks.append(_Check(
        "min_images_per_class", "class_counts",
        lambda: expect.ExpectColumnValuesToBeBetween(column="count", min_value=config.min_images_per_class),
        describe_counts,
    ))

    def describe_leakage(r: dict, ok: bool) -> str:
        if ok:
            return f"no image content appears in both train/val and test ({metadata['sha256'].nunique()} distinct)"
        leaked = sorted({row["sha256"] for row in r.get("unexpected_index_list") or []})
        pairs = []
        for digest in leaked:
            files = metadata[metadata["sha256"] == digest]
            test = files[files["split"] == "test"]["path"].tolist()
            train = files[files["split"] != "test"]["path"].tolist()
            pairs.append(f"{', '.join(test)} = {', '.join(train)} (sha256 {digest[:12]})")
        return (f"identical content in test and train/val for {len(leaked)} of "
                f"{metadata['sha256'].nunique()} distinct images: " + _examples(pairs))

    checks.append(_Check(
        "no_train_test_leakage", "sides",
        lambda: expect.ExpectColumnValuesToBeUnique(column="sha256"),
        describe_leakage,
    ))
    return checks


# Rows of each table are named by these columns in GX's unexpected_index_list.
_INDEX_COLUMNS = {"images": ["path"], "class_counts": ["split", "class"], "sides": ["sha256", "side"]}


@contextlib.contextmanager
def _quiet_gx() -> Iterator[None]:
    """Import Great Expectations and keep only its errors: it logs and warns at length about its own set-up."""
    package = logging.getLogger("great_expectations")
    levels = {package: package.level}
    package.setLevel(logging.ERROR)  # before the import, which logs too
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"great_expectations(\.|$)")
            import great_expectations  # noqa: F401 - imported here so that import-time output is filtered too

            # Some GX modules set their own level, so quieting the package logger alone is not enough.
            for name, logger in list(logging.root.manager.loggerDict.items()):
                if name.startswith("great_expectations.") and isinstance(logger, logging.Logger):
                    levels.setdefault(logger, logger.level)
                    logger.setLevel(logging.ERROR)
            yield
    finally:
        for logger, level in levels.items():
            logger.setLevel(level)


def _raised(exception_info: dict) -> str | None:
    """The exception message of a GX result, if evaluating it raised; GX nests the info per metric at times."""
    infos = [exception_info] if "raised_exception" in exception_info else list(exception_info.values())
    for info in infos:
        if isinstance(info, dict) and info.get("raised_exception"):
            return str(info.get("exception_message"))
    return None


def _run_expectations(metadata: pd.DataFrame, classes: list[str], config: ValidationConfig) -> list[CheckResult]:
    tables = {
        "images": metadata,
        "class_counts": _class_counts_frame(metadata, classes),
        "sides": _sides_frame(metadata),
    }
    return _run_checks(tables, lambda: _checks(metadata, tables["class_counts"], config), _INDEX_COLUMNS)


def _run_checks(tables: dict[str, pd.DataFrame], make_checks: Callable[[], list[_Check]],
                index_columns: dict[str, list[str]]) -> list[CheckResult]:
    """Run each table's checks as one GX suite; ``make_checks`` is called once GX is imported (quietly)."""
    started = time.perf_counter()
    with _quiet_gx():
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        checks = make_checks()
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        data_source = context.data_sources.add_pandas("defectkit")
        results: dict[str, object] = {}
        for table, frame in tables.items():
            expectations = []
            for check in checks:
                if check.table == table:
                    expectation = check.expectation()
                    expectation.meta = {"check": check.name}
                    expectations.append(expectation)
            batch = data_source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
            suite = context.suites.add(gx.ExpectationSuite(name=table, expectations=expectations))
            definition = context.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch,
                                                                                    suite=suite))
            run = definition.run(
                batch_parameters={"dataframe": frame},
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": index_columns[table]},
            )
            results.update({r.expectation_config.meta["check"]: r for r in run.results})
    outcomes = []
    for check in checks:
        result = results[check.name]
        error = _raised(result.exception_info or {})
        if error is not None:
            outcomes.append(CheckResult(check.name, False, f"could not be evaluated: {error}"))
        else:
            outcomes.append(CheckResult(check.name, bool(result.success), check.describe(result.result,
                                                                                         bool(result.success))))
    log.info("ran %d expectations in %.2f s: %d failed", len(outcomes), time.perf_counter() - started,
             sum(not o.success for o in outcomes))
    return outcomes


# --------------------------------------------------------------------------- production windows

# 8-bit image statistics lie in [0, 255]; saturation is a share; sharpness (a variance) has no upper bound.
_FEATURE_RANGES = {name: (0.0, 255.0) for name in FEATURE_NAMES} | {"saturation": (0.0, 1.0),
                                                                      "sharpness": (0.0, None)}
_WINDOW_REMEDIES = {
    "score_between": "The model server returned scores outside [0, 1]: check the served model and its version.",
    "label_in_set": f"Samples carry labels other than {', '.join(LABELS)}: they were not written by this model "
                    f"server version.",
    "model_version_not_null": "Samples without a model version cannot be traced to a model; check the server.",
    "score_not_null": "Samples without a numeric score were not written by this model server version.",
    "_in_range": "Feature values outside their range mean a preprocessing mismatch between server and monitor.",
    "_not_null": "Missing features mean the feature table does not match samples.jsonl; collect the window again.",
}


@dataclass(frozen=True)
class WindowValidationConfig:
    """How much of a production window may fail to decode before the monitor stops trusting it."""

    max_quarantine_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_quarantine_fraction <= 1.0:
            raise ValueError(f"max_quarantine_fraction must be in [0, 1], got {self.max_quarantine_fraction!r}")


@dataclass(frozen=True)
class WindowReport:
    """Validation of one window of production samples; ``passed`` gates retraining on it."""

    window: str
    images: int
    quarantined: tuple[Quarantined, ...]
    checks: tuple[CheckResult, ...]
    config: WindowValidationConfig = field(default_factory=WindowValidationConfig)

    @property
    def quarantine_fraction(self) -> float:
        total = self.images + len(self.quarantined)
        return len(self.quarantined) / total if total else 0.0

    @property
    def passed(self) -> bool:
        return (self.quarantine_fraction <= self.config.max_quarantine_fraction
                and all(check.success for check in self.checks))

    def reason_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(q.reason for q in self.quarantined).items()))

    def failure_message(self) -> str:
        """What failed, with the numbers and what to do; empty when the window passed."""
        if self.passed:
            return ""
        lines = [f"production window {self.window} failed validation:"]
        if self.quarantine_fraction > self.config.max_quarantine_fraction:
            reasons = ", ".join(f"{reason} {n}" for reason, n in self.reason_counts().items())
            lines.append(f"- {len(self.quarantined)} of {self.images + len(self.quarantined)} sampled images do not "
                         f"decode (fraction {self.quarantine_fraction:.3f}, above max_quarantine_fraction="
                         f"{self.config.max_quarantine_fraction}: {reasons}); the clients or the camera may be "
                         f"sending broken files. They are kept in {QUARANTINE_DIR}/ with their reasons.")
        for check in self.checks:
            if not check.success:
                lines.append(f"- expectation {check.name} failed: {check.detail}. "
                             f"{_remedy(check.name, _WINDOW_REMEDIES)}".rstrip())
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "format": "defectkit.window-validation/v1",
            "passed": self.passed,
            "window": self.window,
            "images": self.images,
            "quarantine_fraction": self.quarantine_fraction,
            "max_quarantine_fraction": self.config.max_quarantine_fraction,
            "failure_message": self.failure_message(),
            "quarantine_reasons": self.reason_counts(),
            "checks": [asdict(check) for check in self.checks],
            "quarantined": [asdict(q) for q in self.quarantined],
        }

    def to_html(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        summary = [
            ("Window", self.window),
            ("Images usable", str(self.images)),
            ("Images quarantined", f"{len(self.quarantined)} ({self.quarantine_fraction:.1%}; "
                                   f"limit {self.config.max_quarantine_fraction:.1%})"),
            ("Expectations passed", f"{sum(c.success for c in self.checks)} of {len(self.checks)}"),
        ]
        parts = [f'<h1>Production window validation: <span class="{"pass" if self.passed else "fail"}">'
                 f"{verdict}</span></h1>",
                 *_summary_html(summary, self.failure_message()), *_checks_html(self.checks),
                 *_quarantine_html(self.quarantined, self.reason_counts())]
        return _page(f"Production window validation: {verdict}", parts)


def validate_window(window_dir: Path, since: float, until: float,
                    config: WindowValidationConfig = WindowValidationConfig()) -> WindowReport:
    """Check a window dataset (``sampling.window_to_dataset``'s output) of the samples taken from ``since`` to
    ``until`` (UNIX seconds, which name it in the report)."""
    window_dir = Path(window_dir)
    window = " to ".join(datetime.fromtimestamp(at, timezone.utc).isoformat() for at in (since, until))
    quarantine_file = window_dir / QUARANTINE_DIR / WINDOW_QUARANTINE_FILE
    quarantined = tuple(Quarantined(q["path"], q["reason"], q["detail"])
                        for q in json.loads(quarantine_file.read_text())) if quarantine_file.is_file() else ()
    frame = _window_frame(window_dir)
    checks = _run_checks({"samples": frame}, lambda: _window_checks(frame), {"samples": ["path"]})
    report = WindowReport(window, len(frame), quarantined, tuple(checks), config)
    log.info("validated window %s: %d images, %d quarantined (%.1f%%, limit %.1f%%), %d of %d expectations passed",
             report.window, report.images, len(quarantined), 100 * report.quarantine_fraction,
             100 * config.max_quarantine_fraction, sum(c.success for c in checks), len(checks))
    if not report.passed:
        log.error("%s", report.failure_message())
    return report


def _window_frame(window_dir: Path) -> pd.DataFrame:
    """samples.jsonl joined with features.csv on the image path: one row per usable sample."""
    import pandas as pd

    lines = (window_dir / SAMPLES_FILE).read_text().splitlines()
    samples = pd.DataFrame([json.loads(line) for line in lines], columns=["image", "score", "label", "model_version",
                                                                        "time"]).rename(columns={"image": "path"})
    features = pd.read_csv(window_dir / FEATURES_FILE, dtype={"path": str})
    frame = samples.merge(features, on="path", how="left")
    # Numeric columns as float64 (empty frames have object columns); a value that is no number becomes null,
    # which the not-null checks name, rather than an exception here.
    for column in ("score", "time", *FEATURE_NAMES):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def _window_checks(frame: pd.DataFrame) -> list[_Check]:
    import great_expectations as gx

    expect = gx.expectations
    n = len(frame)

    def failing(result: dict, column: str) -> str:
        def shown(value: object) -> object:
            return value.item() if hasattr(value, "item") else value  # numpy scalars as plain numbers

        rows = [f"{row['path']} ({column}={shown(row.get(column))!r})"
                for row in result.get("unexpected_index_list") or []]
        return f"{result.get('unexpected_count')} of {n} samples: " + _examples(rows)

    def not_null(column: str) -> _Check:
        return _Check(f"{column}_not_null", "samples", lambda: expect.ExpectColumnValuesToNotBeNull(column=column),
                      lambda r, ok: f"all {n} samples have a {column}" if ok else f"{column} missing in "
                      + failing(r, column))

    def between(name: str, column: str, low: float, high: float | None) -> _Check:
        bounds = f"[{low:g}, {'inf' if high is None else f'{high:g}'}]"
        observed = f" (observed {frame[column].min():.4g}..{frame[column].max():.4g})" if n else ""
        return _Check(name, "samples",
                      lambda: expect.ExpectColumnValuesToBeBetween(column=column, min_value=low, max_value=high),
                      lambda r, ok: f"{column} within {bounds} for all {n} samples{observed}" if ok else
                      f"{column} outside {bounds} in " + failing(r, column))

    labels = ", ".join(f"{label} ({count})" for label, count in sorted(Counter(frame["label"]).items())) or "none"
    return [
        not_null("score"),
        between("score_between", "score", 0.0, 1.0),
        _Check("label_in_set", "samples", lambda: expect.ExpectColumnValuesToBeInSet(column="label",
                                                                                     value_set=list(LABELS)),
               lambda r, ok: f"labels found: {labels}" if ok else f"label outside {', '.join(LABELS)} in "
               + failing(r, "label")),
        not_null("model_version"),
        *(not_null(name) for name in FEATURE_NAMES),
        *(between(f"{name}_in_range", name, *_FEATURE_RANGES[name]) for name in FEATURE_NAMES),
    ]

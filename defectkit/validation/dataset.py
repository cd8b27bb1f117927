"""Dataset validation: decode every file, quarantine the bad ones, check the rest.

``validate_dataset`` turns a raw image tree (local path, ``file://`` or
``gs://``) into a dataset artifact: every image that decodes and has sensible
dimensions is copied byte-for-byte with its mask, a validation split is carved
from train, and ``manifest.json`` is written. Files that fail are kept, with
the reason, in a quarantine directory. A Great Expectations suite then checks
the metadata of the accepted images (completeness, dimensions, pixel modes,
classes, images per class, defects in test to measure on, train/test leakage).
The report says what passed, what failed, and what to do about it.
"""

from __future__ import annotations

import html
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from defectkit import image
from defectkit.cores import usable_cores
from defectkit.data import (
    GOOD,
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
from defectkit.data import source_fingerprint as data_source_fingerprint
from defectkit.storage import Store
from defectkit.validation.expectations import Check, CheckResult, examples, run_checks
from defectkit.validation.report import Quarantined, Report, html_table

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

_LOGGED_QUARANTINE = 20  # quarantined files logged one by one; the report has them all


@dataclass(frozen=True)
class ValidationConfig:
    """How a raw image tree is validated.

    ``min_images_per_class`` is the fewest images a class needs where it is learned from or measured on
    (:func:`required_images` is the rule's one home; val is carved from train and counts as train):

    - ``good`` needs it in train and in test, and at least one image in each even when it is 0;
    - every defect type needs it in test, where its recall and AUROC are measured;
    - in train a defect type may have any count, none included: training fills in with synthetic anomalies
      (the "few defect examples" and "good images only" modes, as in MVTec AD's train/good-only layout).

    A test split without any defect image is refused whatever the minimum: there would be nothing to measure.
    """

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


# What to do when a check fails, by check name (or by suffix for one check per column).
_REMEDIES = {
    "has_images": "Check that the source holds files at train/<class>/<image> and test/<class>/<image>.",
    "width_between": "Resize or remove these images, or change min_side/max_side.",
    "height_between": "Resize or remove these images, or change min_side/max_side.",
    "mode_in_set": "Convert these images to RGB or greyscale.",
    "class_allowed": "Rename the class directories, or add the classes to allowed_classes.",
    "min_images_per_class": "Add images of these classes to that split, or lower min_images_per_class (good needs "
                            "one image in train and one in test whatever it is).",
    "test_has_defect_images": "Add defect images under test/<defect type>/: without them the model's ability to "
                              "find defects cannot be measured.",
    "no_train_test_leakage": "Remove the duplicates from test or from train, so that test scores measure "
                             "generalisation rather than memory.",
    "_not_null": "Missing metadata means the decoder returned incomplete information; report it with these files.",
}


@dataclass(frozen=True)
class ValidationReport(Report, json_format="defectkit.validation/v1", title="Dataset validation", unit="Files",
                       remedies=_REMEDIES):
    manifest: Manifest
    quarantined: tuple[Quarantined, ...]
    checks: tuple[CheckResult, ...]
    total_files: int
    config: ValidationConfig = field(default_factory=ValidationConfig)

    @property
    def total(self) -> int:
        """All files found: images, masks and files that fit nowhere."""
        return self.total_files

    def _failure_heading(self) -> str:
        return f"dataset validation failed for {self.manifest.source or 'the source'}:"

    def _quarantine_problem(self, reasons: str) -> str:
        return (
            f"- {len(self.quarantined)} of {self.total_files} files were quarantined "
            f"(fraction {self.quarantine_fraction:.3f}), above max_quarantine_fraction="
            f"{self.config.max_quarantine_fraction} ({reasons}). Fix or remove the quarantined files "
            f"(listed with reasons in {QUARANTINE_FILE}), or raise max_quarantine_fraction if losing them "
            f"is acceptable."
        )

    def _json_subject(self) -> dict:
        return {
            "source": self.manifest.source,
            "dataset_fingerprint": self.manifest.fingerprint,
            "total_files": self.total_files,
            "images": len(self.manifest.entries),
        }

    def _json_outcome(self) -> dict:
        return {
            "checks_passed": self.checks_passed,
            **super()._json_outcome(),
            "config": self.config.to_json(),
            "counts": self.manifest.counts(),
        }

    def _summary(self) -> list[tuple[str, str]]:
        return [
            ("Source", self.manifest.source or "-"),
            ("Dataset fingerprint", self.manifest.fingerprint),
            ("Files found", str(self.total_files)),
            ("Images accepted", str(len(self.manifest.entries))),
        ]

    def _html_details(self) -> list[str]:
        counts = self.manifest.counts()
        splits = [s for s in SPLITS if s in counts]
        rows = []
        for class_name in self.manifest.classes:
            values = [counts[s].get(class_name, 0) for s in splits]
            rows.append((html.escape(class_name), *map(str, values), str(sum(values))))
        totals = [sum(counts[s].values()) for s in splits]
        rows.append(("<b>total</b>", *map(str, totals), str(sum(totals))))
        return ["<h2>Images per split and class</h2>", html_table(("Class", *splits, "total"), rows, numeric_from=1)]


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
    source_fingerprint: str | None = None,
) -> ValidationReport:
    """Validate the image tree at ``source`` and write the accepted files as a dataset artifact to ``out_dir``.

    Quarantined files are copied to ``quarantine_dir/files/<rel path>`` and listed
    in ``quarantine_dir/quarantine.json``; with no ``quarantine_dir`` they are only
    listed in the report (the source is never modified). Everything is written
    before the verdict: with ``raise_on_failure`` a failing dataset raises
    ValidationFailed (carrying the report) afterwards, otherwise the caller
    checks ``report.passed``.

    ``source_fingerprint`` is what :func:`defectkit.data.source_fingerprint` gave before this run (a
    pipeline's cache keys on it): when the files under ``source`` no longer match it after they were
    read, they changed meanwhile, and the artifact could be cached under the wrong key; that is an error.
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
    pool_size = workers or min(32, 4 * usable_cores())

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
    if source_fingerprint is not None:
        now = data_source_fingerprint(source)
        if now != source_fingerprint:
            raise ValueError(f"the files under {source} changed while they were validated (source fingerprint "
                             f"{source_fingerprint[:12]} before, {now[:12]} after); run again once they are "
                             f"written")
    extra = {} if source_fingerprint is None else {"source_fingerprint": source_fingerprint}
    manifest = Manifest(entries, source=source, extra=extra)
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


def required_images(split: str, class_name: str, config: ValidationConfig) -> int:
    """The fewest images ``class_name`` needs in ``split`` as on disk (val counts as train).

    Good images are what the model learns normal from and what its false alarms are measured on, so
    ``good`` needs ``min_images_per_class`` in train and in test, and one image at least even when that is 0.
    A defect type is measured on test, so it needs the minimum there; in train any count will do, none
    included, because training draws synthetic anomalies on good images for what real ones are missing.
    """
    if class_name == GOOD:
        return max(1, config.min_images_per_class)
    return config.min_images_per_class if split == "test" else 0


def _class_counts_frame(metadata: pd.DataFrame, classes: list[str], config: ValidationConfig) -> pd.DataFrame:
    """Images per (split as on disk, class) for every class found, and good whether found or not, including
    zero rows for absent pairs, with what :func:`required_images` asks of each pair."""
    import pandas as pd

    found = Counter(zip(metadata["split"].map(_source_split), metadata["class"], strict=True))
    rows = [(split, name, name != GOOD, found.get((split, name), 0), required_images(split, name, config))
            for split in SOURCE_SPLITS for name in sorted({*classes, GOOD})]
    frame = pd.DataFrame(rows, columns=["split", "class", "is_defect", "count", "required"])
    return frame.astype({"is_defect": "bool", "count": "int64", "required": "int64"})


def _sides_frame(metadata: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct content per side: a sha256 seen twice here is in both train/val and test."""
    sides = metadata.assign(side=metadata["split"].map(_source_split))[["sha256", "side"]]
    return sides.drop_duplicates().reset_index(drop=True)



def _checks(metadata: pd.DataFrame, counts: pd.DataFrame, config: ValidationConfig) -> list[Check]:
    import great_expectations as gx

    expect = gx.expectations
    n = len(metadata)

    def unexpected_paths(result: dict, column: str) -> list[str]:
        return [f"{row['path']} ({column}={row.get(column)!r})" for row in result.get("unexpected_index_list") or []]

    def not_null(column: str) -> Check:
        return Check(
            f"{column}_not_null", "images",
            lambda: expect.ExpectColumnValuesToNotBeNull(column=column),
            lambda r, ok: f"all {n} rows have a {column}" if ok else
            f"{column} missing in {r.get('unexpected_count')} of {n} rows: "
            + examples([str(row.get("path")) for row in r.get("unexpected_index_list") or []]),
        )

    def side_between(column: str) -> Check:
        observed = f"observed {metadata[column].min()}..{metadata[column].max()} px" if n else "no images"
        return Check(
            f"{column}_between", "images",
            lambda: expect.ExpectColumnValuesToBeBetween(column=column, min_value=config.min_side,
                                                         max_value=config.max_side),
            lambda r, ok: f"{column} within [{config.min_side}, {config.max_side}] px for all {n} images ({observed})"
            if ok else f"{column} outside [{config.min_side}, {config.max_side}] px in "
                       f"{r.get('unexpected_count')} of {n} images: " + examples(unexpected_paths(r, column)),
        )

    modes = ", ".join(f"{mode} ({count})" for mode, count in sorted(Counter(metadata["mode"]).items())) or "none"
    checks = [
        Check(
            "has_images", "images",
            lambda: expect.ExpectTableRowCountToBeBetween(min_value=1),
            lambda r, ok: f"{n} images passed decoding" if ok else "no image passed decoding; there is nothing "
                                                                   "to train or test on",
        ),
        *(not_null(column) for column in METADATA_COLUMNS),
        side_between("width"),
        side_between("height"),
        Check(
            "mode_in_set", "images",
            lambda: expect.ExpectColumnValuesToBeInSet(column="mode", value_set=list(DECODED_MODES)),
            lambda r, ok: f"pixel modes found: {modes}" if ok else
            f"pixel mode not converted by the decoder in {r.get('unexpected_count')} of {n} images: "
            + examples(unexpected_paths(r, "mode")),
        ),
    ]
    if config.allowed_classes:
        allowed = ", ".join(config.allowed_classes)
        found = ", ".join(sorted(set(metadata["class"]))) or "none"
        checks.append(Check(
            "class_allowed", "images",
            lambda: expect.ExpectColumnValuesToBeInSet(column="class", value_set=list(config.allowed_classes)),
            lambda r, ok: f"classes found ({found}) are all in allowed_classes ({allowed})" if ok else
            f"class outside allowed_classes ({allowed}) in {r.get('unexpected_count')} of {n} images: "
            + examples(unexpected_paths(r, "class")),
        ))

    good_minimum = required_images("train", GOOD, config)
    defect_minimum = required_images("test", "defect", config)
    rule = (f"good needs {good_minimum} in train and in test, each defect type {defect_minimum} in test "
            f"and any number in train; val counts as train")
    required = counts[counts["required"] > 0]
    train_defects = counts[(counts["split"] == "train") & counts["is_defect"]]
    test_defects = counts[(counts["split"] == "test") & counts["is_defect"]]

    def describe_train_defects() -> str:
        # Not a requirement: how much training will lean on synthetic anomalies, said where people look.
        total = int(train_defects["count"].sum())
        if total == 0:
            return "train holds 0 defect images: training relies on synthetic anomalies"
        held = ", ".join(f"{row['class']} {row['count']}" for _, row in train_defects.iterrows() if row["count"])
        missing = [str(name) for name in train_defects.loc[train_defects["count"] == 0, "class"]]
        if missing:
            return (f"train holds {total} defect images ({held}); synthetic anomalies stand in for the defect "
                    f"types it lacks ({', '.join(missing)})")
        return f"train holds {total} defect images ({held}); training adds synthetic anomalies to them"

    def describe_counts(r: dict, ok: bool) -> str:
        if ok:
            low = required.loc[required["count"].idxmin()]  # good is always required, so there is one
            return (f"every class has the images it needs ({rule}; fewest where required: "
                    f"{low['split']}/{low['class']} with {low['count']}); {describe_train_defects()}")
        short = [f"{row['split']}/{row['class']} has {row['count']} (needs {row['required']})"
                 for row in r.get("unexpected_index_list") or []]
        return f"too few images in {len(short)} of {len(required)} split/class pairs ({rule}): " + examples(short)

    checks.append(Check(
        "min_images_per_class", "class_counts",
        lambda: expect.ExpectColumnPairValuesAToBeGreaterThanB(column_A="count", column_B="required", or_equal=True),
        describe_counts,
    ))

    def describe_test_defects(r: dict, ok: bool) -> str:
        present = test_defects[test_defects["count"] > 0]
        if ok:
            return (f"test holds {int(present['count'].sum())} defect images of {len(present)} defect types "
                    f"to measure the model on")
        only_in_train = sorted(train_defects.loc[train_defects["count"] > 0, "class"])
        hint = f" (defect types found only in train: {', '.join(only_in_train)})" if only_in_train else ""
        return f"test holds no defect image, so recall and AUROC cannot be measured{hint}"

    # Apart from the per-class minimum, which may be 0: without a single defect in test nothing can be judged.
    checks.append(Check(
        "test_has_defect_images", "class_counts",
        lambda: expect.ExpectColumnSumToBeBetween(column="count", min_value=1, condition_parser="pandas",
                                                  row_condition='split == "test" and is_defect'),
        describe_test_defects,
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
                f"{metadata['sha256'].nunique()} distinct images: " + examples(pairs))

    checks.append(Check(
        "no_train_test_leakage", "sides",
        lambda: expect.ExpectColumnValuesToBeUnique(column="sha256"),
        describe_leakage,
    ))
    return checks


# Rows of each table are named by these columns in GX's unexpected_index_list.
_INDEX_COLUMNS = {"images": ["path"], "class_counts": ["split", "class"], "sides": ["sha256", "side"]}


def _run_expectations(metadata: pd.DataFrame, classes: list[str], config: ValidationConfig) -> list[CheckResult]:
    tables = {
        "images": metadata,
        "class_counts": _class_counts_frame(metadata, classes, config),
        "sides": _sides_frame(metadata),
    }
    return run_checks(tables, lambda: _checks(metadata, tables["class_counts"], config), _INDEX_COLUMNS)


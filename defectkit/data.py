"""Dataset layout, validation split and manifest.

Layout (MVTec AD compatible)::

    <root>/{train,test}/<class>/<image>
    <root>/ground_truth/<class>/<stem>_mask.png     (optional)

Class ``good`` means no defect; any other class name is a defect type. The
manifest lists every image of a dataset artifact with its content hash; the
hash of the manifest entries is the dataset fingerprint used for lineage.
Before any image is read, :func:`source_fingerprint` identifies what a root
holds from its listing alone: the input a pipeline's cache keys on.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from defectkit import storage
from defectkit.files import write_text_atomic

GOOD = "good"
SOURCE_FINGERPRINT_FORMAT = "defectkit.source/v1"
SOURCE_SPLITS = ("train", "test")
SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "defectkit.manifest/v1"
MASK_DIR = "ground_truth"


@dataclass(frozen=True)
class ImageFile:
    """An image found in the layout, before it has been decoded."""

    path: str  # relative POSIX path under the dataset root
    split: str  # "train" or "test" as found on disk; "val" once carved
    class_name: str
    mask: str | None = None

    @property
    def is_defect(self) -> bool:
        return self.class_name != GOOD


@dataclass(frozen=True)
class Layout:
    images: tuple[ImageFile, ...]
    masks: tuple[str, ...]
    unexpected: tuple[str, ...]  # files that fit nowhere in the layout


def parse_layout(paths: list[str]) -> Layout:
    """Sort relative file paths into images, masks and files that fit nowhere.

    A mask ``ground_truth/<class>/<stem>_mask.<ext>`` belongs to the image of that
    class and stem; when train and test both hold that stem, it belongs to the test
    image, as in MVTec AD where only test images have masks.
    """
    mask_paths: dict[tuple[str, str], str] = {}
    candidates = []
    unexpected = []
    for rel in sorted(paths):
        parts = PurePosixPath(rel).parts
        if any(part.startswith(".") for part in parts):
            continue  # hidden files (.DS_Store, .gitkeep) are not data
        if len(parts) == 3 and parts[0] in SOURCE_SPLITS:
            candidates.append(ImageFile(rel, parts[0], parts[1]))
            continue
        stem = PurePosixPath(rel).stem
        key = (parts[1], stem.removesuffix("_mask")) if len(parts) == 3 else None
        if parts[0] == MASK_DIR and key and stem.endswith("_mask") and key not in mask_paths:
            mask_paths[key] = rel
        else:
            unexpected.append(rel)
    owners: dict[tuple[str, str], ImageFile] = {}
    for image in candidates:
        key = (image.class_name, PurePosixPath(image.path).stem)
        if key in mask_paths and (key not in owners or image.split == "test"):
            owners[key] = image
    masked = {image.path: mask_paths[key] for key, image in owners.items()}
    images = tuple(ImageFile(f.path, f.split, f.class_name, masked.get(f.path)) for f in candidates)
    unexpected += [rel for key, rel in mask_paths.items() if key not in owners]
    return Layout(images, tuple(sorted(masked.values())), tuple(sorted(unexpected)))


def assign_validation(images: list[ImageFile], fraction: float, seed: int) -> list[ImageFile]:
    """Move a seeded, per-class stratified ``fraction`` of train images to split ``val``.

    Deterministic: the same files, fraction and seed always give the same split,
    whatever order the files were listed in. A class with two or more train images
    keeps at least one in each of train and val; a class with a single one keeps it
    in train, whatever the fraction (with few or no real defects, each one matters
    more to training than to the threshold).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction!r}")
    by_class: dict[str, list[ImageFile]] = {}
    for image in images:
        if image.split == "train":
            by_class.setdefault(image.class_name, []).append(image)
    to_val: set[str] = set()
    for class_name, members in sorted(by_class.items()):
        members = sorted(members, key=lambda f: f.path)
        random.Random(f"{seed}:{class_name}").shuffle(members)
        count = int(len(members) * fraction + 0.5)
        if len(members) < 2:
            count = 0  # a lone image stays in train: rounding a fraction >= 0.5 up would take the class's only one
        elif fraction > 0:
            count = min(max(count, 1), len(members) - 1)  # keep both splits non-empty
        to_val.update(f.path for f in members[:count])
    return [ImageFile(f.path, "val", f.class_name, f.mask) if f.path in to_val else f for f in images]


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    split: str
    class_name: str
    sha256: str
    size: int
    width: int
    height: int
    mode: str
    mask: str | None = None

    @property
    def is_defect(self) -> bool:
        return self.class_name != GOOD

    def to_json(self) -> dict:
        record = asdict(self)
        record["class"] = record.pop("class_name")
        return record

    @classmethod
    def from_json(cls, record: dict) -> ManifestEntry:
        record = dict(record)
        record["class_name"] = record.pop("class")
        return cls(**record)


@dataclass(frozen=True)
class Manifest:
    entries: tuple[ManifestEntry, ...]
    source: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def fingerprint(self) -> str:
        """sha256 over every field of every entry, content hashes included."""
        entries = [e.to_json() for e in sorted(self.entries, key=lambda e: e.path)]
        return hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @property
    def classes(self) -> list[str]:
        return sorted({e.class_name for e in self.entries})

    @property
    def defect_types(self) -> list[str]:
        return [c for c in self.classes if c != GOOD]

    def split(self, name: str) -> list[ManifestEntry]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return [e for e in self.entries if e.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class."""
        table: dict[str, dict[str, int]] = {}
        for e in self.entries:
            table.setdefault(e.split, {}).setdefault(e.class_name, 0)
            table[e.split][e.class_name] += 1
        return table

    def to_json(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "classes": self.classes,
            "counts": self.counts(),
            **self.extra,
            "entries": [e.to_json() for e in sorted(self.entries, key=lambda e: e.path)],
        }

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / MANIFEST_FILE
        write_text_atomic(path, json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not a defectkit dataset artifact")
        record = json.loads(path.read_text())
        if record.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{path}: format {record.get('format')!r} is not {MANIFEST_FORMAT!r}")
        manifest = cls(tuple(ManifestEntry.from_json(e) for e in record["entries"]), record.get("source", ""))
        if record.get("fingerprint") != manifest.fingerprint:
            raise ValueError(f"{path}: fingerprint does not match its entries; the manifest was edited or is corrupt")
        return manifest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_fingerprint(root: str) -> str:
    """A hash of every file under ``root`` (its path and content token): equal while nothing under the root
    changed, different once any file was added, removed or rewritten with other content.

    A cache keyed on the dataset's URI alone would serve stale results once the images at that URI
    change; keyed on this, unchanged data reuses every step and changed data recomputes them.
    """
    versions = storage.Store(root).versions()
    if not versions:
        raise ValueError(f"dataset root {root} holds no files; give the folder with train/ and test/")
    digest = hashlib.sha256(SOURCE_FINGERPRINT_FORMAT.encode())
    for rel, token in versions.items():
        digest.update(f"\n{rel}\t{token}".encode())
    return digest.hexdigest()

"""One model per product line: the categories of a dataset root, each trained, judged, registered and served on
its own.

A factory inspects many products (MVTec AD has 15 categories), and a model per product beats one model for all
of them. The root holds one dataset per category, each in the training layout::

    <root>/<category>/{train,test}/<class>/<image>

Each category gets its own registered model ``<registered_model>-<slug>``, its own InferenceService
``<service>-<slug>`` and its own serving work directory, where ``slug`` is the category's name as a DNS label
(``metal_nut`` -> ``metal-nut``).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from defectkit.delivery.kserve.names import validate_name
from defectkit.storage import Store

SPLITS = ("train", "test")
_NOT_IN_LABEL = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class ProductLine:
    """Where one category's data is and where its model goes."""

    category: str  # the folder's name under the root
    source_uri: str
    registered_model: str
    service: str
    work_dir: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def slug(category: str) -> str:
    """``category`` as a DNS label part: lower case, runs of anything but letters and digits as one '-'."""
    label = _NOT_IN_LABEL.sub("-", category.lower()).strip("-")
    if not label:
        raise ValueError(f"category {category!r} has no letter or digit to name its model and service by")
    return label


def discover(source_root: str) -> list[str]:
    """The categories under ``source_root``: its folders that hold both a train and a test split."""
    splits: dict[str, set[str]] = {}
    for rel in Store(source_root).list():
        parts = rel.split("/")
        if len(parts) >= 4 and parts[1] in SPLITS:  # category/split/class/image
            splits.setdefault(parts[0], set()).add(parts[1])
    return sorted(category for category, found in splits.items() if found == set(SPLITS))


def plan(source_root: str, categories: Sequence[str], *, registered_model: str, service: str,
         work_dir: str) -> list[ProductLine]:
    """The product lines to train: ``categories`` (each checked to exist), or every category under the root.

    Raises ValueError naming what is wrong: no categories, a category that is not there, two categories that
    name the same model, or a service name KServe would refuse.
    """
    root = source_root.rstrip("/")
    found = discover(root)
    if not found:
        raise ValueError(f"no product lines under {source_root!r}: expected <root>/<category>/{{train,test}}/"
                         f"<class>/<image>")
    chosen = list(categories) or found
    if missing := [c for c in chosen if c not in found]:
        raise ValueError(f"categories {missing} are not under {source_root!r} with both train and test; "
                         f"it holds: {', '.join(found)}")
    lines, named = [], {}
    for category in chosen:
        label = slug(category)
        if label in named:
            raise ValueError(f"categories {named[label]!r} and {category!r} would share the model and service "
                             f"name {label!r}: rename one folder, or choose one of them")
        named[label] = category
        lines.append(ProductLine(
            category=category,
            source_uri=f"{root}/{category}",
            registered_model=f"{registered_model}-{label}",
            service=validate_name(f"{service}-{label}", f"InferenceService name of product line {category!r}"),
            work_dir=f"{work_dir.rstrip('/')}/{label}",
        ))
    return lines


@dataclass(frozen=True)
class Outcome:
    """What one product line's training run ended with."""

    category: str
    registered_model: str
    service: str
    approved: bool
    image_auroc: float
    images: int
    quarantined: int
    reasons: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = ("product line", "verdict", "image AUROC", "images", "quarantined", "registered model", "service",
            "reasons")


def _rows(outcomes: Iterable[Outcome]) -> list[tuple[str, ...]]:
    return [(o.category, "approved" if o.approved else "not approved", f"{o.image_auroc:.3f}", str(o.images),
             str(o.quarantined), o.registered_model, o.service, o.reasons)
            for o in sorted(outcomes, key=lambda o: o.category)]


def summary_metrics(outcomes: Sequence[Outcome]) -> dict[str, float]:
    """The figures the Kubeflow UI shows beside the table: each line's image AUROC, how many lines were approved."""
    return {**{f"image_auroc/{o.category}": o.image_auroc for o in outcomes},
            "approved_lines": sum(o.approved for o in outcomes), "lines": len(outcomes)}


def _headline(outcomes: Sequence[Outcome]) -> str:
    figures = summary_metrics(outcomes)
    return f"{figures['approved_lines']} of {figures['lines']} product lines approved"


def summary_markdown(outcomes: Sequence[Outcome]) -> str:
    """One table row per product line, by category name."""
    lines = [f"# Product lines: {_headline(outcomes)}", "", "| " + " | ".join(_COLUMNS) + " |",
             "|" + "---|" * len(_COLUMNS)]
    for row in _rows(outcomes):
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def summary_html(outcomes: Sequence[Outcome]) -> str:
    """The same table as a page (the Kubeflow UI shows HTML artifacts)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in _COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                   for row in _rows(outcomes))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Product lines</title><style>"
            f"body{{font-family:sans-serif}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;"
            f"padding:4px 8px;text-align:left}}</style></head><body><h1>{html.escape(_headline(outcomes))}</h1>"
            f"<table><tr>{head}</tr>{body}</table></body></html>")

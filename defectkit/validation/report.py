"""What a validation report says, shared by dataset and window validation, and its HTML page.

Both validators end the same way: some files were quarantined, some
expectations ran, and the verdict is "quarantined share within the limit and
every expectation passed". :class:`Report` holds that verdict once, with the
failure message (numbers and what to do), the JSON record and the
self-contained HTML page; each report adds only what it validated and how it
words it.
"""

from __future__ import annotations

import html
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import asdict, dataclass
from typing import ClassVar, Protocol

from defectkit.validation.expectations import CheckResult


class QuarantineLimit(Protocol):
    @property
    def max_quarantine_fraction(self) -> float: ...


@dataclass(frozen=True)
class Quarantined:
    path: str
    reason: str
    detail: str


def _remedy(check_name: str, remedies: dict[str, str]) -> str:
    """What to do about a failed check: by its name, or by a ``_suffix`` entry that covers one check per column."""
    return remedies.get(check_name) or next(
        (text for suffix, text in remedies.items() if suffix.startswith("_") and check_name.endswith(suffix)), "")


class Report(ABC):
    """The verdict of one validation run and its renderings; subclasses are frozen dataclasses with these fields.

    A subclass names its JSON format, page title, what it quarantines and its remedies in its class statement.
    """

    FORMAT: ClassVar[str]  # names the JSON record's layout
    TITLE: ClassVar[str]  # heads the HTML page
    UNIT: ClassVar[str]  # what is quarantined, as the page's summary calls it
    REMEDIES: ClassVar[dict[str, str]]  # what to do when a check fails, by check name or by "_suffix"

    quarantined: tuple[Quarantined, ...]
    checks: tuple[CheckResult, ...]
    config: QuarantineLimit

    def __init_subclass__(cls, *, json_format: str, title: str, unit: str, remedies: dict[str, str]) -> None:
        # In the class statement, so that a report lacking one fails where it is defined rather than where it is used.
        super().__init_subclass__()
        cls.FORMAT, cls.TITLE, cls.UNIT, cls.REMEDIES = json_format, title, unit, remedies

    @property
    @abstractmethod
    def total(self) -> int:
        """What the quarantined share is taken of."""

    @abstractmethod
    def _failure_heading(self) -> str:
        """The first line of the failure message: what failed validation."""

    @abstractmethod
    def _quarantine_problem(self, reasons: str) -> str:
        """The failure line for a quarantined share above the limit; ``reasons`` counts them by reason."""

    @abstractmethod
    def _json_subject(self) -> dict:
        """What was validated, as the JSON record names it after its verdict."""

    @abstractmethod
    def _summary(self) -> list[tuple[str, str]]:
        """What was validated, as the first rows of the page's summary."""

    @property
    def quarantine_fraction(self) -> float:
        """Quarantined over :attr:`total`."""
        return len(self.quarantined) / self.total if self.total else 0.0

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
        """What failed, with the numbers and what to do; empty when validation passed."""
        if self.passed:
            return ""
        lines = [self._failure_heading()]
        if not self.quarantine_within_limit:
            reasons = ", ".join(f"{reason} {n}" for reason, n in self.reason_counts().items())
            lines.append(self._quarantine_problem(reasons))
        for check in self.checks:
            if not check.success:
                lines.append(f"- expectation {check.name} failed: {check.detail}. "
                             f"{_remedy(check.name, self.REMEDIES)}".rstrip())
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "format": self.FORMAT,
            "passed": self.passed,
            **self._json_subject(),
            "quarantine_fraction": self.quarantine_fraction,
            "max_quarantine_fraction": self.config.max_quarantine_fraction,
            **self._json_outcome(),
            "quarantine_reasons": self.reason_counts(),
            "checks": [asdict(check) for check in self.checks],
            "quarantined": [asdict(q) for q in self.quarantined],
        }

    def _json_outcome(self) -> dict:
        """The record's fields between the quarantine limit and the lists; a subclass may add its own around these."""
        return {"failure_message": self.failure_message()}

    def to_html(self) -> str:
        """A self-contained page: summary, expectations, the subclass's details, quarantine."""
        verdict = "PASSED" if self.passed else "FAILED"
        summary = [
            *self._summary(),
            (f"{self.UNIT} quarantined", f"{len(self.quarantined)} ({self.quarantine_fraction:.1%}; "
                                         f"limit {self.config.max_quarantine_fraction:.1%})"),
            ("Expectations passed", f"{sum(c.success for c in self.checks)} of {len(self.checks)}"),
        ]
        parts = [f'<h1>{html.escape(self.TITLE)}: <span class="{"pass" if self.passed else "fail"}">'
                 f"{html.escape(verdict)}</span></h1>",
                 *_summary_html(summary, self.failure_message()), *_checks_html(self.checks),
                 *self._html_details(), *_quarantine_html(self.quarantined, self.reason_counts())]
        return _page(f"{self.TITLE}: {verdict}", parts)

    def _html_details(self) -> list[str]:
        """Sections of the page between the expectations and the quarantine (already escaped)."""
        return []


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
    parts = ["<h2>Summary</h2>", html_table(("", ""), [(e(k), e(v)) for k, v in summary], header=False)]
    if failure_message:
        parts += ["<h2>What failed</h2>", f"<pre>{e(failure_message)}</pre>"]
    return parts


def _checks_html(checks: tuple[CheckResult, ...]) -> list[str]:
    e = html.escape
    return ["<h2>Expectations</h2>", html_table(("Expectation", "Result", "Detail"), [
        (e(c.name), f'<span class="{"pass" if c.success else "fail"}">{"pass" if c.success else "FAIL"}</span>',
         e(c.detail)) for c in checks])]


def _quarantine_html(quarantined: tuple[Quarantined, ...], reasons: dict[str, int]) -> list[str]:
    e = html.escape
    parts = [f"<h2>Quarantine ({len(quarantined)} files)</h2>"]
    if not quarantined:
        return [*parts, "<p>No file was quarantined.</p>"]
    return [*parts,
            html_table(("Reason", "Files"), [(e(r), str(n)) for r, n in reasons.items()], numeric_last=True),
            html_table(("File", "Reason", "Detail"), [(e(q.path), e(q.reason), e(q.detail)) for q in quarantined])]


def html_table(headers: tuple[str, ...], rows: list[tuple[str, ...]], *, header: bool = True,
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

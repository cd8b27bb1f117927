"""The decision record of a delivery: what was shipped, every analysis with its figures, the timeline, the verdict.

Built from the rollout state, so it can be rebuilt at any time from the state
file alone, and written through :mod:`defectkit.decision_record` (file names,
atomic writes) like every decision record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from defectkit import decision_record
from defectkit.decision_record import JSON_NAME as JSON_NAME, MARKDOWN_NAME as MARKDOWN_NAME, iso
from defectkit.delivery.state import FAILED, PROMOTED, ROLLED_BACK, RolloutState

FORMAT = "defectkit.decision-record/v1"
IN_PROGRESS = "in_progress"


def build_record(state: RolloutState) -> dict[str, Any]:
    verdict = state.phase if state.terminal else IN_PROGRESS
    finished = state.updated_at if state.terminal else None
    return {
        "format": FORMAT,
        "verdict": verdict,
        "reason": state.reason,
        "error": state.error,
        "candidate": {"model": state.candidate, "version": state.candidate_version},
        "stable": {"model": state.stable},
        "backend": state.backend,
        "policy": state.policy,
        "started_at": iso(state.started_at),
        "finished_at": iso(finished) if finished else None,
        "duration_s": round(finished - state.started_at, 3) if finished else None,
        "phase": state.phase,
        "final_weight": state.weight,
        "failed_checks": state.failed_checks,
        "probe": state.probe,
        "analyses": state.analyses,
        "timeline": state.timeline,
    }


def _figure(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def render_markdown(record: dict[str, Any]) -> str:
    verdict = record["verdict"]
    title = {PROMOTED: "PROMOTED", ROLLED_BACK: "ROLLED BACK", FAILED: "FAILED"}.get(verdict, "IN PROGRESS")
    candidate = record["candidate"]
    version = f" (registry version {candidate['version']})" if candidate.get("version") else ""
    lines = [f"# Canary delivery: {title}", "",
             f"- Candidate: `{candidate['model']}`{version}",
             f"- Stable: `{record['stable']['model'] or 'none (first deployment)'}`",
             f"- Backend: {record['backend']}",
             f"- Started: {record['started_at']}" + (f", finished {record['finished_at']} "
                                                    f"({record['duration_s']:.1f} s)" if record["finished_at"] else ""),
             f"- Candidate traffic at the end: {record['final_weight']}%",
             "", "## Why", "", record.get("reason") or "(no verdict yet)"]
    if record.get("error"):
        lines += ["", f"Error: `{record['error']}`"]
    probe = record.get("probe")
    lines += ["", "## Golden probe", ""]
    if not probe:
        lines.append("Not reached.")
    elif "skipped" in probe:
        lines.append(f"Skipped: {probe['skipped']}.")
    else:
        lines.append(f"{probe['images']} golden images; largest difference from the offline scores "
                     f"{probe['max_abs_diff']:.3g} (tolerance {probe['tolerance']:g}).")
    policy = record["policy"]
    lines += ["", "## Policy", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {_figure(value)} |" for key, value in policy.items()]
    lines += ["", f"## Analyses ({len(record['analyses'])})", ""]
    if record["analyses"]:
        lines += ["| # | time | canary % | verdict | canary req / 5xx | stable req | checks |",
                  "|---|---|---|---|---|---|---|"]
        for number, analysis in enumerate(record["analyses"], 1):
            canary, stable = analysis["canary"], analysis["stable"]
            checks = "; ".join(
                f"{'ok' if c['passed'] else '**FAIL**'} {c['name']} {_figure(c['value'])} (limit {_figure(c['limit'])})"
                for c in analysis["checks"]) or analysis.get("skipped_reason") or ""
            lines.append(f"| {number} | {analysis['at']} | {analysis['weight']} | {analysis['verdict']} | "
                         f"{_figure(canary['requests'])} / {_figure(canary['errors'])} | "
                         f"{_figure(stable['requests'])} | {checks} |")
        lines += ["", "Details:", ""]
        for number, analysis in enumerate(record["analyses"], 1):
            lines.append(f"{number}. at {analysis['weight']}%: {analysis['explanation']}")
    else:
        lines.append("No analysis was made.")
    lines += ["", "## Timeline", "", "| time | phase | candidate % | event |", "|---|---|---|---|"]
    for entry in record["timeline"]:
        details = {k: v for k, v in entry.items() if k not in ("t", "at", "phase", "weight", "event")}
        extra = f" ({', '.join(f'{k}={_figure(v)}' for k, v in details.items())})" if details else ""
        lines.append(f"| {entry['at']} | {entry['phase']} | {entry['weight']} | {entry['event']}{extra} |")
    return "\n".join(lines) + "\n"


def write_record(state: RolloutState, out_dir: Path) -> tuple[dict[str, Any], str]:
    """Write the record of ``state`` as JSON and Markdown into ``out_dir``; returns (record, markdown)."""
    record = build_record(state)
    markdown = render_markdown(record)
    decision_record.write(record, markdown, out_dir)
    return record, markdown


def read_record(out_dir: Path) -> dict[str, Any]:
    return decision_record.read(out_dir)

"""The decision record of a delivery: what was shipped, every analysis with its figures, the timeline, the verdict.

Built from the rollout state, so it can be rebuilt at any time from the state
file alone, and written through :mod:`defectkit.decision_record` (file names,
atomic writes) like every decision record.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from defectkit import decision_record
from defectkit.decision_record import JSON_NAME as JSON_NAME, MARKDOWN_NAME as MARKDOWN_NAME, iso
from defectkit.delivery.state import FAILED, PROMOTED, ROLLED_BACK, RolloutState
from defectkit.significance import PairedComparison

log = logging.getLogger(__name__)

FORMAT = "defectkit.decision-record/v1"
IN_PROGRESS = "in_progress"
# What the record keeps of the judged model's test figures (evaluation writes them into its model.json).
EVIDENCE_KEYS = ("image_auroc", "f1", "recall", "fpr", "n_test", "auroc_comparison", "f1_comparison")


def evidence_of(model_dir: Path | str | None) -> dict[str, Any] | None:
    """The offline evaluation a judged model directory carries (its test figures and the paired tests against the
    champion it was judged with); None, logged, where the directory holds no judged model."""
    if not model_dir:
        return None
    path = Path(model_dir) / "model.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.info("no offline evidence for the decision record: %s unreadable (%s)", path, exc)
        return None
    test = record.get("metrics", {}).get("test")
    if not test:
        log.info("no offline evidence for the decision record: %s records no test figures (not judged)", path)
        return None
    return {**{key: test[key] for key in EVIDENCE_KEYS if key in test},
            "threshold": record.get("threshold"), "weights_sha256": record.get("weights_sha256")}


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
        "evidence": state.evidence,
        "shadow": state.shadow,
        "approval": state.approval,
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
    lines += ["", "## Offline evidence", ""] + _evidence_lines(record.get("evidence"))
    lines += ["", "## Shadow replay", ""] + _shadow_lines(record.get("shadow"))
    if record.get("approval"):
        lines += ["", "## Approval", ""] + _approval_lines(record["approval"])
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


def _evidence_lines(evidence: dict[str, Any] | None) -> list[str]:
    if not evidence:
        return ["None recorded (the candidate was not given as a judged model directory)."]
    lines = [f"Test set of {evidence.get('n_test', '?')} images: image AUROC {_figure(evidence.get('image_auroc'))}, "
             f"F1 {_figure(evidence.get('f1'))}, recall {_figure(evidence.get('recall'))}, "
             f"FPR {_figure(evidence.get('fpr'))}."]
    tests = [PairedComparison(**evidence[key]) for key in ("auroc_comparison", "f1_comparison") if key in evidence]
    if tests:
        lines += ["", "Against the champion on the same images (champion minus candidate):", ""]
        lines += [f"- {test.explain()}" for test in tests]
    else:
        lines += ["", "No champion was compared (first model)."]
    return lines


def _shadow_lines(verdict: dict[str, Any] | None) -> list[str]:
    if not verdict:
        return ["Not made (no sample store given, or not reached)."]
    lines = [f"**{verdict['verdict'].upper()}**: {verdict['reason']}."]
    if "counts" in verdict:
        counts = verdict["counts"]
        lines += ["", "| champion \\ candidate | good | defect |", "|---|---|---|",
                  f"| good | {counts['champion_good_candidate_good']} | {counts['champion_good_candidate_defect']} |",
                  f"| defect | {counts['champion_defect_candidate_good']} | "
                  f"{counts['champion_defect_candidate_defect']} |",
                  "", f"Mean absolute score difference {_figure(verdict['mean_abs_score_difference'])}; KS p-value "
                      f"{_figure(verdict['score_shift_p_value'])}; champion versions "
                      f"{', '.join(verdict['champion_versions'])}."]
    if verdict.get("kept"):
        lines += ["", "| image | champion | candidate |", "|---|---|---|"]
        lines += [f"| [{Path(item['image']).name}]({item.get('file', item['image'])}) | "
                  f"{item['champion_label']} {item['champion_score']:.3f} | "
                  f"{item['candidate_label']} {item['candidate_score']:.3f} |" for item in verdict["kept"]]
    return lines


def _approval_lines(approval: dict[str, Any]) -> list[str]:
    gate = approval["gate"]
    asked = f"asked {gate['url']} {approval['asked']} times, last answer {approval.get('last_answer', 'none')}"
    if approval.get("approved_at"):
        outcome = f"**approved** at {iso(approval['approved_at'])}"
    elif approval.get("timed_out_at"):
        outcome = f"**not approved** within {gate['timeout_s']:g} s: rolled back"
    else:
        outcome = "waiting"
    return [f"Before the {approval['stage']}: {outcome}; {asked} (first at {iso(approval['requested_at'])})."]


def write_record(state: RolloutState, out_dir: Path) -> tuple[dict[str, Any], str]:
    """Write the record of ``state`` as JSON and Markdown into ``out_dir``; returns (record, markdown)."""
    record = build_record(state)
    markdown = render_markdown(record)
    decision_record.write(record, markdown, out_dir)
    return record, markdown


def read_record(out_dir: Path) -> dict[str, Any]:
    return decision_record.read(out_dir)

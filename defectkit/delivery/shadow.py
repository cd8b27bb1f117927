"""Shadow replay: a recent window of sampled production requests, replayed to the candidate before any live traffic.

The model server samples the images it answers with the answer it gave
(:mod:`defectkit.sampling`). Before the canary's first step the delivery sends
those images to the candidate (at 0% traffic, through the backend's probe) and
compares, image by image: whether both flag the same parts, each at its own
threshold; how far the candidate's scores moved (the two-sample
Kolmogorov-Smirnov statistic, as the canary's score-shift check reads it); and
which images they disagree on, kept for a person to look at. The gate has its
own thresholds (:class:`ShadowPolicy`); a window with too few images is no
evidence either way and lets the canary start, saying so.

Runs where the delivery runs (no torch needed): the candidate scores the images.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from defectkit import sampling
from defectkit.delivery.analysis import ks_test
from defectkit.sampling import LABELS

log = logging.getLogger(__name__)

GOOD_LABEL, DEFECT_LABEL = LABELS
DIR = "shadow"  # in the decision record's directory: the images the models disagree on
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass(frozen=True)
class ShadowPolicy:
    """When a shadow replay lets the canary start.

    ``window_s``: how far back the replayed samples reach; ``max_images`` the most replayed
    (the newest); ``min_images`` fewer than which the replay is skipped; ``min_agreement``
    the lowest share of images both models label alike; ``max_score_shift`` the highest KS
    statistic between the champion's and the candidate's scores; ``keep`` how many
    disagreements (the largest score differences first) are kept as images.
    """

    window_s: float = 86400.0
    max_images: int = 500
    min_images: int = 30
    min_agreement: float = 0.9
    max_score_shift: float = 0.3
    keep: int = 24

    def __post_init__(self) -> None:
        if not (isinstance(self.window_s, (int, float)) and math.isfinite(self.window_s) and self.window_s > 0):
            raise ValueError(f"shadow window_s={self.window_s!r} must be a positive number of seconds")
        for name in ("max_images", "min_images", "keep"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"shadow {name}={value!r} must be a whole number >= 0")
        if self.max_images < max(1, self.min_images):
            raise ValueError(f"shadow max_images={self.max_images} must be at least min_images={self.min_images} "
                             "(and at least 1)")
        for name in ("min_agreement", "max_score_shift"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"shadow {name}={value!r} must be a number in [0, 1]")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ShadowSet:
    """Sampled production images with the answers the serving models gave them."""

    names: tuple[str, ...]
    images: tuple[bytes, ...]
    scores: tuple[float, ...]
    labels: tuple[str, ...]
    versions: tuple[str, ...]
    since: float
    until: float


@dataclass(frozen=True)
class ShadowReplay:
    """What a delivery replays: the samples, the gate, the candidate's threshold (None: unknown, so the replay is
    skipped) and where the disagreements are kept (None: nowhere)."""

    samples: ShadowSet
    policy: ShadowPolicy
    threshold: float | None
    out_dir: Path | None = None


def read_shadow_set(sample_uri: str, until: float, policy: ShadowPolicy,
                    exclude_versions: set[str] | frozenset[str] = frozenset()) -> ShadowSet:
    """The newest ``policy.max_images`` samples of ``[until - window_s, until)`` under ``sample_uri``, without
    those the candidate itself answered (``exclude_versions``, from an earlier canary of it)."""
    since = until - policy.window_s
    pairs = [(s, data) for s, data in sampling.read_window_images(sample_uri, since, until)
             if s.model_version not in exclude_versions and s.label in LABELS]
    pairs = pairs[-policy.max_images:]
    return ShadowSet(names=tuple(f"{s.shard}/{s.image}" for s, _ in pairs), images=tuple(d for _, d in pairs),
                     scores=tuple(s.score for s, _ in pairs), labels=tuple(s.label for s, _ in pairs),
                     versions=tuple(s.model_version for s, _ in pairs), since=since, until=until)


def too_few(shadow: ShadowSet, policy: ShadowPolicy) -> str | None:
    """Why the window is too small to judge, or None."""
    n = len(shadow.images)
    if n < max(1, policy.min_images):
        return f"{n} sampled images in the window, fewer than min_images={max(1, policy.min_images)}"
    return None


def skipped(shadow: ShadowSet, policy: ShadowPolicy, why: str) -> dict[str, Any]:
    """The verdict of a replay that was not made: it lets the canary start, saying why."""
    return {"images": len(shadow.images), "since": shadow.since, "until": shadow.until, "policy": policy.to_json(),
            "verdict": SKIPPED, "passed": True, "reason": f"{why}: no evidence either way, the canary starts"}


def judge(shadow: ShadowSet, candidate_scores: tuple[float, ...] | list[float], candidate_threshold: float,
          policy: ShadowPolicy) -> dict[str, Any]:
    """The verdict of a replay: agreement, score shift, the disagreements (largest score difference first)."""
    if len(candidate_scores) != len(shadow.images):
        raise ValueError(f"the candidate answered {len(candidate_scores)} scores for {len(shadow.images)} images")
    n = len(shadow.images)
    if why := too_few(shadow, policy):
        return skipped(shadow, policy, why)
    verdict: dict[str, Any] = {"images": n, "since": shadow.since, "until": shadow.until,
                               "champion_versions": sorted(set(shadow.versions)),
                               "candidate_threshold": candidate_threshold, "policy": policy.to_json()}
    candidate_labels = [DEFECT_LABEL if s >= candidate_threshold else GOOD_LABEL for s in candidate_scores]
    pairs = list(zip(shadow.labels, candidate_labels))
    counts = {f"champion_{a}_candidate_{b}": sum(1 for p in pairs if p == (a, b)) for a in LABELS for b in LABELS}
    agreement = sum(1 for a, b in pairs if a == b) / n
    shift, p_value = ks_test(tuple(shadow.scores), tuple(candidate_scores))
    differences = [abs(a - b) for a, b in zip(shadow.scores, candidate_scores)]
    disagreeing = sorted((i for i, (a, b) in enumerate(pairs) if a != b), key=lambda i: -differences[i])
    disagreements = [{"image": shadow.names[i], "champion_score": shadow.scores[i], "champion_label": shadow.labels[i],
                      "candidate_score": float(candidate_scores[i]), "candidate_label": candidate_labels[i],
                      "champion_version": shadow.versions[i]} for i in disagreeing]
    checks = {"agreement": agreement >= policy.min_agreement, "score_shift": shift <= policy.max_score_shift}
    passed = all(checks.values())
    reason = (f"on {n} sampled production images the candidate labels {agreement:.1%} as the champion did "
              f"({'>=' if checks['agreement'] else '<'} {policy.min_agreement:.0%}); score shift KS D {shift:.3f} "
              f"({'<=' if checks['score_shift'] else '>'} {policy.max_score_shift:g}); {len(disagreements)} "
              f"disagreements")
    verdict.update(verdict=PASSED if passed else FAILED, passed=passed, reason=reason, agreement=agreement,
                   counts=counts, score_shift=shift, score_shift_p_value=p_value,
                   mean_abs_score_difference=sum(differences) / n, disagreements=len(disagreements),
                   kept=disagreements[:policy.keep])
    return verdict


def keep_disagreements(shadow: ShadowSet, verdict: dict[str, Any], out_dir: Path) -> None:
    """Write the kept disagreements' images, and their list, under ``out_dir/shadow/`` for a person to look at."""
    kept = verdict.get("kept") or []
    if not kept:
        return
    target = Path(out_dir) / DIR
    target.mkdir(parents=True, exist_ok=True)
    index = {name: i for i, name in enumerate(shadow.names)}
    for number, item in enumerate(kept):
        file = f"{number:03d}-{Path(item['image']).name}"
        (target / file).write_bytes(shadow.images[index[item["image"]]])
        item["file"] = f"{DIR}/{file}"
    (target / "disagreements.json").write_text(json.dumps(kept, indent=1))
    log.info("kept %d images the champion and the candidate disagree on in %s", len(kept), target)

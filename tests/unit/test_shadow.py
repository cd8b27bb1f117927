"""Shadow replay: sampled production requests read back from real shards, judged against the champion's answers,
and the gate the controller applies before any traffic."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from scipy.stats import ks_2samp

from defectkit import sampling, storage
from defectkit.delivery import record
from defectkit.delivery.backend import ProbeAnswer
from defectkit.delivery.controller import Controller
from defectkit.delivery.shadow import FAILED, PASSED, SKIPPED, ShadowPolicy, ShadowReplay, ShadowSet, judge, \
    read_shadow_set
from defectkit.delivery.state import PROMOTED, ROLLED_BACK
from tests.stand_ins import ManualClock
from tests.unit.test_delivery_state import GOLDEN, POLICY, StandInBackend

NOW = 1_800_000_000.0


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _shadow_set(champion_scores, threshold=0.5) -> ShadowSet:
    n = len(champion_scores)
    return ShadowSet(names=tuple(f"s/{i}.png" for i in range(n)), images=tuple(_png(i) for i in range(n)),
                     scores=tuple(champion_scores),
                     labels=tuple("defect" if s >= threshold else "good" for s in champion_scores),
                     versions=("3",) * n, since=NOW - 3600, until=NOW)


def test_the_window_is_read_from_the_shards_newest_first_kept_without_the_candidates_own_answers(tmp_path):
    store = storage.Store(str(tmp_path / "samples"))
    batch = [(_png(i), i / 100, "defect" if i % 3 == 0 else "good", "cand" if i % 5 == 0 else "3", NOW - 100 + i)
             for i in range(40)]
    batch.append((_png(99), 0.5, "good", "3", NOW - 90_000))  # older than the window
    sampling.write_shards(store, batch)
    shadow = read_shadow_set(str(tmp_path / "samples"), NOW, ShadowPolicy(window_s=3600, max_images=20, min_images=10),
                             exclude_versions={"cand"})
    kept = [i for i in range(40) if i % 5][-20:]  # the newest 20 the champion answered
    assert shadow.scores == tuple(i / 100 for i in kept)
    assert shadow.images == tuple(_png(i) for i in kept)
    assert set(shadow.versions) == {"3"} and shadow.since == NOW - 3600


def test_the_verdict_counts_agreement_at_each_threshold_and_the_score_shift():
    rng = np.random.default_rng(0)
    champion = rng.beta(2, 5, 200)
    shadow = _shadow_set(champion.tolist())
    candidate = np.clip(champion + rng.normal(0, 0.05, 200), 0, 1)
    verdict = judge(shadow, candidate.tolist(), 0.55, ShadowPolicy())
    labels = candidate >= 0.55
    champion_labels = champion >= 0.5
    assert verdict["agreement"] == pytest.approx(np.mean(labels == champion_labels))
    assert verdict["counts"]["champion_good_candidate_defect"] == int(np.sum(labels & ~champion_labels))
    assert verdict["counts"]["champion_defect_candidate_good"] == int(np.sum(~labels & champion_labels))
    reference = ks_2samp(champion, candidate)
    assert verdict["score_shift"] == pytest.approx(reference.statistic)
    assert verdict["score_shift_p_value"] == pytest.approx(reference.pvalue)
    differences = [abs(k["champion_score"] - k["candidate_score"]) for k in verdict["kept"]]
    assert differences == sorted(differences, reverse=True) and len(verdict["kept"]) <= 24
    assert verdict["disagreements"] == int(np.sum(labels != champion_labels))
    assert verdict["verdict"] == PASSED and verdict["passed"]


def test_a_candidate_that_flags_other_parts_fails_and_too_few_images_skip():
    champion = np.linspace(0.0, 1.0, 100)
    verdict = judge(_shadow_set(champion.tolist()), (1 - champion).tolist(), 0.5, ShadowPolicy())
    assert verdict["verdict"] == FAILED and not verdict["passed"]
    assert "labels 0.0% as the champion did (< 90%)" in verdict["reason"]
    few = judge(_shadow_set([0.1] * 5), [0.9] * 5, 0.5, ShadowPolicy(min_images=30))
    assert few["verdict"] == SKIPPED and few["passed"] and "fewer than min_images=30" in few["reason"]


@pytest.mark.parametrize("kwargs, message", [
    ({"min_agreement": 1.5}, "min_agreement=1.5"),
    ({"max_images": 0}, "max_images=0"),
    ({"window_s": 0}, "window_s=0"),
    ({"keep": -1}, "keep=-1"),
])
def test_the_policy_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShadowPolicy(**kwargs)


class ScoringBackend(StandInBackend):
    """The stand-in backend whose candidate scores each replayed image as ``score_of`` says."""

    def __init__(self, score_of) -> None:
        super().__init__()
        self.score_of = score_of

    def probe(self, images):
        if len(images) == len(GOLDEN.images) and tuple(images) == GOLDEN.images:
            return super().probe(images)
        return self._call("probe", lambda: ProbeAnswer(tuple(self.score_of[i] for i in images), "fp32"))


def _deliver(backend, tmp_path, shadow: ShadowSet, threshold=0.5):
    clock = ManualClock()
    return Controller(backend, POLICY, tmp_path / "state.json", candidate="candidate-model", stable=backend.stable,
                      golden=GOLDEN, record_dir=tmp_path / "record", clock=clock, sleep=clock.sleep,
                      shadow=ShadowReplay(shadow, ShadowPolicy(), threshold, tmp_path / "record")).run()


def test_a_failed_replay_rolls_back_before_any_traffic_and_the_record_shows_the_disagreements(tmp_path):
    champion = np.linspace(0.0, 1.0, 60)
    shadow = _shadow_set(champion.tolist())
    backend = ScoringBackend({image: 1 - score for image, score in zip(shadow.images, champion)})
    state = _deliver(backend, tmp_path, shadow)
    assert state.phase == ROLLED_BACK and "shadow replay failed" in state.reason
    assert "set_traffic" not in backend.calls and backend.weight == 0
    assert state.shadow["verdict"] == FAILED and state.shadow["images"] == 60
    kept = json.loads((tmp_path / "record" / "shadow" / "disagreements.json").read_text())
    assert len(kept) == 24 and all((tmp_path / "record" / k["file"]).read_bytes() in shadow.images for k in kept)
    markdown = (tmp_path / "record" / record.MARKDOWN_NAME).read_text()
    assert "## Shadow replay" in markdown and "**FAILED**" in markdown and "](shadow/000-" in markdown


def test_an_agreeing_candidate_goes_on_to_the_canary(tmp_path):
    champion = np.linspace(0.0, 1.0, 60)
    shadow = _shadow_set(champion.tolist())
    backend = ScoringBackend(dict(zip(shadow.images, champion)))
    state = _deliver(backend, tmp_path, shadow)
    assert state.phase == PROMOTED and state.shadow["agreement"] == 1.0
    assert any(e["event"] == "shadow replay passed" for e in state.timeline)
    # Without the candidate's threshold the replay is skipped, saying why.
    state = _deliver(ScoringBackend({}), tmp_path / "unknown", shadow, threshold=None)
    assert state.phase == PROMOTED and state.shadow["verdict"] == SKIPPED and "threshold" in state.shadow["reason"]

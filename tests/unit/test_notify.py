"""Webhook notifications against a receiver on 127.0.0.1: both payloads, retries with backoff, and a receiver that
is down or refuses never raising."""

from __future__ import annotations

import pytest

from defectkit.notify import (
    PROMOTED,
    ROLLED_BACK,
    Webhook,
    notify,
    parse_webhooks,
    webhooks_from,
)
from defectkit.retry import RetryPolicy
from tests.servers import free_port
from tests.stand_ins import JsonServer

FAST = RetryPolicy(attempts=3, initial_delay_s=0.01, max_delay_s=0.02)


class Receiver:
    """Records every body posted to it; answers ``statuses`` in turn, then 200."""

    def __init__(self, *statuses: int) -> None:
        self.bodies: list[dict] = []
        self.statuses = list(statuses)
        self.server = JsonServer(self._route)
        self.url = self.server.url

    def _route(self, method, path, query, body, headers):
        self.bodies.append({"path": path, "body": body, "agent": headers.get("User-Agent")})
        return (self.statuses.pop(0) if self.statuses else 200), {}


@pytest.fixture
def receiver():
    made = []

    def make(*statuses: int) -> Receiver:
        made.append(Receiver(*statuses))
        return made[-1]

    yield make
    for r in made:
        r.server.close()


def test_one_event_reaches_every_receiver_in_its_format(receiver):
    generic, slack = receiver(), receiver()
    sent = notify((Webhook(f"{generic.url}/hooks/defectkit"), Webhook(f"{slack.url}/services/T0/B0/x", "slack")),
                  PROMOTED, "defectkit version 7 promoted", model="models:/defectkit/7", version="7",
                  analyses=3, reason="every step passed")
    assert [s.ok for s in sent] == [True, True] and [s.attempts for s in sent] == [1, 1]
    (body,) = [b["body"] for b in generic.bodies]
    assert body["source"] == "defectkit" and body["event"] == "promoted"
    assert body["summary"] == "defectkit version 7 promoted"
    assert body["details"] == {"model": "models:/defectkit/7", "version": "7", "analyses": 3,
                               "reason": "every step passed"}
    assert body["at"].endswith("+00:00")
    (message,) = [b["body"] for b in slack.bodies]
    assert message["text"] == ":white_check_mark: defectkit version 7 promoted"
    assert message["blocks"][0]["text"]["text"] == ":white_check_mark: *defectkit version 7 promoted*"
    assert {"type": "mrkdwn", "text": "*reason*\nevery step passed"} in message["blocks"][1]["fields"]
    assert slack.bodies[0]["path"] == "/services/T0/B0/x" and slack.bodies[0]["agent"] == "defectkit-notify"


def test_a_busy_receiver_is_retried_and_a_refusing_one_is_not(receiver):
    busy, refusing = receiver(503, 429), receiver(400)
    sent = notify((Webhook(busy.url), Webhook(refusing.url)), ROLLED_BACK, "rolled back", retry_policy=FAST)
    assert (sent[0].ok, sent[0].attempts) == (True, 3) and len(busy.bodies) == 3
    assert (sent[1].ok, sent[1].attempts) == (False, 1) and "400" in sent[1].error


def test_a_receiver_that_is_down_is_logged_never_raised(caplog):
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    (sent,) = notify((Webhook(url, "slack"),), ROLLED_BACK, "rolled back", retry_policy=FAST, timeout_s=1.0)
    assert not sent.ok and sent.attempts == 3 and "URLError" in sent.error
    assert "could not notify slack http://127.0.0.1" in caplog.text and "/hook" not in caplog.text  # path kept secret


def test_receivers_are_parsed_from_a_parameter_or_the_environment(monkeypatch):
    assert parse_webhooks("https://a.example/h, slack+https://hooks.slack.com/services/T/B/x,") == (
        Webhook("https://a.example/h"), Webhook("https://hooks.slack.com/services/T/B/x", "slack"))
    assert parse_webhooks("") == ()
    monkeypatch.setenv("DEFECTKIT_WEBHOOKS", "slack+https://chat.example/hook")
    assert webhooks_from("") == (Webhook("https://chat.example/hook", "slack"),)
    assert webhooks_from("https://other.example") == (Webhook("https://other.example"),)
    with pytest.raises(ValueError, match="webhook URL 'ftp://x' must start with http"):
        parse_webhooks("ftp://x")
    with pytest.raises(ValueError, match="event 'deployed' is not one of"):
        notify((), "deployed", "x")


@pytest.mark.parametrize("phase, weights, event", [
    ("promoted", [0, 50, 100], "promoted"),
    ("rolled_back", [0, 50, 0], "rolled_back"),
    ("rolled_back", [0, 0], "blocked"),  # stopped by the golden probe or the shadow replay: no traffic ever
])
def test_a_delivery_announces_its_verdict(receiver, tmp_path, phase, weights, event):
    from defectkit.delivery.rollout import announce
    from defectkit.delivery.state import RolloutState

    state = RolloutState(candidate="models:/defectkit/8", backend="local", policy={}, candidate_version="8",
                         stable="models:/defectkit/7", phase=phase, reason="why it ended so")
    state.timeline = [{"weight": w} for w in weights]
    hook = receiver()
    announce(state, (Webhook(hook.url),), tmp_path / "record")
    (body,) = [b["body"] for b in hook.bodies]
    assert body["event"] == event and body["summary"].startswith("version 8 ")
    assert body["details"]["reason"] == "why it ended so" and body["details"]["stable"] == "models:/defectkit/7"

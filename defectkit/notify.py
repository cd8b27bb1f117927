"""Webhook notifications of what the pipelines decide: promoted, rolled back, blocked by a gate, drift found,
retraining started.

In the manner of Flagger's alert providers: one event, several receivers, each
in its own format: ``json`` (a generic object: event, summary, details, time)
or ``slack`` (an incoming-webhook message, which Mattermost and Rocket.Chat
accept too). A receiver is given as ``URL`` (json) or ``slack+URL``; several
are separated by commas, in a parameter or in the ``DEFECTKIT_WEBHOOKS``
environment variable (where a Kubernetes Secret can put a Slack URL). Each
post is retried with backoff on connection errors, 429 and 5xx; a receiver
that stays down is logged and counted, never raised: a notification never
fails the pipeline that sends it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from defectkit.decision_record import iso
from defectkit.retry import RetryableResponse, RetryPolicy, retry

log = logging.getLogger(__name__)

ENV = "DEFECTKIT_WEBHOOKS"
FORMATS = ("json", "slack")
# What is announced, by the step that decides it.
PROMOTED, ROLLED_BACK, BLOCKED, DRIFT, RETRAINING = (
    "promoted", "rolled_back", "blocked", "drift_detected", "retraining_started")
EVENTS = (PROMOTED, ROLLED_BACK, BLOCKED, DRIFT, RETRAINING)
_EMOJI = {PROMOTED: ":white_check_mark:", ROLLED_BACK: ":rewind:", BLOCKED: ":no_entry:",
          DRIFT: ":chart_with_upwards_trend:", RETRAINING: ":arrows_counterclockwise:"}
DEFAULT_RETRY = RetryPolicy(attempts=4, initial_delay_s=0.5, max_delay_s=4.0)


@dataclass(frozen=True)
class Webhook:
    url: str
    format: str = "json"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"webhook format {self.format!r} is not one of {', '.join(FORMATS)}")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"webhook URL {self.url!r} must start with http:// or https://")

    @property
    def where(self) -> str:
        """The receiver for logs: a Slack webhook's path is its secret."""
        return f"{self.format} {origin(self.url)}"


def origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: what records and logs show of a URL whose path or query may be a secret."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0].split('?', 1)[0]}"


def parse_webhooks(text: str) -> tuple[Webhook, ...]:
    """``URL`` (json) or ``slack+URL`` (or ``json+URL``), comma-separated; empty gives none."""
    hooks = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, plus, url = item.partition("+")
        hooks.append(Webhook(url, kind) if plus and kind in FORMATS else Webhook(item))
    return tuple(hooks)


def webhooks_from(text: str = "") -> tuple[Webhook, ...]:
    """The receivers ``text`` names, or else those of the ``DEFECTKIT_WEBHOOKS`` environment variable."""
    return parse_webhooks(text or os.environ.get(ENV, ""))


def payload(webhook: Webhook, event: str, summary: str, details: dict[str, Any], at: float) -> dict[str, Any]:
    """The body posted to ``webhook`` for one event."""
    if webhook.format == "slack":
        fields = [{"type": "mrkdwn", "text": f"*{key}*\n{value}"} for key, value in details.items()
                  if value not in (None, "")][:10]  # Slack takes at most 10 fields per section
        blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn",
                                                                    "text": f"{_EMOJI[event]} *{summary}*"}}]
        if fields:
            blocks.append({"type": "section", "fields": fields})
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"defectkit · {event} · {iso(at)}"}]})
        return {"text": f"{_EMOJI[event]} {summary}", "blocks": blocks}
    return {"source": "defectkit", "event": event, "summary": summary, "details": details, "at": iso(at)}


@dataclass(frozen=True)
class Sent:
    webhook: str
    ok: bool
    attempts: int
    error: str = ""


def notify(webhooks: tuple[Webhook, ...], event: str, summary: str, *, timeout_s: float = 5.0,
           retry_policy: RetryPolicy = DEFAULT_RETRY, **details: Any) -> list[Sent]:
    """Post ``event`` to every receiver; returns what happened to each. Never raises for a receiver."""
    if event not in EVENTS:
        raise ValueError(f"event {event!r} is not one of {', '.join(EVENTS)}")
    at = time.time()
    details = {key: _plain(value) for key, value in details.items()}
    results = []
    for webhook in webhooks:
        attempts = 0

        def post(hook: Webhook = webhook) -> None:
            nonlocal attempts
            attempts += 1
            body = json.dumps(payload(hook, event, summary, details, at)).encode()
            request = urllib.request.Request(hook.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json",
                                                      "User-Agent": "defectkit-notify"})
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as answer:
                    answer.read()
            except urllib.error.HTTPError as exc:
                if exc.code == 429 or exc.code >= 500:
                    raise RetryableResponse(exc, exc.code, exc.headers) from exc
                raise

        try:
            retry(post, f"notifying {webhook.where} of {event}", retry_policy, transient=_transient)
            results.append(Sent(webhook.where, True, attempts))
            log.info("notified %s of %s", webhook.where, event)
        except Exception as exc:  # noqa: BLE001 - a notification never fails the step that sends it
            results.append(Sent(webhook.where, False, attempts, f"{type(exc).__name__}: {exc}"))
            log.warning("could not notify %s of %s after %d attempts: %s", webhook.where, event, attempts, exc)
    return results


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, (RetryableResponse, urllib.error.URLError, TimeoutError, ConnectionError)) and not (
        isinstance(exc, urllib.error.HTTPError))


def _plain(value: Any) -> Any:
    """JSON-safe: numbers, strings, booleans and None as they are, anything else as text."""
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)

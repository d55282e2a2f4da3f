"""Notify healer: POST a JSON summary of an action or incident to a webhook.

Used for alerting (the policy calls it when it gives up or a circuit breaker opens) and as a
plain rung of a ladder. The URL and token may carry secrets, so logs and results name only the
scheme and host. The token is read from an environment variable, never from the config file.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from trainwarden import __version__
from trainwarden.config import PluginOptions
from trainwarden.healers.base import Action, ActionOutcome, ActionResult, Healer, HealerContext

log = logging.getLogger(__name__)

PAYLOAD_VERSION = 1


@dataclass(frozen=True)
class NotifyOptions(PluginOptions):
    """Where to POST; an empty `url` makes every notification a no-op (nothing configured)."""

    url: str = ""
    timeout_seconds: float = 5.0
    token_env: str = ""

    def problems(self) -> list[tuple[str, str]]:
        """An http(s) URL and a positive timeout."""
        found = super().problems()
        if self.url and urlsplit(self.url).scheme not in {"http", "https"}:
            found.append(("url", "must be an http:// or https:// URL"))
        if self.timeout_seconds <= 0:
            found.append(("timeout_seconds", "must be > 0"))
        return found


def redacted(url: str) -> str:
    """Scheme and host only: webhook paths and queries often embed tokens."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}{':' + str(parts.port) if parts.port else ''}/..."


def payload(action: Action, now: float) -> dict[str, Any]:
    """The JSON body: what happened, to what, and why."""
    return {
        "version": PAYLOAD_VERSION,
        "source": "trainwarden",
        "trainwarden_version": __version__,
        "host": socket.gethostname(),
        "time": now,
        "key": action.key,
        "reason": action.reason,
        "subject": dict(action.subject),
        "params": dict(action.params),
        "evidence": {
            k: v if not isinstance(v, float) or math.isfinite(v) else str(v)
            for k, v in action.evidence.items()
        },
    }


class NotifyHealer(Healer):
    """POSTs one JSON summary per action key."""

    name = "notify"
    Options = NotifyOptions

    def __init__(self, options: PluginOptions, context: HealerContext) -> None:
        super().__init__(options, context)
        self._sent: set[str] = set()
        self._session = requests.Session()

    def apply(self, action: Action, *, dry_run: bool) -> ActionResult:  # noqa: PLR0911 - one return per refused precondition
        """Send the summary (once per action key)."""
        options = self.options
        assert isinstance(options, NotifyOptions)
        if not options.url:
            return ActionResult(ActionOutcome.NOOP, "no webhook url configured")
        where = redacted(options.url)
        if action.key in self._sent:
            return ActionResult(ActionOutcome.NOOP, f"already sent to {where}")
        if dry_run:
            return ActionResult(ActionOutcome.DRY_RUN, f"would POST to {where}")
        headers = {"Content-Type": "application/json", "User-Agent": f"trainwarden/{__version__}"}
        if options.token_env:
            token = os.environ.get(options.token_env, "")
            if not token:
                return ActionResult(
                    ActionOutcome.FAILED, f"environment variable {options.token_env} is empty"
                )
            headers["Authorization"] = f"Bearer {token}"
        try:
            response = self._session.post(
                options.url,
                json=payload(action, self.context.clock()),
                headers=headers,
                timeout=options.timeout_seconds,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            # the exception text may repeat the full URL: report only its type
            return ActionResult(ActionOutcome.FAILED, f"POST to {where} failed: {type(exc).__name__}")
        if not 200 <= response.status_code < 300:
            return ActionResult(
                ActionOutcome.FAILED,
                f"POST to {where} answered HTTP {response.status_code}",
                {"status": response.status_code},
            )
        self._sent.add(action.key)
        log.info("notify: sent %s to %s", action.key, where)
        return ActionResult(ActionOutcome.APPLIED, f"sent to {where}", {"status": response.status_code})


HEALER = NotifyHealer

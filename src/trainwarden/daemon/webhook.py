"""The Alertmanager webhook receiver: `POST /api/v1/alerts` turns cluster alerts into findings.

Prometheus evaluates what only the whole fleet shows (a straggler node against the job's
median, a job stalled on every node, a daemon that stopped answering); Alertmanager delivers it
here, and the finding goes through the same policy as the daemon's own (routes, observe-only
default, cooldowns, budgets, breaker, journal, metrics).

The request thread only checks the token and the payload and queues the alerts, so Alertmanager
gets its 200 in about a millisecond; one worker thread handles them in order. A full queue is a
503, which Alertmanager retries. Every alert event (fingerprint, startsAt, status) is claimed in
the journal's database before it is handed on (`webhook_seen`), so the two deliveries of an
unclustered Alertmanager pair, a retry, or a replay after a daemon restart act at most once.

Who acts (DESIGN "Scale"): an alert whose ladder holds only cluster-scope healers (Slurm drain,
Kubernetes cordon, a drain command: `cluster_healers`) is acted on by the designated actor, a
`primary` daemon, or a `standby` whose primary does not answer `/healthz`; any other alert only by
the daemon whose `node_name` the alert's `node` label names. Labels and annotations are data: the
subject keeps only job, node, gpu and rank (plain names, checked), the rest is evidence, and
nothing of either ever reaches a shell.
"""

from __future__ import annotations

import hmac
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import requests

from trainwarden.config import parse_listen
from trainwarden.daemon.healing import finding_event
from trainwarden.daemon.host import DaemonHost
from trainwarden.daemon.http import Request, Response
from trainwarden.daemon.timeline import EventKind, EventSink, emit
from trainwarden.daemon.webhook_payload import SUBJECT_LABELS, Alert, PayloadError, parse_payload
from trainwarden.daemon.webhook_seen import SeenAlerts, SeenAlertsError
from trainwarden.errors import ConfigError, TrainwardenError
from trainwarden.journal import JOURNAL_NAME
from trainwarden.model import Finding, FindingState, MetricKind, MetricSpec, Sample, Severity
from trainwarden.store import Store
from trainwarden.webhook_config import WebhookConfig, is_loopback, listen_problems, read_token

if TYPE_CHECKING:
    from trainwarden.daemon.healing import Healing
    from trainwarden.daemon.http import Routes
    from trainwarden.healers.policy import Outcome

log = logging.getLogger(__name__)

PATH = "/api/v1/alerts"
SOURCE = "webhook"
RULE_PREFIX_EVIDENCE = 1024
"""Longest evidence value kept from one label or annotation."""
SEEN_RETENTION_SECONDS = 7 * 86400.0
BATCH = 256
"""Most alerts handed to the policy in one call (one journal read, one publish)."""

REQUESTS = MetricSpec(
    "trainwarden_webhook_requests_total",
    "Alertmanager notifications answered, by result (accepted, unauthorized, bad_request, too_large,"
    " unsupported_media_type, queue_full).",
    MetricKind.COUNTER,
    ("result",),
)
ALERTS = MetricSpec(
    "trainwarden_webhook_alerts_total",
    "Alerts handled, by their status (firing, resolved) and result (to_policy, resolved, duplicate,"
    " unmapped, other_node, deferred, not_actor, error).",
    MetricKind.COUNTER,
    ("status", "result"),
)
QUEUED = MetricSpec("trainwarden_webhook_queued_alerts", "Alerts accepted and not yet handled.")
REQUEST_RESULTS = (
    "accepted",
    "unauthorized",
    "bad_request",
    "too_large",
    "unsupported_media_type",
    "queue_full",
)

Decide = Callable[[Sequence[Finding]], Sequence["Outcome"]]
LadderFor = Callable[[Finding], tuple[str, ...]]


class Webhook:
    """Validates notifications, queues their alerts and hands each one, once, to the policy."""

    def __init__(
        self,
        config: WebhookConfig,
        *,
        node_name: str,
        decide: Decide,
        ladder_for: LadderFor,
        seen: SeenAlerts,
        token: bytes | None = None,
        store: Store | None = None,
        clock: Callable[[], float] = time.time,
        on_event: EventSink | None = None,
        primary_alive: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.node_name = node_name
        self._decide = decide
        self._ladder_for = ladder_for
        self._seen = seen
        self._expected = b"Bearer " + token if token else None
        self._store = store
        self._clock = clock
        self._on_event = on_event
        self._primary_alive = primary_alive or self._ask_primary
        self._queue: queue.Queue[Alert | None] = queue.Queue()
        self._room = threading.Lock()  # size check and puts of one notification are one step
        self._counts_lock = threading.Lock()
        self._requests: dict[str, int] = dict.fromkeys(REQUEST_RESULTS, 0)
        self._alerts: dict[tuple[str, str], int] = {}
        self._thread: threading.Thread | None = None
        self._next_prune = 0.0

    # --- the HTTP side: milliseconds, no I/O beyond the request ------------------------------

    def handle(self, request: Request) -> Response:
        """`POST /api/v1/alerts`: 200 once queued; 401, 400, 413, 415 or 503 with the reason."""
        response, result = self._answer(request)
        self._count_request(result)
        return response

    def _answer(self, request: Request) -> tuple[Response, str]:
        if self._expected is not None:
            given = request.header("Authorization").encode("utf-8", "replace")
            if not hmac.compare_digest(given, self._expected):
                why = "missing bearer token" if not given else "wrong bearer token"
                challenge = (("WWW-Authenticate", 'Bearer realm="trainwarden"'),)
                return Response(401, f"{why}\n".encode(), headers=challenge), "unauthorized"
        media = request.header("Content-Type").split(";", 1)[0].strip().lower()
        if media != "application/json":
            why = f"Content-Type must be application/json, got {media[:60]!r}\n"
            return Response.text(why, 415), "unsupported_media_type"
        if len(request.body) > self.config.max_body_bytes:
            why = f"body of {len(request.body)} bytes is over the limit of {self.config.max_body_bytes}\n"
            return Response.text(why, 413), "too_large"
        try:
            alerts = parse_payload(request.body, self.config.max_alerts)
        except PayloadError as exc:
            result = "too_large" if exc.status == 413 else "bad_request"
            return Response.text(f"{exc.why}\n", exc.status), result
        with self._room:
            waiting = self._queue.qsize()
            if waiting + len(alerts) > self.config.queue_alerts:
                why = f"{waiting} alerts waiting (limit {self.config.queue_alerts}); retry later\n"
                return Response(503, why.encode(), headers=(("Retry-After", "5"),)), "queue_full"
            for alert in alerts:
                self._queue.put_nowait(alert)
        return Response.json({"accepted": len(alerts)}), "accepted"

    # --- the worker: one alert at a time, in arrival order ------------------------------------

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._work, name="trainwarden-webhook", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued, then stop the worker."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def join(self) -> None:
        """Block until every alert accepted so far is handled (tests, benchmarks)."""
        self._queue.join()

    def _work(self) -> None:
        """Take what is queued (up to BATCH alerts) and hand its new firing findings over in one go."""
        while True:
            batch = [self._queue.get()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            alerts = [alert for alert in batch if alert is not None]
            try:
                self._handle(alerts)
            finally:
                for _ in batch:
                    self._queue.task_done()
            if len(alerts) < len(batch):
                return

    def _handle(self, alerts: Sequence[Alert]) -> None:
        results: list[tuple[Alert, str]] = []
        findings: list[Finding] = []
        for alert in alerts:
            try:
                result, finding = self._triage(alert)
            except Exception:
                log.exception("webhook: alert %s (%s) failed", alert.fingerprint, alert.name)
                result, finding = "error", None
            results.append((alert, result))
            if finding is not None:
                findings.append(finding)
        if findings:
            try:
                outcomes = self._decide(findings)
            except Exception:
                log.exception("webhook: the policy failed on %d finding(s)", len(findings))
                results = [(a, "error" if r == "to_policy" else r) for a, r in results]
            else:
                for outcome in outcomes:
                    log.info(
                        "webhook: %s on %s: %s %s",
                        outcome.finding.rule,
                        outcome.finding.subject_key,
                        outcome.healer,
                        outcome.result,
                    )
        for alert, result in results:
            self._count_alert(alert.status, result)

    def _triage(self, alert: Alert) -> tuple[str, Finding | None]:
        """What one alert means here: its result label, and the finding when the policy gets it.

        The alert is claimed (at most once, ever) before its finding is handed on.
        """
        rule = self.config.rules.get(alert.name)
        if rule is None:
            log.info("webhook: alert %s is mapped to no rule ([webhook.rules]); observed only", alert.name)
            return "unmapped", None
        finding = alert_finding(alert, rule)
        now = self._clock()
        if alert.status == "firing":
            refusal = self._not_ours(finding)
            if refusal is not None:
                return refusal, None
        if not self._claim(alert, finding, now):
            return "duplicate", None
        kind = EventKind.FINDING_FIRED if alert.status == "firing" else EventKind.FINDING_RESOLVED
        emit(self._on_event, finding_event(kind, finding))
        if alert.status == "resolved":
            log.info("webhook: %s resolved on %s", finding.rule, finding.subject_key)
            return "resolved", None
        return "to_policy", finding

    def _not_ours(self, finding: Finding) -> str | None:
        """Why this daemon must not act on a firing finding, or None when it is its to act on."""
        ladder = self._ladder_for(finding)
        if all(healer in self.config.cluster_healers for healer in ladder):
            if self.config.actor == "none":
                return "not_actor"
            if self.config.actor == "standby" and self._primary_alive():
                return "deferred"  # not claimed: a resend after the primary died is acted on
            return None
        if finding.subject.get("node") != self.node_name:
            return "other_node"
        return None

    def _claim(self, alert: Alert, finding: Finding, now: float) -> bool:
        if now >= self._next_prune:
            self._next_prune = now + 3600.0
            gone = self._seen.prune(now - SEEN_RETENTION_SECONDS)
            if gone:
                log.info(
                    "webhook: forgot %d alerts older than %.0f days", gone, SEEN_RETENTION_SECONDS / 86400
                )
        return self._seen.claim(alert, finding.subject_key, now)

    def _ask_primary(self) -> bool:
        """True when the primary answers GET /healthz with 200 within the timeout."""
        url = self.config.primary_url.rstrip("/") + "/healthz"
        try:
            answer = requests.get(url, timeout=self.config.primary_timeout_seconds)
        except requests.RequestException as exc:
            log.warning("webhook: primary %s unreachable (%s); acting as its standby", url, exc)
            return False
        return answer.status_code == 200

    # --- metrics and status -----------------------------------------------------------------

    def _count_request(self, result: str) -> None:
        with self._counts_lock:
            self._requests[result] = self._requests.get(result, 0) + 1
        self.publish()

    def _count_alert(self, status: str, result: str) -> None:
        with self._counts_lock:
            self._alerts[status, result] = self._alerts.get((status, result), 0) + 1
        self.publish()

    def samples(self) -> list[Sample]:
        """The webhook's counters and queue depth."""
        with self._counts_lock:
            out = [REQUESTS.sample(n, result=r) for r, n in sorted(self._requests.items())]
            out.extend(ALERTS.sample(n, status=s, result=r) for (s, r), n in sorted(self._alerts.items()))
        out.append(QUEUED.sample(self._queue.qsize()))
        return out

    def publish(self) -> None:
        """Put the counters into the store (done after every request and alert)."""
        if self._store is not None:
            self._store.replace(SOURCE, self.samples(), self._clock())

    def status(self) -> dict[str, object]:
        """JSON-able state for `/status`: who this daemon is, and alerts firing that it handled."""
        try:
            firing: object = [
                {"alertname": name, "subject": subject, "starts_at": starts}
                for name, subject, starts in self._seen.firing()
            ]
        except SeenAlertsError as exc:
            firing = {"error": str(exc)}
        return {
            "path": PATH,
            "node_name": self.node_name,
            "actor": self.config.actor,
            "token_required": self._expected is not None,
            "queued": self._queue.qsize(),
            "rules": dict(self.config.rules),
            "firing": firing,
        }


def alert_finding(alert: Alert, rule: str) -> Finding:
    """The finding an alert stands for: bounded subject, everything else as (truncated) evidence."""
    evidence: dict[str, float | str] = {
        "alertname": alert.name,
        "fingerprint": alert.fingerprint,
        "starts_at": alert.starts_at_text,
    }
    if alert.generator_url:
        evidence["generator_url"] = alert.generator_url[:RULE_PREFIX_EVIDENCE]
    for key, value in alert.labels.items():
        if key not in SUBJECT_LABELS and key != "alertname":
            evidence[f"label_{key}"] = value[:RULE_PREFIX_EVIDENCE]
    for key, value in alert.annotations.items():
        evidence[f"annotation_{key}"] = value[:RULE_PREFIX_EVIDENCE]
    severity_text = alert.labels.get("severity", "")
    severity = Severity(severity_text) if severity_text in tuple(Severity) else Severity.WARNING
    summary = alert.annotations.get("summary") or f"{alert.name} from Alertmanager"
    return Finding(
        rule=rule,
        subject=alert.subject(),
        severity=severity,
        summary=" ".join(summary.split())[:200],
        state=FindingState.FIRING if alert.status == "firing" else FindingState.RESOLVED,
        since=alert.starts_at,
        evidence=evidence,
        source="alertmanager",
    )


class WebhookHost(DaemonHost, Protocol):
    """The daemon as the webhook sees it: also its routes, and the healing it runs now."""

    @property
    def routes(self) -> Routes:
        """The HTTP routes the daemon serves."""
        ...

    @property
    def healing(self) -> Healing | None:
        """The daemon's detect-and-heal (`trainwarden run` sets its own after the start)."""
        ...


def install_webhook(daemon: WebhookHost, healing: Healing) -> Webhook | None:
    """Serve `POST /api/v1/alerts` on the daemon, feeding its healing; None when disabled.

    Raises `ConfigError` when the listener is not loopback and no token is configured (a
    `--listen` flag can make it so after the config file was checked).
    """
    config = daemon.config.webhook
    if not config.enabled:
        return None
    host, _ = parse_listen(daemon.config.daemon.listen)
    problems = listen_problems(config, host)
    if problems:
        raise ConfigError(problems, daemon.config.source)
    token: bytes | None = None
    if config.token_file:
        try:
            token = read_token(Path(config.token_file))
        except OSError as exc:
            raise TrainwardenError(f"webhook token_file {config.token_file}: {exc.strerror or exc}") from exc
    if not token and not is_loopback(host):
        raise TrainwardenError(f"webhook token_file {config.token_file} is empty")
    webhook = Webhook(
        config,
        node_name=daemon.config.daemon.node_name,
        # Looked up on each alert: a config reload may replace the daemon's healing.
        decide=lambda findings: (daemon.healing or healing).decide(findings),  # noqa: PLW0108 - late lookup
        ladder_for=lambda f: (daemon.healing or healing).policy.ladder_for(f),  # noqa: PLW0108
        seen=SeenAlerts(daemon.config.daemon.state_dir / JOURNAL_NAME),
        token=token or None,
        store=daemon.store,
        clock=daemon.clock,
        on_event=healing.on_event,
    )
    # The handler answers (and counts) a body over the limit; past twice the limit the server
    # stops reading it at all (counted in trainwarden_http_requests_total).
    daemon.routes.add("POST", PATH, webhook.handle, max_body_bytes=2 * config.max_body_bytes)
    daemon.status_sections["webhook"] = webhook.status
    webhook.start()
    webhook.publish()  # zero series exist before the first notification
    return webhook

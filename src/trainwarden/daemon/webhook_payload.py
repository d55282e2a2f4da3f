"""Alertmanager's webhook payload (version 4), parsed strictly into `Alert`s.

The shape, as Alertmanager documents it for `webhook_config` receivers::

    {"version": "4", "groupKey": "...", "truncatedAlerts": 0, "status": "firing|resolved",
     "receiver": "...", "groupLabels": {...}, "commonLabels": {...}, "commonAnnotations": {...},
     "externalURL": "...",
     "alerts": [{"status": "firing|resolved", "labels": {...}, "annotations": {...},
                 "startsAt": "RFC3339", "endsAt": "RFC3339", "generatorURL": "...",
                 "fingerprint": "hex"}]}

Anything else is a `PayloadError` naming the field and why, so the sender's log says what to fix.
The labels that become a finding's subject (job, node, gpu, rank) must be plain names; every
other label and annotation is bounded in size and kept as evidence only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

SUBJECT_LABELS = ("job", "node", "gpu", "rank")
"""Alert labels that name what is affected; all others are evidence."""
SUBJECT_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,252}$")
FINGERPRINT = re.compile(r"^[0-9a-f]{1,64}$")
STATUSES = ("firing", "resolved")
MAX_LABELS = 64
MAX_KEY = 128
MAX_VALUE = 4096
_REQUIRED_TOP = {
    "version": str,
    "groupKey": str,
    "status": str,
    "receiver": str,
    "groupLabels": dict,
    "commonLabels": dict,
    "commonAnnotations": dict,
    "externalURL": str,
    "alerts": list,
}
_REQUIRED_ALERT = {
    "status": str,
    "labels": dict,
    "annotations": dict,
    "startsAt": str,
    "endsAt": str,
    "fingerprint": str,
}


class PayloadError(ValueError):
    """A notification that is not a valid version-4 payload; `status` is the HTTP answer."""

    def __init__(self, why: str, status: int = 400) -> None:
        super().__init__(why)
        self.why = why
        self.status = status


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert of a notification, validated."""

    status: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: float
    starts_at_text: str
    fingerprint: str
    generator_url: str

    @property
    def name(self) -> str:
        """The alert's `alertname` label."""
        return self.labels["alertname"]

    @property
    def dedupe_key(self) -> tuple[str, str, str]:
        """(fingerprint, startsAt, status): what two deliveries of the same event share."""
        return (self.fingerprint, self.starts_at_text, self.status)

    def subject(self) -> dict[str, str]:
        """The bounded labels that name what is affected."""
        return {key: self.labels[key] for key in SUBJECT_LABELS if key in self.labels}


def parse_payload(body: bytes, max_alerts: int) -> list[Alert]:
    """Every alert of a version-4 notification; raises `PayloadError` on anything else."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PayloadError(f"body is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise PayloadError(f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise PayloadError("body is not JSON: nested too deeply") from exc
    if not isinstance(data, dict):
        raise PayloadError(f"payload must be a JSON object, got {_kind(data)}")
    _require(data, _REQUIRED_TOP, "payload")
    if data["version"] != "4":
        raise PayloadError(
            f'version must be "4" (Alertmanager\'s webhook payload), got {_short(data["version"])}'
        )
    _status(data["status"], "status")
    truncated = data.get("truncatedAlerts", 0)
    if not isinstance(truncated, int) or isinstance(truncated, bool) or truncated < 0:
        raise PayloadError(f"truncatedAlerts must be a non-negative integer, got {_short(truncated)}")
    for key in ("groupLabels", "commonLabels", "commonAnnotations"):
        _strings(data[key], key)
    alerts = data["alerts"]
    if len(alerts) > max_alerts:
        raise PayloadError(
            f"{len(alerts)} alerts in one notification; at most {max_alerts} (set max_alerts in the "
            "receiver's webhook_config)",
            413,
        )
    return [_alert(item, f"alerts[{index}]") for index, item in enumerate(alerts)]


def _alert(item: Any, where: str) -> Alert:
    if not isinstance(item, dict):
        raise PayloadError(f"{where} must be an object, got {_kind(item)}")
    _require(item, _REQUIRED_ALERT, where)
    status = _status(item["status"], f"{where}.status")
    labels = _strings(item["labels"], f"{where}.labels")
    annotations = _strings(item["annotations"], f"{where}.annotations")
    name = labels.get("alertname")
    if not name:
        raise PayloadError(f"{where}.labels has no alertname")
    for key in SUBJECT_LABELS:
        value = labels.get(key)
        if value is not None and not SUBJECT_VALUE.match(value):
            raise PayloadError(
                f"{where}.labels.{key} {_short(value)} is not a plain name"
                f" (must match {SUBJECT_VALUE.pattern})"
            )
    fingerprint = item["fingerprint"]
    if not FINGERPRINT.match(fingerprint):
        raise PayloadError(f"{where}.fingerprint {_short(fingerprint)} must be 1-64 lowercase hex digits")
    starts_text = item["startsAt"]
    try:
        starts = datetime.fromisoformat(starts_text)
    except ValueError as exc:
        raise PayloadError(f"{where}.startsAt {_short(starts_text)} is not an RFC 3339 time") from exc
    if starts.tzinfo is None:
        raise PayloadError(f"{where}.startsAt {_short(starts_text)} has no time zone")
    generator = item.get("generatorURL", "")
    if not isinstance(generator, str) or len(generator) > MAX_VALUE:
        raise PayloadError(f"{where}.generatorURL must be a string of at most {MAX_VALUE} characters")
    return Alert(
        status=status,
        labels=labels,
        annotations=annotations,
        starts_at=starts.timestamp(),
        starts_at_text=starts.isoformat(timespec="microseconds"),
        fingerprint=fingerprint,
        generator_url=generator,
    )


def _require(data: Mapping[str, Any], fields: Mapping[str, type], where: str) -> None:
    missing = sorted(key for key in fields if key not in data)
    if missing:
        raise PayloadError(f"{where} lacks {', '.join(missing)}")
    for key, kind in fields.items():
        if not isinstance(data[key], kind):
            raise PayloadError(f"{where}.{key} must be {_names[kind]}, got {_kind(data[key])}")


def _status(value: str, where: str) -> str:
    if value not in STATUSES:
        raise PayloadError(f"{where} must be firing or resolved, got {_short(value)}")
    return value


def _strings(value: Mapping[str, Any], where: str) -> dict[str, str]:
    if len(value) > MAX_LABELS:
        raise PayloadError(f"{where} has {len(value)} entries; at most {MAX_LABELS}")
    for key, item in value.items():
        if len(key) > MAX_KEY or not key:
            raise PayloadError(f"{where} has a key of {len(key)} characters; 1 to {MAX_KEY} allowed")
        if not isinstance(item, str):
            raise PayloadError(f"{where}.{key[:40]} must be a string, got {_kind(item)}")
        if len(item) > MAX_VALUE:
            raise PayloadError(f"{where}.{key[:40]} is {len(item)} characters; at most {MAX_VALUE}")
    return dict(value)


_names: dict[type, str] = {str: "a string", dict: "an object", list: "an array"}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), _names.get(type(value), "?")
    )


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, str) else json.dumps(value[:80])
    return text[:100]

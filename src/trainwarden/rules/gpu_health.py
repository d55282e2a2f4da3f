"""GPU health: a GPU that fell off the bus, or new XID errors, mapped to NVIDIA's recommended action.

XIDs are counters (`trainwarden_gpu_xid_errors_total{gpu,xid}`); the rule fires on an increase
since the previous engine tick (or over the window when the series is windowed), so an old XID
never stays a finding forever. The action comes from `trainwarden.xid_catalog` when that module is
installed; without it every XID is reported with action "unknown". Actions needing a GPU reset,
drain or reboot make the interruption persistent (the node is bad); "restart the application"
makes it transient; "ignore" XIDs are not reported.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from types import ModuleType

from trainwarden.model import Finding, Severity
from trainwarden.rules.base import Rule, RuleOptions, RuleView

log = logging.getLogger(__name__)

GPU_UP = "trainwarden_gpu_up"
XID_ERRORS = "trainwarden_gpu_xid_errors_total"
_PERSISTENT_WORDS = ("reset", "drain", "reboot", "replace", "node", "hardware", "rma")


def _load_catalog() -> ModuleType | None:
    try:
        return importlib.import_module("trainwarden.xid_catalog")
    except ImportError:
        log.info("trainwarden.xid_catalog not installed: XIDs reported without a recommended action")
        return None


_CATALOG = _load_catalog()


def recommended_action(xid: int) -> str:
    """NVIDIA's recommended action for `xid` as lower-case text ("unknown" without the catalog)."""
    lookup: Callable[[int], object] | None = getattr(_CATALOG, "recommended_action", None)
    if lookup is None:
        return "unknown"
    try:
        action = lookup(xid)
    except Exception:  # the catalog is another module's contract: never let it break the rule
        log.exception("xid_catalog.recommended_action(%s) raised", xid)
        return "unknown"
    text = getattr(action, "value", None) or getattr(action, "name", None) or str(action)
    return str(text).lower()


def interruption_of(action: str) -> str:
    """Persistent when the GPU or node must be reset, drained or rebooted; transient otherwise."""
    return (
        "persistent"
        if any(word in action for word in _PERSISTENT_WORDS) or action == "unknown"
        else "transient"
    )


class GpuHealthRule(Rule):
    """One finding per GPU that is down or has new XIDs."""

    name = "gpu_health"
    Options = RuleOptions

    def evaluate(self, view: RuleView, now: float) -> list[Finding]:
        """Lost GPUs and XID counter increases."""
        per_gpu: dict[str, dict[str, float | str]] = {}
        for series in view.series(GPU_UP):
            if series.value == 0.0:
                gpu = dict(series.labels).get("gpu", "")
                per_gpu[gpu] = {"gpu_up": 0.0, "action": "drain", "interruption": "persistent"}
        for series in view.series(XID_ERRORS):
            labels = dict(series.labels)
            gpu, xid_text = labels.get("gpu", ""), labels.get("xid", "")
            increase = self._increase(view, series.labels, series.value, now)
            if increase <= 0:
                continue
            try:
                action = recommended_action(int(xid_text))
            except ValueError:
                action = "unknown"
            if action == "ignore":
                continue
            evidence = per_gpu.setdefault(gpu, {"interruption": "transient"})
            evidence["xids"] = ",".join(sorted({*str(evidence.get("xids", "")).split(","), xid_text} - {""}))
            evidence["xid_increase"] = float(evidence.get("xid_increase", 0.0)) + increase
            evidence["action"] = _worse(str(evidence.get("action", "")), action)
            if interruption_of(action) == "persistent":
                evidence["interruption"] = "persistent"
        findings = []
        for gpu, evidence in sorted(per_gpu.items()):
            if evidence.get("gpu_up") == 0.0:
                summary = f"GPU {gpu} is lost (not answering NVML)"
            else:
                summary = f"GPU {gpu}: XID {evidence['xids']} (recommended action: {evidence['action']})"
            findings.append(self.finding({"gpu": gpu}, summary, evidence, Severity.CRITICAL))
        return findings

    def _increase(
        self, view: RuleView, labels: tuple[tuple[str, str], ...], value: float, now: float
    ) -> float:
        """Counter increase over the last `resolve_after_seconds` (window) or since the previous tick.

        A series that appeared inside the lookback counts from 0: XID counters start at 0 when the
        daemon starts and a (gpu, xid) series exists only once that XID happened.
        """
        window = view.window(XID_ERRORS, labels)
        if window:
            cutoff = now - self.options.resolve_after_seconds
            before = [p.value for p in window if p.timestamp < cutoff]
            baseline = before[-1] if before else 0.0
            latest = window[-1].value
            return latest - baseline if latest >= baseline else latest  # a drop is a counter reset
        previous = view.previous(XID_ERRORS, labels)
        if previous is None or value < previous:
            return value  # new series or a counter reset: everything counted is new
        return value - previous


def _worse(current: str, new: str) -> str:
    if not current:
        return new
    return (
        new if interruption_of(new) == "persistent" and interruption_of(current) != "persistent" else current
    )


RULE = GpuHealthRule

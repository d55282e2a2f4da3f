"""Exports the shared XID ledger: one owner for the XID counters both XID sources feed.

The NVML event thread (in the `gpu` collector) and the `kmsg` collector report XIDs into
`CollectorContext.xid_ledger`, which deduplicates them; this collector only renders the counts.
Counters, never a sticky last-XID gauge: `increase(trainwarden_gpu_xid_errors_total[10m]) > 0` is
the alert, and the action comes from `trainwarden.xid_catalog.recommended_action(xid)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from trainwarden.collectors.base import Collector
from trainwarden.model import MetricKind, MetricSpec, Sample
from trainwarden.xid_catalog import XidAction, recommended_action

XID_ERRORS = MetricSpec(
    "trainwarden_gpu_xid_errors_total",
    "XID incidents per GPU and XID, deduplicated across NVML events and the kernel log.",
    MetricKind.COUNTER,
    ("gpu", "xid"),
    window=True,
)
XID_ACTIONS = MetricSpec(
    "trainwarden_gpu_xid_actions_total",
    "XID incidents per GPU by NVIDIA's recommended action (ignore, restart_job, reset_gpu, drain, reboot).",
    MetricKind.COUNTER,
    ("gpu", "action"),
    window=True,
)
XID_REPORTS = MetricSpec(
    "trainwarden_gpu_xid_reports_total",
    "Raw XID reports per source (nvml, kmsg) before deduplication.",
    MetricKind.COUNTER,
    ("source",),
)
XID_DUPLICATES = MetricSpec(
    "trainwarden_gpu_xid_duplicate_reports_total",
    "XID reports dropped as the other source's copy of an incident already counted.",
    MetricKind.COUNTER,
)


class XidCollector(Collector):
    """Renders the ledger's counters; reads no source of its own."""

    name: ClassVar[str] = "xid"

    def collect(self) -> Iterable[Sample]:
        """Current counts of the shared ledger."""
        ledger = self.context.xid_ledger
        out: list[Sample] = [XID_DUPLICATES.sample(ledger.duplicates)]
        out.extend(
            XID_REPORTS.sample(n, source=str(src)) for src, n in sorted(ledger.reports_by_source().items())
        )
        # Every known GPU starts at 0 for every action, so `increase()` sees the first incident.
        actions = {(gpu, str(action)): 0 for gpu in ledger.known_gpus() for action in XidAction}
        for (gpu, xid), count in sorted(ledger.counts().items()):
            out.append(XID_ERRORS.sample(count, gpu=gpu, xid=str(xid)))
            key = (gpu, str(recommended_action(xid)))
            actions[key] = actions.get(key, 0) + count
        out.extend(
            XID_ACTIONS.sample(n, gpu=gpu, action=action) for (gpu, action), n in sorted(actions.items())
        )
        return out

    def status(self) -> Mapping[str, Any]:
        """The most recent incidents, newest last."""
        return {
            "recent": [
                {
                    "source": str(r.source),
                    "xid": r.xid,
                    "gpu": self.context.xid_ledger.gpu_label(r),
                    "at": r.timestamp,
                    "pid": r.pid,
                    "message": r.message[:200],
                }
                for r in self.context.xid_ledger.recent()
            ]
        }


COLLECTOR = XidCollector

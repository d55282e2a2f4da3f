"""GPU checks from one pass of the daemon's GPU collector: NVML answers, memory health, recovery, clocks.

The collector runs without its event thread or per-process queries (a preflight wants state, not
a stream), the lost-GPU verdict is the `gpu_health` rule's, and the recovery action is read
through the XID catalog, exactly as the daemon reads them.
"""

from __future__ import annotations

import time
from pathlib import Path

from trainwarden.collectors import gpu as gpu_collector
from trainwarden.collectors import gpu_metrics
from trainwarden.collectors.base import CollectorContext
from trainwarden.errors import CollectorUnavailableError
from trainwarden.preflight.model import CheckResult, PreflightOptions, Status
from trainwarden.rules.base import RuleOptions, RuleView
from trainwarden.rules.gpu_health import GpuHealthRule
from trainwarden.store import Store
from trainwarden.xid_catalog import XidAction, action_for_recovery

NVML = "gpu_nvml"
MEMORY = "gpu_memory"
RECOVERY = "gpu_recovery_action"
CLOCKS = "gpu_clocks"
CHECKS = (NVML, MEMORY, RECOVERY, CLOCKS)

HARDWARE_SLOWDOWNS = frozenset({"hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"})
"""Clock event reasons that mean the hardware holds clocks down (not an idle GPU or a power cap)."""

_SOURCE = "gpu"


def check_gpus(options: PreflightOptions) -> list[CheckResult]:
    """Sample every GPU once and judge it; a node without NVML skips (or fails when GPUs are expected)."""
    started = time.monotonic()
    context = CollectorContext(paths=options.paths, state_dir=options.state_dir)
    collector = gpu_collector.GpuCollector(
        gpu_collector.GpuOptions(events=False, process_memory=False, pcie_throughput_fallback=False), context
    )
    try:
        collector.start()
    except CollectorUnavailableError as exc:
        status = Status.FAIL if options.expect_gpus else Status.SKIPPED
        reason = f"{exc}" + (f" but {options.expect_gpus} GPU(s) expected" if options.expect_gpus else "")
        return [CheckResult(NVML, status, reason, time.monotonic() - started)] + [
            CheckResult(name, Status.SKIPPED, "no NVML", 0.0) for name in CHECKS[1:]
        ]
    try:
        store = Store()
        now = time.time()
        store.replace(_SOURCE, collector.collect(), now)
        fake = collector.status().get("fake_nvml")
    finally:
        collector.close()
    elapsed = time.monotonic() - started
    # A node on fixture GPUs must never pass for a real one: say so on the NVML line.
    prefix = f"FAKE NVML fixture {Path(str(fake)).name}: " if fake else ""
    return [
        _timed(_nvml(store, now, options.expect_gpus), elapsed, prefix),
        _memory(store),
        _recovery(store),
        _clocks(store),
    ]


def _timed(result: CheckResult, seconds: float, prefix: str) -> CheckResult:
    return CheckResult(result.check, result.status, prefix + result.reason, seconds, result.detail)


def _gpus(store: Store) -> list[str]:
    return sorted({dict(s.labels)["gpu"] for s in store.find(gpu_metrics.UP.name)}, key=int)


def _nvml(store: Store, now: float, expect: int) -> CheckResult:
    """Every GPU answers NVML (the gpu_health rule's lost-GPU verdict), and as many as expected."""
    gpus = _gpus(store)
    findings = GpuHealthRule(RuleOptions()).evaluate(RuleView(store), now)
    lost = [f for f in findings if f.evidence.get("gpu_up") == 0.0]
    detail: dict[str, float | str] = {"gpus": float(len(gpus)), "lost": float(len(lost))}
    if lost:
        return CheckResult(NVML, Status.FAIL, "; ".join(f.summary for f in lost), detail=detail)
    if len(gpus) < expect:
        return CheckResult(NVML, Status.FAIL, f"{len(gpus)} GPU(s) answer, {expect} expected", detail=detail)
    if not gpus:
        return CheckResult(NVML, Status.SKIPPED, "NVML lists no GPUs", detail=detail)
    return CheckResult(NVML, Status.PASS, f"{len(gpus)} GPU(s) answer NVML", detail=detail)


def _flagged(store: Store, name: str, *, above: float = 0.0, **want: str) -> list[str]:
    out = []
    for series in store.find(name):
        labels = dict(series.labels)
        if all(labels.get(k) == v for k, v in want.items()) and series.value > above:
            out.append(labels.get("gpu", "?"))
    return sorted(set(out), key=lambda g: (len(g), g))


def _memory(store: Store) -> CheckResult:
    """No pending page retirement or row remap, no remap failure, no uncorrectable ECC since driver load."""
    if not _gpus(store):
        return CheckResult(MEMORY, Status.SKIPPED, "no GPUs")
    problems = {
        "retired pages pending": _flagged(store, gpu_metrics.RETIRED_PENDING.name),
        "row remap pending": _flagged(store, gpu_metrics.REMAP_PENDING.name),
        "row remap failure": _flagged(store, gpu_metrics.REMAP_FAILURE.name),
        "uncorrectable ECC since driver load": _flagged(
            store, gpu_metrics.ECC.name, type="uncorrected", counter="volatile"
        ),
    }
    bad = {what: gpus for what, gpus in problems.items() if gpus}
    if bad:
        text = "; ".join(f"{what} on GPU {','.join(gpus)}" for what, gpus in bad.items())
        return CheckResult(MEMORY, Status.FAIL, text, detail={k: ",".join(v) for k, v in bad.items()})
    return CheckResult(MEMORY, Status.PASS, "no pending retirement/remap, no uncorrectable ECC")


def _recovery(store: Store) -> CheckResult:
    """The driver asks for no recovery action (reset, reboot, drain) on any GPU."""
    series = store.find(gpu_metrics.RECOVERY_ACTION.name)
    if not series:
        return CheckResult(RECOVERY, Status.SKIPPED, "no GPU reports a recovery action (not supported)")
    pending = {
        dict(s.labels).get("gpu", "?"): action_for_recovery(int(s.value))
        for s in series
        if action_for_recovery(int(s.value)) is not XidAction.IGNORE
    }
    if pending:
        text = ", ".join(f"GPU {gpu}: {action}" for gpu, action in sorted(pending.items()))
        return CheckResult(RECOVERY, Status.FAIL, f"recovery action pending ({text})")
    return CheckResult(RECOVERY, Status.PASS, f"no recovery action pending on {len(series)} GPU(s)")


def _clocks(store: Store) -> CheckResult:
    """No clock held down by a hardware slowdown (HW slowdown, HW thermal, power brake)."""
    held: dict[str, list[str]] = {}
    seen = False
    for series in store.find(gpu_metrics.CLOCK_EVENT.name):
        seen = True
        labels = dict(series.labels)
        if labels.get("reason") in HARDWARE_SLOWDOWNS and series.value:
            held.setdefault(labels.get("gpu", "?"), []).append(labels["reason"])
    if not seen:
        return CheckResult(CLOCKS, Status.SKIPPED, "clock event reasons not supported")
    if held:
        text = "; ".join(f"GPU {g}: {','.join(r)}" for g, r in sorted(held.items()))
        return CheckResult(CLOCKS, Status.FAIL, f"clocks held down by hardware ({text})")
    return CheckResult(CLOCKS, Status.PASS, "no hardware slowdown")

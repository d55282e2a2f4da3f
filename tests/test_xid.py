"""XIDs from NVML events and the kernel log: catalog, dedupe, kmsg parsing and the exported counters."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from gpu_support import FIXTURES, collect_into
from trainwarden import nvml
from trainwarden.collectors.base import CollectorContext, RankIdentity
from trainwarden.collectors.gpu import GpuCollector, GpuOptions
from trainwarden.collectors.kmsg import (
    KmsgCollector,
    KmsgOptions,
    KmsgParseError,
    OomKill,
    XidLine,
    parse_message,
    parse_record,
)
from trainwarden.collectors.xid import XidCollector
from trainwarden.config import CollectorOptions
from trainwarden.errors import CollectorUnavailableError
from trainwarden.paths import HostPaths
from trainwarden.testing import FakeNvml
from trainwarden.xid_catalog import (
    XidAction,
    action_for_recovery,
    catalog,
    describe,
    recommended_action,
    strongest,
)
from trainwarden.xid_ledger import XidLedger, XidReport, XidSource, normalize_pci_bus_id

CAPTURE = FIXTURES / "kmsg" / "h100-incident.txt"


# --- catalog --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("xid", "action"),
    [
        (13, XidAction.RESTART_JOB),
        (31, XidAction.RESTART_JOB),
        (45, XidAction.IGNORE),
        (48, XidAction.RESET_GPU),
        (64, XidAction.DRAIN),
        (79, XidAction.REBOOT),
        (94, XidAction.RESTART_JOB),
        (95, XidAction.RESET_GPU),
        (119, XidAction.RESET_GPU),
        (120, XidAction.RESET_GPU),
    ],
)
def test_catalog_maps_xids_to_nvidias_recommended_action(xid: int, action: XidAction) -> None:
    """Well-known XIDs map to NVIDIA's immediate action in trainwarden's five actions."""
    assert recommended_action(xid) is action


def test_unknown_xid_restarts_the_job_and_says_it_is_unknown() -> None:
    """An XID outside the catalog is a job restart, flagged known=False so people can see it was a guess."""
    info = describe(4242)
    assert info.action is XidAction.RESTART_JOB
    assert not info.known


def test_recovery_action_and_strongest() -> None:
    """The driver's recovery-action codes map to actions, and `strongest` picks the most drastic."""
    assert action_for_recovery(0) is XidAction.IGNORE
    assert action_for_recovery(2) is XidAction.REBOOT
    assert action_for_recovery(3) is XidAction.DRAIN
    assert strongest([XidAction.RESTART_JOB, XidAction.REBOOT, XidAction.RESET_GPU]) is XidAction.REBOOT
    assert strongest([]) is XidAction.IGNORE


# --- ledger ---------------------------------------------------------------------------------------


def test_pci_ids_from_nvml_and_the_kernel_log_normalise_alike() -> None:
    """NVML's `00000000:3A:00.0` and the kernel's `PCI:0000:3a:00` name the same GPU."""
    assert normalize_pci_bus_id("00000000:3A:00.0") == normalize_pci_bus_id("PCI:0000:3a:00") == "0000:3a:00"


def test_one_incident_seen_by_both_sources_counts_once() -> None:
    """NVML then kmsg for the same GPU and XID within the window is one incident, recorded as a duplicate."""
    ledger = XidLedger(dedupe_seconds=30)
    ledger.set_gpus({"00000000:3A:00.0": 2})
    assert ledger.record(XidReport(XidSource.NVML, 48, 100.0, gpu_index=2))
    assert not ledger.record(XidReport(XidSource.KMSG, 48, 104.0, pci_bus_id="0000:3a:00"))
    assert ledger.counts() == {("2", 48): 1}
    assert ledger.duplicates == 1
    assert ledger.reports_by_source() == {XidSource.NVML: 1, XidSource.KMSG: 1}


def test_repeats_from_one_source_and_late_copies_both_count() -> None:
    """Two kmsg lines are two incidents; a copy arriving after the window is a new incident too."""
    ledger = XidLedger(dedupe_seconds=10)
    ledger.record(XidReport(XidSource.KMSG, 13, 0.0, gpu_index=7))
    ledger.record(XidReport(XidSource.KMSG, 13, 1.0, gpu_index=7))
    ledger.record(XidReport(XidSource.NVML, 13, 50.0, gpu_index=7))
    assert ledger.counts() == {("7", 13): 3}
    assert ledger.duplicates == 0


def test_unmapped_pci_id_is_its_own_label() -> None:
    """Without the GPU collector's mapping, a kmsg XID is labelled by its PCI id rather than dropped."""
    ledger = XidLedger()
    ledger.record(XidReport(XidSource.KMSG, 79, 0.0, pci_bus_id="0000:5d:00"))
    assert ledger.counts() == {("0000:5d:00", 79): 1}


# --- kmsg parsing ---------------------------------------------------------------------------------


def test_parse_record_and_messages() -> None:
    """A kmsg record splits into priority/sequence/time/text; XID and OOM lines are recognised."""
    record = parse_record(
        "4,10212,18122334501,-;NVRM: Xid (PCI:0000:3a:00): 79, pid=41003, name=python, fell off"
    )
    assert record is not None
    assert (record.priority, record.sequence, record.usec) == (4, 10212, 18122334501)
    event = parse_message(record.message)
    assert event == XidLine("0000:3a:00", 79, 41003, record.message)
    oom = parse_message("Memory cgroup out of memory: Killed process 41004 (python) total-vm:1kB")
    assert oom == OomKill(41004, "python", cgroup=True)
    assert parse_message("nvidia-nvswitch0: open (major=509)") is None
    assert parse_record(" SUBSYSTEM=pci") is None


def test_xid_line_without_pid_and_with_a_pci_function() -> None:
    """Older drivers omit pid= and some print the PCI function; both still parse."""
    event = parse_message(
        "NVRM: Xid (PCI:0000:b3:00.0): 48, An uncorrectable double bit error (DBE) has been detected"
    )
    assert isinstance(event, XidLine)
    assert (event.pci_bus_id, event.xid, event.pid) == ("0000:b3:00.0", 48, None)


@pytest.mark.parametrize(
    "text",
    ["not a record", "4,x,1,-;text"],
)
def test_malformed_records_raise_a_parse_error(text: str) -> None:
    """Text that is not a kmsg record is rejected with what was seen."""
    with pytest.raises(KmsgParseError, match="not a kmsg record"):
        parse_record(text)


def test_an_xid_line_without_a_number_is_a_parse_error() -> None:
    """A garbled NVRM Xid line is reported rather than counted under a made-up XID."""
    with pytest.raises(KmsgParseError, match="XID line"):
        parse_message("NVRM: Xid (PCI:0000:5d:00): , malformed driver line")


# --- the kmsg collector ---------------------------------------------------------------------------


def kmsg_collector(
    tmp_path: Path, context_kwargs: dict[str, object] | None = None
) -> tuple[KmsgCollector, Path]:
    dev = tmp_path / "dev"
    dev.mkdir()
    log = dev / "kmsg"
    log.write_text("6,1,1,-;old line from before the daemon started\n")
    context = CollectorContext(paths=HostPaths(devfs=dev), clock=lambda: 1000.0, **context_kwargs or {})  # type: ignore[arg-type]
    collector = KmsgCollector(KmsgOptions(), context)
    collector.start()
    return collector, log


def test_kmsg_collector_reads_only_new_records(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Records from before start are skipped; the capture yields its XIDs, OOM kills and parse errors."""
    pid_owners_context = CollectorContext()
    pid_owners_context.pid_owners.set(41004, RankIdentity("llm", 3, 3))
    collector, log = kmsg_collector(tmp_path, {"pid_owners": pid_owners_context.pid_owners})
    caplog.set_level(logging.WARNING)
    try:
        with log.open("a") as handle:
            handle.write(CAPTURE.read_text())
        reg = collect_into(collector)
    finally:
        collector.close()
    ledger = collector.context.xid_ledger
    assert ledger.counts() == {
        ("0000:3a:00", 79): 1,
        ("0000:18:00", 119): 1,
        ("0000:9a:00", 94): 1,
        ("0000:db:00", 13): 2,
    }
    oom = "trainwarden_kernel_oom_kills_total"
    assert reg.get_sample_value(oom, {"scope": "cgroup", "job": "llm", "rank": "3"}) == 1
    assert reg.get_sample_value(oom, {"scope": "system", "job": "", "rank": ""}) == 1
    assert reg.get_sample_value("trainwarden_kmsg_parse_errors_total", {}) == 2
    assert reg.get_sample_value("trainwarden_kmsg_records_total", {}) == 13
    assert any(
        "OOM killer killed pid 41004 (python), rank 3 of job llm" in r.getMessage() for r in caplog.records
    )


def test_kmsg_partial_lines_wait_for_their_end(tmp_path: Path) -> None:
    """A record written in two pieces is parsed once, when complete."""
    collector, log = kmsg_collector(tmp_path)
    try:
        with log.open("a") as handle:
            handle.write("4,5,6,-;NVRM: Xid (PCI:0000:18:00): 3")
        collect_into(collector)
        assert collector.context.xid_ledger.counts() == {}
        with log.open("a") as handle:
            handle.write("1, pid=1, name=x, something\n")
        collect_into(collector)
    finally:
        collector.close()
    assert collector.context.xid_ledger.counts() == {("0000:18:00", 31): 1}


def test_missing_kmsg_disables_the_collector(tmp_path: Path) -> None:
    """Without a readable kmsg the collector is unavailable, with the path and reason in the message."""
    collector = KmsgCollector(KmsgOptions(), CollectorContext(paths=HostPaths(devfs=tmp_path)))
    with pytest.raises(CollectorUnavailableError, match=r"kmsg: No such file"):
        collector.start()


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK), reason="/dev/kmsg is not readable here")
def test_real_dev_kmsg_opens_at_the_end_and_never_blocks() -> None:
    """On the real device, start() seeks past history and a collection returns without blocking."""
    collector = KmsgCollector(KmsgOptions(), CollectorContext())
    collector.start()
    try:
        assert collector._is_device
        samples = list(collector.collect())
    finally:
        collector.close()
    records = next(s.value for s in samples if s.spec.name == "trainwarden_kmsg_records_total")
    assert records < 1000  # history was skipped; only what the kernel logged since start() is read


def test_kmsg_options_reject_a_zero_bound() -> None:
    """max_records_per_run must be positive; the config loader reports the key."""
    assert ("max_records_per_run", "must be >= 1") in KmsgOptions(max_records_per_run=0).problems()
    assert isinstance(KmsgOptions(), CollectorOptions)


# --- both sources together, exported --------------------------------------------------------------


def test_nvml_event_and_kernel_line_for_one_xid_export_one_count(tmp_path: Path) -> None:
    """XID 48 from both NVML's event thread and the kernel log is exported once, labelled by GPU index."""
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "kmsg").write_text("")
    context = CollectorContext(paths=HostPaths(devfs=dev))
    fake = FakeNvml.shipped("h100-sxm-8gpu")
    gpu = GpuCollector(GpuOptions(event_poll_ms=50), context, fake)
    kmsg = KmsgCollector(KmsgOptions(), context)
    xid = XidCollector(CollectorOptions(), context)
    gpu.start()
    kmsg.start()
    try:
        fake.emit_event(2, nvml.EVENT_XID_CRITICAL, 48)
        deadline = time.monotonic() + 10
        while not context.xid_ledger.counts() and time.monotonic() < deadline:
            time.sleep(0.01)
        with (dev / "kmsg").open("a") as handle:
            handle.write("4,9,9,-;NVRM: Xid (PCI:0000:3a:00): 48, An uncorrectable double bit error (DBE)\n")
            handle.write("4,10,10,-;NVRM: Xid (PCI:0000:3a:00): 119, pid=1, name=python, GSP timeout\n")
        collect_into(kmsg)
        reg = collect_into(xid)
    finally:
        kmsg.close()
        gpu.close()
    assert reg.get_sample_value("trainwarden_gpu_xid_errors_total", {"gpu": "2", "xid": "48"}) == 1
    assert reg.get_sample_value("trainwarden_gpu_xid_errors_total", {"gpu": "2", "xid": "119"}) == 1
    assert reg.get_sample_value("trainwarden_gpu_xid_actions_total", {"gpu": "2", "action": "reset_gpu"}) == 2
    assert reg.get_sample_value("trainwarden_gpu_xid_actions_total", {"gpu": "5", "action": "reboot"}) == 0
    assert reg.get_sample_value("trainwarden_gpu_xid_reports_total", {"source": "kmsg"}) == 2
    assert reg.get_sample_value("trainwarden_gpu_xid_reports_total", {"source": "nvml"}) == 1
    assert reg.get_sample_value("trainwarden_gpu_xid_duplicate_reports_total", {}) == 1
    assert [r["xid"] for r in xid.status()["recent"]] == [48, 119]


def test_xid_counter_is_a_counter_not_a_gauge() -> None:
    """The exported XID family is typed counter (a sticky last-value gauge would hide repeats)."""
    context = CollectorContext()
    context.xid_ledger.record(XidReport(XidSource.KMSG, 79, 0.0, gpu_index=0))
    reg = collect_into(XidCollector(CollectorOptions(), context))
    family = next(f for f in reg.collect() if f.name == "trainwarden_gpu_xid_errors")
    assert family.type == "counter"


def test_the_capture_matches_the_h100_snapshot() -> None:
    """Every PCI id in the kmsg capture is a GPU of the h100-sxm-8gpu snapshot, so the two fixtures agree."""
    fake = FakeNvml.shipped("h100-sxm-8gpu")
    fake.init()
    known = {
        normalize_pci_bus_id(fake.device_get_pci_bus_id(fake.device_get_handle_by_index(i))) for i in range(8)
    }
    seen = {
        normalize_pci_bus_id(event.pci_bus_id)
        for line in CAPTURE.read_text().splitlines()
        if "NVRM: Xid" in line and ": ," not in line
        for event in [parse_message(line.split(";", 1)[1])]
        if isinstance(event, XidLine)
    }
    assert seen
    assert seen <= known


def test_docs_list_every_catalog_entry_with_its_action() -> None:
    """docs/METRICS.md's XID table lists every catalog XID with the same action as the code."""
    docs = (Path(__file__).parent.parent / "docs" / "METRICS.md").read_text()
    for xid, info in catalog().items():
        assert f"| {xid} | {info.name} | `{info.action}` |" in docs, xid


def test_an_oom_killed_rank_is_attributed_after_its_pid_was_forgotten(tmp_path: Path) -> None:
    """The rank's connection closes before the kernel line is read; the kill still names its job and rank."""
    owners_context = CollectorContext()
    owners = owners_context.pid_owners
    owners.set(41004, RankIdentity("llm", 3, 3))
    collector, log = kmsg_collector(tmp_path, {"pid_owners": owners})
    try:
        collect_into(collector)  # the rank is alive during this run
        owners.forget(41004)  # it is OOM-killed; the training collector drops its pid
        with log.open("a") as handle:
            handle.write("3,9,9,-;Memory cgroup out of memory: Killed process 41004 (python) total-vm:1kB\n")
        reg = collect_into(collector)
    finally:
        collector.close()
    labels = {"scope": "cgroup", "job": "llm", "rank": "3"}
    assert reg.get_sample_value("trainwarden_kernel_oom_kills_total", labels) == 1

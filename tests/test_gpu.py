"""The GPU collector on FakeNvml snapshots: values, unsupported fields, a lost GPU, no driver, ranks."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from gpu_support import FIXTURES, check_golden, collect_into, exposition
from trainwarden import nvml
from trainwarden.collectors.base import CollectorContext, RankIdentity
from trainwarden.collectors.gpu import GpuCollector, GpuOptions
from trainwarden.errors import CollectorUnavailableError
from trainwarden.testing import FakeNvml
from trainwarden.xid_catalog import XidAction, action_for_recovery

H100 = {"gpu": "0", "uuid": "GPU-6c1f3a2e-8d4b-4f0e-9a51-0b7e2d3c4f10", "model": "NVIDIA H100 80GB HBM3"}
SHIPPED = ["h100-sxm-8gpu", "a100-sxm4-4gpu", "t4-not-supported", "h100-lost-gpu"]


def started(
    fixture: str, context: CollectorContext | None = None, **options: object
) -> tuple[GpuCollector, FakeNvml]:
    fake = FakeNvml.shipped(fixture)
    collector = GpuCollector(GpuOptions(**options), context or CollectorContext(), fake)  # type: ignore[arg-type]
    collector.start()
    return collector, fake


@pytest.fixture
def h100() -> tuple[GpuCollector, FakeNvml]:
    collector, fake = started("h100-sxm-8gpu", events=False)
    yield collector, fake
    collector.close()


def test_h100_values_are_in_base_units(h100: tuple[GpuCollector, FakeNvml]) -> None:
    """Percent becomes a 0-1 ratio, mW watts, mJ joules, MHz hertz, and memory stays in bytes."""
    collector, _ = h100
    reg = collect_into(collector)
    assert reg.get_sample_value("trainwarden_gpu_up", H100) == 1
    assert reg.get_sample_value("trainwarden_gpu_utilization_ratio", H100) == pytest.approx(0.96)
    assert reg.get_sample_value("trainwarden_gpu_power_watts", H100) == pytest.approx(612.0)
    assert reg.get_sample_value("trainwarden_gpu_energy_joules_total", H100) == pytest.approx(1_843_217.455)
    assert reg.get_sample_value("trainwarden_gpu_clock_hertz", {**H100, "clock": "sm"}) == 1980e6
    assert reg.get_sample_value("trainwarden_gpu_memory_total_bytes", H100) == 81559 * 2**20
    assert reg.get_sample_value("trainwarden_gpu_temperature_celsius", {**H100, "sensor": "memory"}) == 41
    assert (
        reg.get_sample_value("trainwarden_gpu_pcie_bytes_total", {**H100, "direction": "rx"})
        == 3_456_789_012_345
    )
    assert reg.get_sample_value("trainwarden_gpu_recovery_action", H100) == 0


def test_throttle_reasons_are_labelled_flags(h100: tuple[GpuCollector, FakeNvml]) -> None:
    """Each clock-event reason is its own 0/1 series; GPU 5 shows its software power cap."""
    reg = collect_into(h100[0])
    gpu5 = {"gpu": "5", "uuid": "GPU-5a7c9e1b-4f6a-4b8c-8d3e-5f7a9b1c3d65", "model": "NVIDIA H100 80GB HBM3"}
    assert (
        reg.get_sample_value("trainwarden_gpu_clock_event_reason_active", {**gpu5, "reason": "sw_power_cap"})
        == 1
    )
    assert (
        reg.get_sample_value("trainwarden_gpu_clock_event_reason_active", {**gpu5, "reason": "hw_slowdown"})
        == 0
    )
    assert (
        reg.get_sample_value("trainwarden_gpu_clock_event_reason_active", {**H100, "reason": "sw_power_cap"})
        == 0
    )


def test_ecc_counters_by_type_and_scope(h100: tuple[GpuCollector, FakeNvml]) -> None:
    """ECC errors come out as counters split corrected/uncorrected and volatile/aggregate."""
    reg = collect_into(h100[0])
    gpu2 = {"gpu": "2", "uuid": "GPU-b2d4c6e8-1a3b-4c5d-9e7f-2a4b6c8d0e32", "model": "NVIDIA H100 80GB HBM3"}
    labels = {**gpu2, "type": "corrected", "counter": "aggregate"}
    assert reg.get_sample_value("trainwarden_gpu_ecc_errors_total", labels) == 2
    assert reg.get_sample_value("trainwarden_gpu_ecc_errors_total", {**labels, "counter": "volatile"}) == 0


def test_process_memory_is_tied_to_the_owning_rank() -> None:
    """GPU memory of a known training pid is labelled with its job and rank; the rest is unowned."""
    context = CollectorContext()
    context.pid_owners.set(41001, RankIdentity("llm", 0, 0))
    collector, _ = started("h100-sxm-8gpu", context, events=False)
    try:
        reg = collect_into(collector)
    finally:
        collector.close()
    owned = reg.get_sample_value("trainwarden_gpu_process_memory_bytes", {**H100, "job": "llm", "rank": "0"})
    assert owned == 74 * 2**30 - 520 * 2**20
    assert reg.get_sample_value("trainwarden_gpu_unowned_process_memory_bytes", H100) == 0
    gpu1 = {"gpu": "1", "uuid": "GPU-0a9e7b21-5c33-4d7a-8e62-1f4b9c8d7e21", "model": "NVIDIA H100 80GB HBM3"}
    assert reg.get_sample_value("trainwarden_gpu_unowned_process_memory_bytes", gpu1) > 0
    assert reg.get_sample_value("trainwarden_gpu_processes", gpu1) == 1


def test_unsupported_fields_are_skipped_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A T4 lacks NVLink, row remapping and memory temperature: those series are absent, each logged once."""
    collector, _ = started("t4-not-supported", events=False)
    caplog.set_level(logging.INFO, logger="trainwarden.collectors.gpu")
    try:
        reg = collect_into(collector)
        collect_into(collector)
    finally:
        collector.close()
    t4 = {"gpu": "0", "uuid": "GPU-9a8b7c6d-5e4f-4321-9876-0fedcba98765", "model": "Tesla T4"}
    assert reg.get_sample_value("trainwarden_gpu_up", t4) == 1
    assert reg.get_sample_value("trainwarden_gpu_nvlink_errors_total", {**t4, "type": "replay"}) is None
    assert reg.get_sample_value("trainwarden_gpu_remapped_rows_total", {**t4, "cause": "correctable"}) is None
    assert reg.get_sample_value("trainwarden_gpu_energy_joules_total", t4) is None
    assert reg.get_sample_value("trainwarden_gpu_retired_pages_total", {**t4, "cause": "double_bit_ecc"}) == 0
    assert (
        reg.get_sample_value("trainwarden_gpu_pcie_throughput_bytes_per_second", {**t4, "direction": "rx"})
        == 1_003_000
    )
    lines = [r.getMessage() for r in caplog.records if "not supported" in r.getMessage()]
    assert sum("remapped rows" in line for line in lines) == 1
    assert "gpu 0: memory temperature" in collector.status()["unsupported"]
    assert (
        reg.get_sample_value("trainwarden_gpu_query_errors_total", {"gpu": "0", "error": "not_supported"})
        is None
    )


def test_a_gpu_lost_mid_run_is_down_while_the_others_go_on() -> None:
    """After GPU 3 falls off the bus, it reports up 0 and nothing else, and GPU 4 is still sampled."""
    collector, fake = started("h100-sxm-8gpu", events=False)
    try:
        collect_into(collector)
        fake.set_lost(3)
        reg = collect_into(collector)
    finally:
        collector.close()
    gpu3 = {"gpu": "3", "uuid": "GPU-3e5f7a9b-2c4d-4e6f-8a1b-3c5d7e9f1a43", "model": "NVIDIA H100 80GB HBM3"}
    gpu4 = {"gpu": "4", "uuid": "GPU-c4e6a8b0-3d5f-4a7b-9c2d-4e6f8a0b2c54", "model": "NVIDIA H100 80GB HBM3"}
    assert reg.get_sample_value("trainwarden_gpu_up", gpu3) == 0
    assert reg.get_sample_value("trainwarden_gpu_power_watts", gpu3) is None
    assert reg.get_sample_value("trainwarden_gpu_up", gpu4) == 1
    assert reg.get_sample_value("trainwarden_gpu_power_watts", gpu4) == pytest.approx(624.468)
    assert collector.status()["gpus"][3]["lost"] is True


def test_a_gpu_lost_before_start_is_reported_down() -> None:
    """The lost-GPU snapshot starts with GPU 3 already gone: it is exported as down, the other seven up."""
    collector, _ = started("h100-lost-gpu", events=False)
    try:
        reg = collect_into(collector)
    finally:
        collector.close()
    ups = {
        int(s.labels["gpu"]): s.value
        for f in reg.collect()
        for s in f.samples
        if s.name == "trainwarden_gpu_up"
    }
    assert ups == {0: 1, 1: 1, 2: 1, 3: 0, 4: 1, 5: 1, 6: 1, 7: 1}


def test_a_failing_query_is_counted_not_fatal() -> None:
    """A failing query (not 'not supported') is counted by GPU and error; the rest is sampled."""
    collector, fake = started("a100-sxm4-4gpu", events=False)
    fake.set_value(1, "power_usage_mw", {"error": "UNKNOWN"})
    try:
        reg = collect_into(collector)
    finally:
        collector.close()
    gpu1 = {"gpu": "1", "uuid": "GPU-2e3d4c5b-6a79-4887-9695-b4c3d2e1f0a2", "model": "NVIDIA A100-SXM4-80GB"}
    assert reg.get_sample_value("trainwarden_gpu_query_errors_total", {"gpu": "1", "error": "unknown"}) == 1
    assert reg.get_sample_value("trainwarden_gpu_power_watts", gpu1) is None
    assert reg.get_sample_value("trainwarden_gpu_row_remap_pending", gpu1) == 1
    assert reg.get_sample_value("trainwarden_gpu_up", gpu1) == 1


def test_no_driver_fixture_makes_the_collector_unavailable() -> None:
    """With no NVML library, start() raises CollectorUnavailableError naming the cause, so success reads 0."""
    with pytest.raises(CollectorUnavailableError, match="NVML shared library not found"):
        started("no-driver")


def test_real_pynvml_without_a_driver_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """On this GPU-less machine the real pynvml binding fails init with LibraryNotFound → unavailable."""
    monkeypatch.delenv(nvml.FIXTURE_ENV, raising=False)
    if Path("/proc/driver/nvidia").exists():
        pytest.skip("an NVIDIA driver is present")
    collector = GpuCollector(GpuOptions(), CollectorContext())
    with pytest.raises(CollectorUnavailableError, match="library not found"):
        collector.start()


def test_environment_variable_selects_the_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRAINWARDEN_NVML_FIXTURE=<name> makes the collector (as the daemon builds it) run on that snapshot."""
    monkeypatch.setenv(nvml.FIXTURE_ENV, "a100-sxm4-4gpu")
    collector = GpuCollector(GpuOptions(events=False), CollectorContext())
    collector.start()
    try:
        assert [g["model"] for g in collector.status()["gpus"]] == ["NVIDIA A100-SXM4-80GB"] * 4
    finally:
        collector.close()


def test_an_unknown_fixture_name_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixture that is neither a file nor a shipped name disables the collector with the names available."""
    monkeypatch.setenv(nvml.FIXTURE_ENV, "h900")
    collector = GpuCollector(GpuOptions(), CollectorContext())
    with pytest.raises(CollectorUnavailableError, match=r"h900.*shipped: a100-sxm4-4gpu"):
        collector.start()


def test_nvml_xid_event_reaches_the_ledger_through_the_event_thread() -> None:
    """An XID event on GPU 6 arrives on the event thread, is counted per GPU/type and lands in the ledger."""
    context = CollectorContext()
    collector, fake = started("h100-sxm-8gpu", context, event_poll_ms=50)
    try:
        fake.emit_event(6, nvml.EVENT_XID_CRITICAL, 48)
        fake.emit_event(6, nvml.EVENT_DOUBLE_BIT_ECC)
        deadline = time.monotonic() + 10
        while context.xid_ledger.counts() != {("6", 48): 1} and time.monotonic() < deadline:
            time.sleep(0.01)
        reg = collect_into(collector)
    finally:
        collector.close()
    assert context.xid_ledger.counts() == {("6", 48): 1}
    assert reg.get_sample_value("trainwarden_gpu_events_total", {"gpu": "6", "type": "xid"}) == 1
    assert reg.get_sample_value("trainwarden_gpu_event_watcher_up", {}) == 1


def test_close_stops_the_event_thread_and_shuts_nvml_down() -> None:
    """close() joins the event thread and releases NVML, so a reload does not leak threads or handles."""
    collector, fake = started("h100-sxm-8gpu", event_poll_ms=50)
    watcher = collector._watcher
    assert watcher is not None
    assert watcher.running
    collector.close()
    assert not watcher.running
    assert fake.calls["shutdown"] == 1
    assert fake.calls["event_set_free"] == 1


def test_events_register_only_supported_types() -> None:
    """The A100 snapshot lacks the recovery-action event, so it is left out of the registered mask."""
    collector, _ = started("a100-sxm4-4gpu", event_poll_ms=50)
    try:
        registered = collector._watcher.registered if collector._watcher else {}
    finally:
        collector.close()
    assert registered[0] & nvml.EVENT_XID_CRITICAL
    assert not registered[0] & nvml.EVENT_GPU_RECOVERY_ACTION


@pytest.mark.parametrize("fixture", SHIPPED)
def test_golden_exposition(fixture: str, update_golden: bool) -> None:
    """Each shipped snapshot renders exactly its committed exposition (tests/fixtures/gpu/<name>.prom)."""
    context = CollectorContext()
    for rank in range(8):
        context.pid_owners.set(41001 + rank, RankIdentity("llm", rank, rank))
    collector, _ = started(fixture, context, events=False)
    try:
        text = exposition(collect_into(collector))
    finally:
        collector.close()
    check_golden(FIXTURES / "gpu" / f"{fixture}.prom", text, update_golden)


def test_a_reset_gpu_is_sampled_again() -> None:
    """A lost GPU that answers again (after a GPU reset) goes back to up 1 with its full series."""
    collector, fake = started("h100-sxm-8gpu", events=False)
    gpu3 = {"gpu": "3", "uuid": "GPU-3e5f7a9b-2c4d-4e6f-8a1b-3c5d7e9f1a43", "model": "NVIDIA H100 80GB HBM3"}
    try:
        fake.set_lost(3)
        assert collect_into(collector).get_sample_value("trainwarden_gpu_up", gpu3) == 0
        fake.set_lost(3, lost=False)
        reg = collect_into(collector)
    finally:
        collector.close()
    assert reg.get_sample_value("trainwarden_gpu_up", gpu3) == 1
    assert reg.get_sample_value("trainwarden_gpu_power_watts", gpu3) == pytest.approx(621.351)


def test_a_gpu_lost_at_start_gets_its_identity_when_it_answers() -> None:
    """A GPU lost before start has empty uuid/model; once it answers, its series carry its real identity."""
    collector, fake = started("h100-lost-gpu", events=False)
    try:
        down = collect_into(collector)
        fake.set_lost(3, lost=False)
        up = collect_into(collector)
    finally:
        collector.close()
    assert down.get_sample_value("trainwarden_gpu_up", {"gpu": "3", "uuid": "", "model": ""}) == 0
    gpu3 = {"gpu": "3", "uuid": "GPU-3e5f7a9b-2c4d-4e6f-8a1b-3c5d7e9f1a43", "model": "NVIDIA H100 80GB HBM3"}
    assert up.get_sample_value("trainwarden_gpu_up", gpu3) == 1
    assert up.get_sample_value("trainwarden_gpu_up", {"gpu": "3", "uuid": "", "model": ""}) is None


def test_a_corrupt_fixture_disables_the_collector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TRAINWARDEN_NVML_FIXTURE that is not valid JSON makes the collector unavailable, naming the file."""
    bad = tmp_path / "broken.json"
    bad.write_text("{")
    monkeypatch.setenv(nvml.FIXTURE_ENV, str(bad))
    with pytest.raises(CollectorUnavailableError, match=r"broken\.json: NVML fixture is not JSON"):
        GpuCollector(GpuOptions(), CollectorContext()).start()


def test_gpu_lost_reported_inside_field_values_marks_it_down() -> None:
    """A GPU_IS_LOST in one field's own return code takes that GPU down like a failed call would."""
    collector, fake = started("h100-sxm-8gpu", events=False)
    fake.set_field(1, nvml.FI_PCIE_REPLAY_COUNTER, "GPU_IS_LOST")
    try:
        reg = collect_into(collector)
    finally:
        collector.close()
    gpu1 = {"gpu": "1", "uuid": "GPU-0a9e7b21-5c33-4d7a-8e62-1f4b9c8d7e21", "model": "NVIDIA H100 80GB HBM3"}
    assert reg.get_sample_value("trainwarden_gpu_up", gpu1) == 0
    assert reg.get_sample_value("trainwarden_gpu_up", H100) == 1


def test_recovery_action_from_the_driver_is_exported() -> None:
    """The driver's recovery-action field is exported as its code; the catalog maps it to an action."""
    collector, fake = started("h100-sxm-8gpu", events=False)
    fake.set_field(0, nvml.FI_GET_GPU_RECOVERY_ACTION, 2)
    try:
        value = collect_into(collector).get_sample_value("trainwarden_gpu_recovery_action", H100)
    finally:
        collector.close()
    assert value == 2
    assert action_for_recovery(int(value)) is XidAction.REBOOT

"""The InfiniBand/RoCE collector on sysfs fixture trees (tests/fixtures/infiniband/<case>/sys)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_support import FIXTURES, check_golden, collect_into, exposition
from trainwarden.collectors.base import CollectorContext
from trainwarden.collectors.infiniband import InfinibandCollector, parse_counter, parse_rate, parse_state
from trainwarden.config import CollectorOptions
from trainwarden.paths import HostPaths

CASES = FIXTURES / "infiniband"


def collector_on(sysfs: Path) -> InfinibandCollector:
    return InfinibandCollector(CollectorOptions(), CollectorContext(paths=HostPaths(sysfs=sysfs)))


def test_data_counters_are_words_times_four() -> None:
    """port_xmit_data/port_rcv_data count 4-byte words; the exported counters are bytes."""
    reg = collect_into(collector_on(CASES / "ndr_4port" / "sys"))
    port = {"device": "mlx5_0", "port": "1"}
    assert (
        reg.get_sample_value("trainwarden_infiniband_port_transmitted_bytes_total", port)
        == 4 * 3_912_334_455_123
    )
    assert (
        reg.get_sample_value("trainwarden_infiniband_port_received_bytes_total", port)
        == 4 * 3_899_112_233_456
    )
    assert (
        reg.get_sample_value("trainwarden_infiniband_port_transmitted_packets_total", port) == 12_884_901_888
    )


def test_port_state_rate_and_up() -> None:
    """An active NDR port is up at 50 GB/s; a disabled one is down and carries its link errors."""
    reg = collect_into(collector_on(CASES / "ndr_4port" / "sys"))
    good = {"device": "mlx5_0", "port": "1"}
    bad = {"device": "mlx5_3", "port": "1"}
    assert reg.get_sample_value("trainwarden_infiniband_port_up", good) == 1
    assert reg.get_sample_value("trainwarden_infiniband_port_rate_bytes_per_second", good) == 400e9 / 8
    assert reg.get_sample_value("trainwarden_infiniband_port_state", bad) == 1
    assert reg.get_sample_value("trainwarden_infiniband_port_physical_state", bad) == 3
    assert reg.get_sample_value("trainwarden_infiniband_port_up", bad) == 0
    assert reg.get_sample_value("trainwarden_infiniband_port_link_downed_total", bad) == 3
    assert reg.get_sample_value("trainwarden_infiniband_port_symbol_errors_total", bad) == 12
    assert reg.get_sample_value("trainwarden_infiniband_port_info", {**good, "link_layer": "InfiniBand"}) == 1


def test_unimplemented_counter_is_skipped_and_garbage_is_counted() -> None:
    """`N/A (no PMA)` is silently absent; a non-numeric counter is absent and counted as a parse error."""
    collector = collector_on(CASES / "ndr_4port" / "sys")
    reg = collect_into(collector)
    port = {"device": "mlx5_2", "port": "1"}
    assert reg.get_sample_value("trainwarden_infiniband_port_buffer_overrun_errors_total", port) is None
    assert reg.get_sample_value("trainwarden_infiniband_port_local_link_integrity_errors_total", port) is None
    assert reg.get_sample_value("trainwarden_host_parse_errors_total", {"collector": "infiniband"}) == 1
    assert "local_link_integrity_errors" in collector.status()["recent_parse_problems"][0]


def test_roce_hw_counters_follow_the_allowlist() -> None:
    """RoCE hw_counters in the allowlist are exported by name; others (rx_write_requests) are not."""
    reg = collect_into(collector_on(CASES / "roce_bond" / "sys"))
    port = {"device": "mlx5_bond_0", "port": "1"}
    hw = "trainwarden_infiniband_hw_events_total"
    assert reg.get_sample_value(hw, {**port, "event": "np_cnp_sent"}) == 1234
    assert reg.get_sample_value(hw, {**port, "event": "out_of_buffer"}) == 17
    assert reg.get_sample_value(hw, {**port, "event": "rx_write_requests"}) is None
    assert reg.get_sample_value("trainwarden_infiniband_port_info", {**port, "link_layer": "Ethernet"}) == 1


def test_a_host_without_infiniband_exports_only_the_error_counter(tmp_path: Path) -> None:
    """No /sys/class/infiniband: the collector succeeds with no port series (no failure, no log line)."""
    samples = list(collector_on(tmp_path).collect())
    assert [s.spec.name for s in samples] == ["trainwarden_host_parse_errors_total"]


def test_a_port_appearing_later_is_picked_up(tmp_path: Path) -> None:
    """The class directory is looked up every run, so an HCA driver loaded after start is collected."""
    collector = collector_on(tmp_path)
    assert len(list(collector.collect())) == 1
    port = tmp_path / "class" / "infiniband" / "mlx5_0" / "ports" / "1"
    (port / "counters").mkdir(parents=True)
    (port / "state").write_text("4: ACTIVE\n")
    (port / "phys_state").write_text("5: LinkUp\n")
    (port / "counters" / "link_downed").write_text("0\n")
    reg = collect_into(collector)
    assert reg.get_sample_value("trainwarden_infiniband_port_up", {"device": "mlx5_0", "port": "1"}) == 1


@pytest.mark.parametrize(
    ("parse", "text", "value", "problems"),
    [
        (parse_state, "4: ACTIVE\n", 4, 0),
        (parse_state, "ACTIVE", None, 1),
        (parse_rate, "400 Gb/sec (4X NDR)\n", 50e9, 0),
        (parse_rate, "2.5 Gb/sec (1X SDR)", 2.5e9 / 8, 0),
        (parse_rate, "fast", None, 1),
        (parse_counter, "18446744073709551615\n", 18446744073709551615, 0),
        (parse_counter, "N/A (no PMA)\n", None, 0),
        (parse_counter, "-1", None, 1),
    ],
)
def test_parsers(parse: object, text: str, value: float | None, problems: int) -> None:
    """Each sysfs value format parses, and malformed text is a reported problem, not an exception."""
    assert callable(parse)
    parsed = parse(text)
    assert parsed.value == value
    assert len(parsed.problems) == problems


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if (p / "sys").is_dir()))
def test_golden_exposition(case: str, update_golden: bool) -> None:
    """Each sysfs case renders exactly its committed expected.prom."""
    text = exposition(collect_into(collector_on(CASES / case / "sys")))
    check_golden(CASES / case / "expected.prom", text, update_golden)

"""`trainwarden preflight` on fixture nodes: each injected fault fails its check, a healthy node passes."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from preflight_support import UPTIME_SECONDS, FixtureNode, healthy_node
from trainwarden.daemon import cli
from trainwarden.journal import JOURNAL_NAME, Journal
from trainwarden.preflight.model import GIB, CheckResult, Status
from trainwarden.preflight.record import PreflightRecordError, read_result, result_path
from trainwarden.preflight.runner import FAMILIES, Family, run_preflight


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FixtureNode:
    """A healthy fixture node."""
    return healthy_node(tmp_path, monkeypatch)


def results(node: FixtureNode, **changes: object) -> dict[str, CheckResult]:
    """Run every check on `node`; results by check name."""
    return {c.check: c for c in run_preflight(node.options(**changes)).checks}


def argv(node: FixtureNode, *extra: str) -> list[str]:
    """`trainwarden preflight` flags pointing at `node`."""
    return [
        "preflight",
        f"--path.procfs={node.procfs}",
        f"--path.sysfs={node.sysfs}",
        f"--path.devfs={node.devfs}",
        f"--state-dir={node.state_dir}",
        f"--checkpoint-dir={node.checkpoints}",
        "--min-free-gib=0.001",
        "--write-probe-mib=1",
        "--min-write-mib-per-second=0",
        "--daemon-url=http://127.0.0.1:9",
        "--node=fixture-node",
        *extra,
    ]


def test_healthy_node_passes_every_check(node: FixtureNode) -> None:
    """On a healthy node every check passes (only the absent daemon and the opt-in collective skip)."""
    report = run_preflight(node.options())
    by_name = {c.check: c for c in report.checks}
    assert report.healthy
    assert {name for family in FAMILIES for name in family.names} == set(by_name)
    assert {n for n, c in by_name.items() if c.status is not Status.PASS} == {"daemon", "collective"}
    assert by_name["daemon"].status is Status.SKIPPED
    assert by_name["collective"].status is Status.SKIPPED
    assert "8 GPU(s) answer NVML" in by_name["gpu_nvml"].reason
    assert "FAKE NVML" in by_name["gpu_nvml"].reason
    assert "4 port(s) active at 400 Gb/s" in by_name["infiniband_links"].reason


def test_lost_gpu_fails_and_exits_nonzero_with_the_reason(
    node: FixtureNode, capsys: pytest.CaptureFixture[str]
) -> None:
    """A GPU that fell off the bus fails gpu_nvml; the command exits 1 and names the GPU on stderr."""
    node.use_nvml("h100-lost-gpu")
    assert cli.main(argv(node)) == 1
    out, err = capsys.readouterr()
    assert "FAIL    gpu_nvml:" in out
    assert "GPU 3 is lost" in err


def test_fewer_gpus_than_expected_fails(node: FixtureNode) -> None:
    """--expect-gpus 16 on an 8-GPU node fails gpu_nvml with both counts."""
    result = results(node, expect_gpus=16)["gpu_nvml"]
    assert result.status is Status.FAIL
    assert "8 GPU(s) answer, 16 expected" in result.reason


def test_no_nvml_is_skipped_unless_gpus_are_expected(
    node: FixtureNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without NVML the GPU checks are skipped with the reason, but fail when GPUs are expected."""
    monkeypatch.setenv("TRAINWARDEN_NVML_FIXTURE", "no-driver")
    assert results(node)["gpu_nvml"].status is Status.SKIPPED
    expected = results(node, expect_gpus=8)["gpu_nvml"]
    assert expected.status is Status.FAIL
    assert "8 GPU(s) expected" in expected.reason


def test_row_remap_pending_fails_gpu_memory(node: FixtureNode) -> None:
    """The A100 fixture's pending row remap on GPU 1 fails gpu_memory, naming the GPU."""
    node.use_nvml("a100-sxm4-4gpu")
    result = results(node)["gpu_memory"]
    assert result.status is Status.FAIL
    assert "row remap pending on GPU 1" in result.reason


def test_uncorrectable_ecc_since_driver_load_fails(node: FixtureNode) -> None:
    """A volatile double-bit ECC count on GPU 0 fails gpu_memory."""
    node.use_nvml("h100-sxm-8gpu", fields={"4": 2})
    result = results(node)["gpu_memory"]
    assert result.status is Status.FAIL
    assert "uncorrectable ECC since driver load on GPU 0" in result.reason


def test_pending_recovery_action_fails(node: FixtureNode) -> None:
    """The driver asking for a GPU reset (recovery action 1) fails gpu_recovery_action."""
    node.use_nvml("h100-sxm-8gpu", fields={"230": 1})
    result = results(node)["gpu_recovery_action"]
    assert result.status is Status.FAIL
    assert "GPU 0: reset_gpu" in result.reason


def test_hardware_slowdown_fails_but_idle_does_not(node: FixtureNode) -> None:
    """HW slowdown (0x8) holding clocks fails gpu_clocks; an idle GPU (0x1) with a power cap (0x4) passes."""
    node.use_nvml("h100-sxm-8gpu", clocks_event_reasons=0x8)
    held = results(node)["gpu_clocks"]
    assert held.status is Status.FAIL
    assert "hw_slowdown" in held.reason
    node.use_nvml("h100-sxm-8gpu", clocks_event_reasons=0x1 | 0x4)
    assert results(node)["gpu_clocks"].status is Status.PASS


def test_recent_xid_needing_a_reboot_fails(node: FixtureNode) -> None:
    """The captured incident (XID 79, 119 within the last minutes) fails kernel_xid with the action."""
    node.kmsg.write_text(Path(__file__).parent.joinpath("fixtures/kmsg/h100-incident.txt").read_text())
    result = results(node)["kernel_xid"]
    assert result.status is Status.FAIL
    assert "XID 79" in result.reason
    assert "reboot" in result.reason


def test_xid_restart_job_or_old_xid_does_not_fail(node: FixtureNode) -> None:
    """XID 13 (restart the job) passes, and an XID 79 older than the lookback does not count."""
    old_usec = int((UPTIME_SECONDS - 7200) * 1e6)
    recent_usec = int((UPTIME_SECONDS - 10) * 1e6)
    node.kernel_log(
        f"4,90001,{recent_usec},-;NVRM: Xid (PCI:0000:18:00): 13, pid=1, name=python, Graphics Exception",
        f"4,90002,{old_usec},-;NVRM: Xid (PCI:0000:3a:00): 79, pid=2, name=python, fallen off the bus.",
    )
    result = results(node)["kernel_xid"]
    assert result.status is Status.PASS, result.reason
    assert result.detail["recent_xids"] == 1.0
    assert results(node, xid_lookback_seconds=3 * 3600)["kernel_xid"].status is Status.FAIL


def test_unreadable_kernel_log_is_skipped_with_the_reason(node: FixtureNode) -> None:
    """No kernel log at the configured devfs: kernel_xid is skipped and says which file."""
    node.kmsg.unlink()
    result = results(node)["kernel_xid"]
    assert result.status is Status.SKIPPED
    assert str(node.kmsg) in result.reason


def test_port_down_or_slow_fails_links(node: FixtureNode) -> None:
    """A DOWN port fails infiniband_links; so does an active port below the rate floor."""
    node.ib_port("mlx5_3", "1: DOWN", "3: Disabled")
    down = results(node)["infiniband_links"]
    assert down.status is Status.FAIL
    assert "mlx5_3/1 not active" in down.reason
    node.ib_port("mlx5_3", "4: ACTIVE", rate="200 Gb/sec (4X HDR)")
    slow = results(node, infiniband_min_rate_gbps=400)["infiniband_links"]
    assert slow.status is Status.FAIL
    assert "mlx5_3/1 at 200 Gb/s < 400" in slow.reason


def test_link_downed_increase_since_last_preflight_fails(
    node: FixtureNode, capsys: pytest.CaptureFixture[str]
) -> None:
    """A link_downed counter that grew since the previous (recorded) preflight fails the next one."""
    node.link_downed("mlx5_1", 3)
    assert cli.main(argv(node)) == 0
    assert cli.main(argv(node)) == 0  # unchanged counter: still healthy
    node.link_downed("mlx5_1", 5)
    assert cli.main(argv(node)) == 1
    assert "mlx5_1/1 link went down 2 time(s) since the last preflight" in capsys.readouterr().err


def test_full_or_missing_checkpoint_volume_fails(node: FixtureNode) -> None:
    """Free space below the floor fails checkpoint_space; a missing directory fails it and skips the write."""
    full = results(node, min_free_bytes=1 << 60)
    assert full["checkpoint_space"].status is Status.FAIL
    assert "GiB free" in full["checkpoint_space"].reason
    missing = results(node, checkpoint_dir=node.root / "nowhere")
    assert missing["checkpoint_space"].status is Status.FAIL
    assert "nowhere" in missing["checkpoint_space"].reason
    assert missing["checkpoint_write"].status is Status.SKIPPED


def test_write_probe_leaves_nothing_behind_and_has_a_floor(node: FixtureNode) -> None:
    """The write probe removes its temp file; an unreachable throughput floor fails it with the rate."""
    (node.checkpoints / "step-10.pt").write_bytes(b"x")
    passed = results(node)["checkpoint_write"]
    assert passed.status is Status.PASS
    assert sorted(p.name for p in node.checkpoints.iterdir()) == ["step-10.pt"]
    slow = results(node, min_write_bytes_per_second=float(1 << 50))["checkpoint_write"]
    assert slow.status is Status.FAIL
    assert "MiB/s" in slow.reason
    assert sorted(p.name for p in node.checkpoints.iterdir()) == ["step-10.pt"]


def test_no_checkpoint_dir_skips_the_volume_checks(node: FixtureNode) -> None:
    """Without a checkpoint directory both volume checks are skipped, saying how to give one."""
    got = results(node, checkpoint_dir=None)
    assert got["checkpoint_space"].status is Status.SKIPPED
    assert "--checkpoint-dir" in got["checkpoint_space"].reason


def test_a_hanging_check_fails_at_the_deadline(node: FixtureNode) -> None:
    """A check that never returns is reported failed at the timeout while the others still report."""
    never = threading.Event()

    def hang(_options: object) -> list[CheckResult]:
        never.wait()
        return []

    families = (Family(("stuck_mount",), hang), *FAMILIES[3:4])
    try:
        report = run_preflight(node.options(timeout_seconds=0.5), families)
    finally:
        never.set()
    by_name = {c.check: c for c in report.checks}
    assert by_name["stuck_mount"].status is Status.FAIL
    assert "did not finish within the 0.5 s" in by_name["stuck_mount"].reason
    assert by_name["checkpoint_space"].status is Status.PASS


def test_a_check_that_raises_fails_instead_of_crashing(node: FixtureNode) -> None:
    """A bug in one check is a failed check with the exception named, not a crash of the preflight."""

    def broken(_options: object) -> list[CheckResult]:
        raise RuntimeError("boom")

    report = run_preflight(node.options(), (Family(("broken",), broken),))
    assert report.checks[0].status is Status.FAIL
    assert "RuntimeError: boom" in report.checks[0].reason


def test_json_output_and_the_recorded_result(node: FixtureNode, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints the report; the same result lands in the result file and one journal row."""
    node.use_nvml("h100-lost-gpu")
    assert cli.main(argv(node, "--json")) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["healthy"] is False
    assert {c["check"]: c["status"] for c in printed["checks"]}["gpu_nvml"] == "fail"
    stored = read_result(node.state_dir)
    assert stored is not None
    assert stored.healthy is False
    assert stored.node == "fixture-node"
    assert {c.check: c.status for c in stored.checks}["gpu_nvml"] == "fail"
    journal = Journal(node.state_dir / JOURNAL_NAME)
    try:
        rows = journal.recent()
    finally:
        journal.close()
    assert [(r.rule, r.healer, r.result) for r in rows] == [("preflight", "preflight", "unhealthy")]
    assert "gpu_nvml: " in rows[0].reason


def test_no_record_writes_nothing(node: FixtureNode) -> None:
    """--no-record leaves the state directory untouched."""
    assert cli.main(argv(node, "--no-record")) == 0
    assert not node.state_dir.exists()


def test_bad_options_are_a_config_error_naming_each(
    node: FixtureNode, capsys: pytest.CaptureFixture[str]
) -> None:
    """Out-of-range flags exit 78 and name every bad flag, running no check."""
    assert cli.main(argv(node, "--timeout=0", "--write-probe-mib=0", "--after-job=12;reboot")) == 78
    err = capsys.readouterr().err
    assert "--timeout" in err
    assert "--write-probe-mib" in err
    assert "--after-job" in err
    assert not node.state_dir.exists()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "not JSON"),
        (b'{"format_version": 1, "checks": {}}', "'checks' must be a list"),
        (b'{"format_version": 1, "checks": [{"check": "a b", "status": "pass"}]}', "short identifier"),
        (b'{"format_version": 1, "checks": [], "healthy": true, "finished_at": NaN}', "finite number"),
        (b'{"format_version": 7}', "not a version 1"),
    ],
)
def test_damaged_result_file_is_refused_naming_it(tmp_path: Path, content: bytes, why: str) -> None:
    """A damaged result file is a PreflightRecordError naming the file and what is wrong."""
    result_path(tmp_path).write_bytes(content)
    with pytest.raises(PreflightRecordError, match=why) as caught:
        read_result(tmp_path)
    assert str(result_path(tmp_path)) in str(caught.value)


def test_free_space_floor_flag_is_in_gib(node: FixtureNode) -> None:
    """--min-free-gib is read as GiB: a floor of 10^9 GiB fails checkpoint_space on any disk."""
    from trainwarden.daemon.preflight_cli import options_from_args  # noqa: PLC0415

    args = cli.build_parser().parse_args(argv(node, "--min-free-gib=1000000000"))
    assert options_from_args(args).min_free_bytes == 1_000_000_000 * GIB


def test_collective_check_measures_a_real_all_reduce_against_its_floor(node: FixtureNode) -> None:
    """--collective runs a real gloo all-reduce over 2 local ranks: passes a low floor, fails a huge one."""
    families = tuple(f for f in FAMILIES if f.names == ("collective",))
    options = node.options(collective=True, collective_bytes=1 << 20, timeout_seconds=120.0)
    passed = run_preflight(replace(options, min_collective_bytes_per_second=1.0), families).checks[0]
    assert passed.status is Status.PASS, passed.reason
    assert "gloo all-reduce of 1 MiB over 2 ranks" in passed.reason
    assert float(passed.detail["bus_bytes_per_second"]) > 1.0
    failed = run_preflight(replace(options, min_collective_bytes_per_second=1e15), families).checks[0]
    assert failed.status is Status.FAIL
    assert "MiB/s bus bandwidth (floor" in failed.reason

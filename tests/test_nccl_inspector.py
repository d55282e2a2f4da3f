"""The NCCL Inspector collector on the plugin's two output forms (tests/fixtures/nccl_inspector)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gpu_support import FIXTURES, NOW, collect_into
from trainwarden.collectors.base import CollectorContext, RankIdentity
from trainwarden.collectors.nccl_inspector import (
    InspectorRecordError,
    NcclInspectorCollector,
    NcclInspectorOptions,
    parse_json_record,
    split_json_stream,
)
from trainwarden.errors import CollectorUnavailableError

CAPTURES = FIXTURES / "nccl_inspector"


def make(directory: Path, now: float = NOW) -> NcclInspectorCollector:
    context = CollectorContext(clock=lambda: now)
    context.pid_owners.set(41001, RankIdentity("llm", 0, 0))
    context.pid_owners.set(41002, RankIdentity("llm", 1, 1))
    context.pid_owners.set(41005, RankIdentity("llm", 4, 4))
    collector = NcclInspectorCollector(NcclInspectorOptions(enabled=True, directory=directory), context)
    collector.start()
    return collector


def test_json_records_become_per_rank_collective_series(tmp_path: Path) -> None:
    """Records appended after start count per job/rank/collective, with mean bus bandwidth and latency."""
    collector = make(tmp_path)
    for name in ("node01-pid41001.log", "node01-pid41002.log"):
        shutil.copy(CAPTURES / "json" / name, tmp_path / name)
    reg = collect_into(collector)
    r0 = {"job": "llm", "rank": "0", "collective": "AllReduce"}
    assert reg.get_sample_value("trainwarden_nccl_collectives_total", r0) == 2
    assert reg.get_sample_value("trainwarden_nccl_collective_bytes_total", r0) == 2 * 17179869184
    assert reg.get_sample_value("trainwarden_nccl_collective_seconds_total", r0) == pytest.approx(0.124984)
    assert reg.get_sample_value("trainwarden_nccl_bus_bandwidth_bytes_per_second", r0) == pytest.approx(
        481.131e9, rel=1e-4
    )
    assert reg.get_sample_value("trainwarden_nccl_collective_latency_seconds", r0) == pytest.approx(0.062492)
    r1 = {"job": "llm", "rank": "1", "collective": "AllReduce"}
    assert reg.get_sample_value("trainwarden_nccl_bus_bandwidth_bytes_per_second", r1) == pytest.approx(
        306.74e9
    )
    assert reg.get_sample_value("trainwarden_nccl_inspector_records_total", {"format": "json"}) == 5
    assert reg.get_sample_value("trainwarden_nccl_inspector_parse_errors_total", {"format": "json"}) == 2


def test_history_before_start_is_not_recounted(tmp_path: Path) -> None:
    """A log that already holds records at start contributes only what is appended afterwards."""
    shutil.copy(CAPTURES / "json" / "node01-pid41002.log", tmp_path / "node01-pid41002.log")
    collector = make(tmp_path)
    reg = collect_into(collector)
    assert reg.get_sample_value("trainwarden_nccl_inspector_records_total", {"format": "json"}) == 0
    with (tmp_path / "node01-pid41002.log").open("a") as handle:
        handle.write((CAPTURES / "json" / "node01-pid41002.log").read_text())
    reg = collect_into(collector)
    assert (
        reg.get_sample_value(
            "trainwarden_nccl_collectives_total", {"job": "llm", "rank": "1", "collective": "AllReduce"}
        )
        == 1
    )


def test_a_record_split_across_writes_is_read_once(tmp_path: Path) -> None:
    """A JSON object the plugin is still writing is kept and decoded when its end arrives."""
    collector = make(tmp_path)
    text = (CAPTURES / "json" / "node01-pid41002.log").read_text()
    log = tmp_path / "node01-pid41002.log"
    log.write_text(text[:100])
    reg = collect_into(collector)
    assert reg.get_sample_value("trainwarden_nccl_inspector_records_total", {"format": "json"}) == 0
    assert reg.get_sample_value("trainwarden_nccl_inspector_parse_errors_total", {"format": "json"}) == 0
    with log.open("a") as handle:
        handle.write(text[100:])
    reg = collect_into(collector)
    assert reg.get_sample_value("trainwarden_nccl_inspector_records_total", {"format": "json"}) == 1


def test_unknown_pid_is_exported_without_job_and_rank(tmp_path: Path) -> None:
    """A process the training collector does not know still counts, under empty job and rank labels."""
    collector = make(tmp_path)
    record = json.loads(json.dumps(json.loads((CAPTURES / "json" / "node01-pid41002.log").read_text())))
    record["metadata"]["pid"] = 999
    (tmp_path / "other-pid999.log").write_text(json.dumps(record) + "\n")
    reg = collect_into(collector)
    assert (
        reg.get_sample_value(
            "trainwarden_nccl_collectives_total", {"job": "", "rank": "", "collective": "AllReduce"}
        )
        == 1
    )


def test_prometheus_textfile_mode(tmp_path: Path) -> None:
    """The plugin's textfile is read into the same bandwidth/latency series, its GPU mapped to the rank."""
    target = tmp_path / "nccl_inspector_metrics_GPU-c4e6a8b0-3d5f-4a7b-9c2d-4e6f8a0b2c54.prom"
    shutil.copy(next((CAPTURES / "prom").glob("*.prom")), target)
    os.utime(target, (NOW, NOW))
    reg = collect_into(make(tmp_path))
    r4 = {"job": "llm", "rank": "4", "collective": "AllReduce"}
    assert reg.get_sample_value("trainwarden_nccl_bus_bandwidth_bytes_per_second", r4) == pytest.approx(
        475.8e9
    )
    assert reg.get_sample_value("trainwarden_nccl_collective_latency_seconds", r4) == pytest.approx(0.007898)
    assert reg.get_sample_value("trainwarden_nccl_collectives_total", r4) is None
    assert reg.get_sample_value("trainwarden_nccl_inspector_records_total", {"format": "prom"}) == 4


def test_a_stale_textfile_is_ignored(tmp_path: Path) -> None:
    """A textfile not rewritten for stale_seconds belongs to an ended job and is not exported."""
    target = tmp_path / "nccl_inspector_metrics_GPU-x.prom"
    shutil.copy(next((CAPTURES / "prom").glob("*.prom")), target)
    os.utime(target, (NOW - 3600, NOW - 3600))
    reg = collect_into(make(tmp_path))
    assert reg.get_sample_value("trainwarden_nccl_inspector_records_total", {"format": "prom"}) == 0


def test_means_expire_when_a_rank_goes_quiet(tmp_path: Path) -> None:
    """Bandwidth of a rank that stopped reporting disappears after stale_seconds instead of sticking."""
    now = [NOW]
    context = CollectorContext(clock=lambda: now[0])
    collector = NcclInspectorCollector(NcclInspectorOptions(enabled=True, directory=tmp_path), context)
    collector.start()
    shutil.copy(CAPTURES / "json" / "node01-pid41002.log", tmp_path / "a.log")
    key = {"job": "", "rank": "", "collective": "AllReduce"}
    assert (
        collect_into(collector).get_sample_value("trainwarden_nccl_bus_bandwidth_bytes_per_second", key)
        is not None
    )
    now[0] += 301
    reg = collect_into(collector)
    assert reg.get_sample_value("trainwarden_nccl_bus_bandwidth_bytes_per_second", key) is None
    assert reg.get_sample_value("trainwarden_nccl_collectives_total", key) == 1


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([], "expected an object"),
        ({}, "no coll_perf"),
        ({"coll_perf": {"coll": "All Reduce"}}, "not a collective name"),
        (
            {"coll_perf": {"coll": "AllReduce", "coll_msg_size_bytes": 1, "coll_exec_time_us": 1}},
            "lacks coll_busbw_gbs",
        ),
        (
            {
                "coll_perf": {
                    "coll": "AllReduce",
                    "coll_msg_size_bytes": "x",
                    "coll_exec_time_us": 1,
                    "coll_busbw_gbs": 1,
                }
            },
            "non-numeric",
        ),
        (
            {
                "coll_perf": {
                    "coll": "AllReduce",
                    "coll_msg_size_bytes": 1,
                    "coll_exec_time_us": -1,
                    "coll_busbw_gbs": 1,
                }
            },
            "negative",
        ),
    ],
)
def test_bad_records_are_rejected_with_the_reason(record: object, message: str) -> None:
    """Each malformed record names what is missing or wrong."""
    with pytest.raises(InspectorRecordError, match=message):
        parse_json_record(record)


def test_stream_splitting_skips_garbage_and_keeps_the_tail() -> None:
    """Concatenated objects decode; a corrupt one is reported and skipped; an unfinished one is kept."""
    objects, problems, rest = split_json_stream('{"a": 1}\n{"b": oops}\n{"c": 3}\n{"d": ')
    assert objects == [{"a": 1}, {"c": 3}]
    assert len(problems) == 1
    assert rest == '{"d": '


def test_enabled_without_a_directory_is_a_config_problem() -> None:
    """Enabling the collector without `directory` is reported by the options check, and start() refuses."""
    assert ("directory", "required when enabled (the jobs' NCCL_INSPECTOR_DUMP_DIR)") in NcclInspectorOptions(
        enabled=True
    ).problems()
    with pytest.raises(CollectorUnavailableError, match="no directory"):
        NcclInspectorCollector(NcclInspectorOptions(), CollectorContext()).start()


def test_disabled_by_default() -> None:
    """The collector only runs when configured with a directory."""
    assert NcclInspectorOptions().enabled is False


def test_records_flushed_after_the_rank_exited_keep_its_rank(tmp_path: Path) -> None:
    """The last records a rank writes as it exits are still attributed after its pid was forgotten."""
    collector = make(tmp_path)
    collect_into(collector)  # rank 1 (pid 41002) is alive during this run
    collector.context.pid_owners.forget(41002)
    shutil.copy(CAPTURES / "json" / "node01-pid41002.log", tmp_path / "node01-pid41002.log")
    reg = collect_into(collector)
    r1 = {"job": "llm", "rank": "1", "collective": "AllReduce"}
    assert reg.get_sample_value("trainwarden_nccl_collectives_total", r1) == 1

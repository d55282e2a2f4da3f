"""Host collectors on small trees and on this machine's /proc: missing files, PSI, error counting."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest

from host_cases import HOSTS, FixtureProbe, collect_case
from trainwarden.collectors import COLLECTOR_MODULES
from trainwarden.collectors.base import Collector, CollectorContext
from trainwarden.collectors.cpu import CpuCollector, CpuOptions
from trainwarden.collectors.disk_usage import (
    MOUNT_REFRESH_COLLECTIONS,
    DiskUsageCollector,
    DiskUsageOptions,
    VolumeStat,
)
from trainwarden.collectors.diskstats import DiskstatsCollector, DiskstatsOptions
from trainwarden.collectors.load import LoadCollector
from trainwarden.collectors.memory import MemoryCollector
from trainwarden.collectors.netdev import NetdevCollector
from trainwarden.collectors.pressure import PressureCollector
from trainwarden.collectors.self_process import SelfProcessCollector
from trainwarden.config import config_from_dict
from trainwarden.errors import CollectorError, CollectorUnavailableError, ConfigError
from trainwarden.model import Sample
from trainwarden.paths import HostPaths
from trainwarden.store import Store

HOST_COLLECTORS: list[type[Collector]] = [
    CpuCollector,
    MemoryCollector,
    LoadCollector,
    DiskUsageCollector,
    DiskstatsCollector,
    NetdevCollector,
    PressureCollector,
    SelfProcessCollector,
]
PSI_CASE = HOSTS / "vm_psi"


def context_for(proc: Path, state_dir: Path | None = None) -> CollectorContext:
    return CollectorContext(paths=HostPaths(procfs=proc), state_dir=state_dir or proc / "no-state")


def values(samples: list[Sample], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {s.labels: s.value for s in samples if s.key[0] == name}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    return values(samples, name)[tuple(sorted(labels.items()))]


def copy_case(tmp_path: Path) -> Path:
    proc = tmp_path / "proc"
    shutil.copytree(PSI_CASE / "proc", proc)
    return proc


# --- registration ------------------------------------------------------------------------------


def test_every_host_collector_is_registered_once() -> None:
    """Each host collector module is listed in COLLECTOR_MODULES and exposes its class as COLLECTOR."""
    for cls in HOST_COLLECTORS:
        assert COLLECTOR_MODULES.count(cls.__module__) == 1, cls.__module__
        assert __import__(cls.__module__, fromlist=["COLLECTOR"]).COLLECTOR is cls
    assert len({cls.name for cls in HOST_COLLECTORS}) == len(HOST_COLLECTORS)


def test_host_collectors_default_to_five_second_intervals() -> None:
    """Every host collector samples every 5 s unless configured otherwise."""
    for cls in HOST_COLLECTORS:
        assert cls.Options().interval_seconds == 5.0, cls.name


# --- missing and malformed files ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "relative"),
    [
        (CpuCollector, "stat"),
        (MemoryCollector, "meminfo"),
        (LoadCollector, "loadavg"),
        (DiskstatsCollector, "diskstats"),
        (NetdevCollector, "net/dev"),
        (SelfProcessCollector, "self/stat"),
    ],
)
def test_missing_source_disables_at_start_and_fails_collect_with_its_path(
    tmp_path: Path, cls: type[Collector], relative: str
) -> None:
    """Without its file a collector refuses to start; if the file vanishes later, collect names it."""
    proc = copy_case(tmp_path)
    collector = cls(cls.Options(), context_for(proc))
    collector.start()
    (proc / relative).unlink()
    with pytest.raises(CollectorUnavailableError, match=relative):
        cls(cls.Options(), context_for(proc)).start()
    with pytest.raises(CollectorError, match=str(proc / relative)):
        list(collector.collect())


def test_malformed_lines_are_counted_cumulatively_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two bad diskstats lines add 2 to the parse-error counter per read; good devices still export."""
    proc = copy_case(tmp_path)
    good = (proc / "diskstats").read_text()
    (proc / "diskstats").write_text("8 0 sdz 1 2\n8 1 sdy 1 2 3 4 5 6 7 x 9 10 11\n" + good)
    collector = DiskstatsCollector(DiskstatsOptions(), context_for(proc))
    with caplog.at_level(logging.WARNING, logger="trainwarden.collectors.host_common"):
        first = list(collector.collect())
        second = list(collector.collect())
    assert value(first, "trainwarden_host_parse_errors_total", collector="diskstats") == 2
    assert value(second, "trainwarden_host_parse_errors_total", collector="diskstats") == 4
    assert value(second, "trainwarden_host_disk_reads_completed_total", device="vda") > 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "line 1" in warnings[0].getMessage()
    assert len(collector.status()["recent_parse_problems"]) == 4


def test_a_clean_read_rearms_the_parse_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """After a clean read, the next malformed read is logged again (a new episode), not silently counted."""
    proc = copy_case(tmp_path)
    good = (proc / "loadavg").read_text()
    collector = LoadCollector(LoadCollector.Options(), context_for(proc))
    with caplog.at_level(logging.WARNING, logger="trainwarden.collectors.host_common"):
        for text in ("garbage", good, "garbage"):
            (proc / "loadavg").write_text(text)
            list(collector.collect())
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


# --- pressure ----------------------------------------------------------------------------------


def test_missing_psi_is_reported_once_and_exports_zero(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without /proc/pressure only `supported 0` is exported, status says why, and the log says it once."""
    proc = copy_case(tmp_path)
    shutil.rmtree(proc / "pressure")
    collector = PressureCollector(PressureCollector.Options(), context_for(proc))
    collector.start()
    with caplog.at_level(logging.INFO, logger="trainwarden.collectors.pressure"):
        first = list(collector.collect())
        list(collector.collect())
    assert values(first, "trainwarden_host_pressure_supported") == {(): 0.0}
    assert values(first, "trainwarden_host_pressure_stall_ratio") == {}
    assert collector.status()["supported"] is False
    assert "does not exist" in collector.status()["unsupported_reason"]
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1


def test_psi_with_one_unreadable_resource_exports_the_others(tmp_path: Path) -> None:
    """A pressure file that cannot be read is listed in status; the other resources are still exported."""
    proc = copy_case(tmp_path)
    (proc / "pressure" / "memory").unlink()
    collector = PressureCollector(PressureCollector.Options(), context_for(proc))
    samples = list(collector.collect())
    assert values(samples, "trainwarden_host_pressure_supported") == {(): 1.0}
    resources = {
        dict(labels)["resource"] for labels in values(samples, "trainwarden_host_pressure_stall_ratio")
    }
    assert resources == {"cpu", "io"}
    assert set(collector.status()["unreadable"]) == {"memory"}


def test_pressure_series_are_windowed_for_rules() -> None:
    """Stall ratios, disk availability and I/O bytes keep a window in the store; plain gauges do not."""
    store = collect_case(PSI_CASE)
    assert dict(store.windows("trainwarden_host_pressure_stall_ratio"))
    assert dict(store.windows("trainwarden_host_filesystem_avail_bytes"))
    assert dict(store.windows("trainwarden_host_disk_written_bytes_total"))
    assert not dict(store.windows("trainwarden_host_load1"))


# --- cpu -----------------------------------------------------------------------------------------


def test_cpu_per_cpu_replaces_the_aggregate(tmp_path: Path) -> None:
    """With per_cpu each CPU gets its own 8 modes and `cpu=all` disappears, so sums never double count."""
    proc = copy_case(tmp_path)
    collector = CpuCollector(CpuOptions(per_cpu=True), context_for(proc), clock_ticks=100)
    samples = list(collector.collect())
    cpus = {dict(labels)["cpu"] for labels in values(samples, "trainwarden_host_cpu_seconds_total")}
    assert cpus == {"0", "1"}
    assert len(values(samples, "trainwarden_host_cpu_seconds_total")) == 16
    assert value(samples, "trainwarden_host_cpu_seconds_total", cpu="0", mode="user") == pytest.approx(30.23)


# --- disk usage ----------------------------------------------------------------------------------


def test_missing_volume_is_reported_and_does_not_stop_the_others(tmp_path: Path) -> None:
    """A missing path and an unreadable one read as readable=0 with reasons; the good volume exports sizes."""
    stat = {
        "frsize": 4096,
        "blocks": 100,
        "bfree": 60,
        "bavail": 50,
        "files": 10,
        "ffree": 7,
        "readonly": True,
    }
    probe = FixtureProbe({"/data": {"dev_major": 254, "dev_minor": 0, **stat}})

    def probe_with_denied(path: str) -> VolumeStat:
        if path == "/secret":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return probe(path)

    options = DiskUsageOptions(
        volumes={"data": Path("/data"), "gone": Path("/gone/"), "secret": Path("/secret")},
        include_state_dir=False,
    )
    collector = DiskUsageCollector(options, context_for(PSI_CASE / "proc"), probe=probe_with_denied)
    samples = list(collector.collect())
    assert values(samples, "trainwarden_host_filesystem_readable") == {
        (("volume", "data"),): 1.0,
        (("volume", "gone"),): 0.0,
        (("volume", "secret"),): 0.0,
    }
    assert value(samples, "trainwarden_host_filesystem_avail_bytes", volume="data") == 50 * 4096
    assert value(samples, "trainwarden_host_filesystem_readonly", volume="data") == 1
    assert (
        value(
            samples,
            "trainwarden_host_filesystem_info",
            volume="data",
            device="vda",
            fstype="ext4",
            mountpoint="/",
        )
        == 1
    )
    volumes = collector.status()["volumes"]
    assert volumes["gone"]["error"] == "/gone: No such file or directory"
    assert volumes["secret"]["error"] == "/secret: Permission denied"
    assert volumes["data"]["mountpoint"] == "/"


def test_state_dir_is_watched_by_default(tmp_path: Path) -> None:
    """The daemon's state directory is added as volume `state`, next to root and /dev/shm."""
    collector = DiskUsageCollector(DiskUsageOptions(), context_for(PSI_CASE / "proc", state_dir=tmp_path))
    samples = list(collector.collect())
    readable = values(samples, "trainwarden_host_filesystem_readable")
    assert (("volume", "state"),) in readable
    assert (("volume", "root"),) in readable
    assert (("volume", "shm"),) in readable
    assert readable[(("volume", "state"),)] == 1.0


def test_disk_usage_without_mountinfo_still_exports_sizes(tmp_path: Path) -> None:
    """When mountinfo cannot be read, sizes are exported with empty device and fstype."""
    options = DiskUsageOptions(volumes={"tmp": tmp_path}, include_state_dir=False)
    collector = DiskUsageCollector(options, context_for(tmp_path / "no-proc"))
    samples = list(collector.collect())
    assert value(samples, "trainwarden_host_filesystem_size_bytes", volume="tmp") > 0
    assert (
        value(samples, "trainwarden_host_filesystem_info", volume="tmp", device="", fstype="", mountpoint="")
        == 1
    )


def test_bad_options_are_reported_with_section_and_key() -> None:
    """Relative volume paths, label-unsafe names and broken regexes are all reported at once by the loader."""
    groups = {"collectors": {cls.name: cls.Options for cls in HOST_COLLECTORS}}
    data = {
        "collectors": {
            "disk_usage": {"volumes": {"ok": "/", "bad name": "/x", "rel": "ckpt"}},
            "diskstats": {"device_exclude": "(unclosed"},
            "netdev": {"device_exclude": "[z-a]"},
        }
    }
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data, groups)
    text = str(caught.value)
    assert "[collectors.disk_usage] volumes: name 'bad name' must match" in text
    assert "[collectors.disk_usage] volumes: path of 'rel' must be absolute, got 'ckpt'" in text
    assert "[collectors.diskstats] device_exclude: not a valid regular expression" in text
    assert "[collectors.netdev] device_exclude: not a valid regular expression" in text


# --- this machine ------------------------------------------------------------------------------


def test_every_host_collector_on_the_real_proc() -> None:
    """On this machine's /proc each collector starts and collects plausible values without parse errors."""
    context = CollectorContext(state_dir=Path.cwd())
    samples: list[Sample] = []
    for cls in HOST_COLLECTORS:
        collector = cls(cls.Options(), context)
        try:
            collector.start()
        except CollectorUnavailableError:
            pytest.fail(f"{cls.name} unavailable on a Linux host")
        collected = list(collector.collect())
        assert value(collected, "trainwarden_host_parse_errors_total", collector=cls.name) == 0, (
            collector.status()
        )
        samples += collected
    assert value(samples, "trainwarden_host_memory_total_bytes") > 0
    assert value(samples, "trainwarden_host_cpus") == os.cpu_count()
    assert value(samples, "trainwarden_host_cpu_seconds_total", cpu="all", mode="user") > 0
    assert value(samples, "trainwarden_daemon_resident_memory_bytes") > 1_000_000
    assert value(samples, "trainwarden_daemon_open_fds") >= 3
    assert value(samples, "trainwarden_host_filesystem_readable", volume="root") == 1
    assert value(samples, "trainwarden_host_pressure_supported") == float(Path("/proc/pressure").is_dir())


def test_self_collector_follows_this_process_cpu_time() -> None:
    """The default (procfs `self`) reports this test process: its CPU seconds grow after busy work."""
    collector = SelfProcessCollector(SelfProcessCollector.Options(), CollectorContext())
    before = value(list(collector.collect()), "trainwarden_daemon_cpu_seconds_total", mode="user")
    deadline = os.times().user + 0.1
    while os.times().user < deadline:
        pass
    after = value(list(collector.collect()), "trainwarden_daemon_cpu_seconds_total", mode="user")
    assert after - before >= 0.05
    assert value(list(collector.collect()), "trainwarden_daemon_threads") == len(
        list(Path("/proc/self/task").iterdir())
    )


def test_store_replace_drops_a_vanished_interface(tmp_path: Path) -> None:
    """When an interface disappears from /proc/net/dev its series leave the store on the next collection."""
    proc = copy_case(tmp_path)
    store = Store()
    collector = NetdevCollector(NetdevCollector.Options(), context_for(proc))
    store.replace(collector.name, collector.collect(), 1.0)
    assert store.value("trainwarden_host_network_receive_bytes_total", device="ifb1") == 0
    lines = [line for line in (proc / "net" / "dev").read_text().splitlines(True) if "ifb1" not in line]
    (proc / "net" / "dev").write_text("".join(lines))
    store.replace(collector.name, collector.collect(), 2.0)
    assert store.value("trainwarden_host_network_receive_bytes_total", device="ifb1") is None
    assert store.value("trainwarden_host_network_receive_bytes_total", device="eth0") is not None


def test_mountinfo_is_reread_on_device_change_and_periodically(tmp_path: Path) -> None:
    """Mounts are cached per device; a volume moving to another device, or a minute passing, re-reads them."""
    proc = copy_case(tmp_path)
    stats = {
        "frsize": 4096,
        "blocks": 100,
        "bfree": 60,
        "bavail": 50,
        "files": 10,
        "ffree": 7,
        "readonly": False,
    }
    devices = {"/data": {"dev_major": 254, "dev_minor": 0, **stats}}
    collector = DiskUsageCollector(
        DiskUsageOptions(volumes={"data": Path("/data")}, include_state_dir=False),
        context_for(proc),
        probe=FixtureProbe(devices),
    )

    def fstype() -> str:
        info = values(list(collector.collect()), "trainwarden_host_filesystem_info")
        (labels,) = info
        return dict(labels)["fstype"]

    assert fstype() == "ext4"
    mountinfo = proc / "self" / "mountinfo"
    mountinfo.write_text(mountinfo.read_text() + "99 27 8:16 / /data rw - xfs /dev/sdb rw\n")
    assert fstype() == "ext4"  # same device: the cached mount is used
    devices["/data"] = {**devices["/data"], "dev_major": 8, "dev_minor": 16}
    assert fstype() == "xfs"  # the volume moved to another device: mountinfo re-read
    mountinfo.write_text(mountinfo.read_text().replace("xfs /dev/sdb", "btrfs /dev/sdb"))
    seen = {fstype() for _ in range(MOUNT_REFRESH_COLLECTIONS)}
    assert "btrfs" in seen


def test_hung_network_filesystem_is_reported_without_blocking(tmp_path: Path) -> None:
    """A statvfs stuck on NFS times out as readable=0, starts no second probe, and recovers later."""
    case = HOSTS / "node_exporter_nopsi"
    stats = {
        "frsize": 4096,
        "blocks": 100,
        "bfree": 60,
        "bavail": 50,
        "files": 10,
        "ffree": 7,
        "readonly": False,
    }
    probe = FixtureProbe(
        {
            "/": {"dev_major": 8, "dev_minor": 1, **stats},
            "/mnt/nfs/test/ckpt": {"dev_major": 0, "dev_minor": 42, **stats},
        }
    )
    release = threading.Event()
    calls: list[str] = []

    def hanging_probe(path: str) -> VolumeStat:
        calls.append(path)
        if path.startswith("/mnt/nfs") and not release.wait(10):
            raise AssertionError("never released")
        return probe(path)

    options = DiskUsageOptions(
        volumes={"root": Path("/"), "ckpt": Path("/mnt/nfs/test/ckpt")},
        include_state_dir=False,
        remote_probe_timeout_seconds=0.05,
    )
    collector = DiskUsageCollector(options, context_for(case / "proc"), probe=hanging_probe)
    for _ in range(2):
        samples = list(collector.collect())
        assert value(samples, "trainwarden_host_filesystem_readable", volume="ckpt") == 0
        assert value(samples, "trainwarden_host_filesystem_readable", volume="root") == 1
    assert "has not returned" in collector.status()["volumes"]["ckpt"]["error"]
    assert calls.count("/mnt/nfs/test/ckpt") == 1
    release.set()
    samples = list(collector.collect())
    assert value(samples, "trainwarden_host_filesystem_readable", volume="ckpt") == 1
    assert (
        value(
            samples,
            "trainwarden_host_filesystem_info",
            volume="ckpt",
            device="192.168.1.1:/srv/test",
            fstype="nfs4",
            mountpoint="/mnt/nfs/test",
        )
        == 1
    )


def test_a_clean_file_does_not_rearm_the_warning_of_another(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A persistently malformed file is logged once even when the collector's other files parse cleanly."""
    proc = copy_case(tmp_path)
    (proc / "self" / "status").write_text("VmRSS:\tlots kB\n")
    collector = SelfProcessCollector(SelfProcessCollector.Options(), context_for(proc), clock_ticks=100)
    with caplog.at_level(logging.WARNING, logger="trainwarden.collectors.host_common"):
        for _ in range(3):
            samples = list(collector.collect())
    assert value(samples, "trainwarden_host_parse_errors_total", collector="self") == 3
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

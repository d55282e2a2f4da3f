"""Host file parsers on strings: real layouts, kernel variants and malformed lines (skipped and reported)."""

from __future__ import annotations

import re

import pytest

from trainwarden.collectors.cpu import AGGREGATE, parse_stat
from trainwarden.collectors.disk_usage import Mount, VolumeStat, device_label, find_mount, parse_mountinfo
from trainwarden.collectors.diskstats import DEFAULT_EXCLUDE as DISK_EXCLUDE
from trainwarden.collectors.diskstats import parse_diskstats
from trainwarden.collectors.load import LoadAvg, parse_loadavg
from trainwarden.collectors.memory import parse_meminfo
from trainwarden.collectors.netdev import DEFAULT_EXCLUDE as NET_EXCLUDE
from trainwarden.collectors.netdev import parse_net_dev
from trainwarden.collectors.pressure import Stall, parse_pressure
from trainwarden.collectors.self_process import (
    parse_boot_time,
    parse_max_open_files,
    parse_process_stat,
    parse_process_status,
)

# --- /proc/stat ------------------------------------------------------------------------------

STAT = """\
cpu  10635 0 3292 95135 676 0 113 115 0 0
cpu0 2994 0 1388 50215 280 0 32 51 0 0
cpu1 7641 0 1903 44920 395 0 80 64 0 0
intr 214224 0 9 0 0 12
ctxt 330004
btime 1795447740
processes 7869
procs_running 1
procs_blocked 0
softirq 5057579 250191 1481983
"""


def test_stat_reads_cpu_ticks_and_counters() -> None:
    """Every cpu line becomes 8 mode columns, and the first number of `intr` is its total."""
    parsed = parse_stat(STAT)
    assert parsed.problems == ()
    assert parsed.value.cpu_ticks[AGGREGATE] == (10635, 0, 3292, 95135, 676, 0, 113, 115)
    assert set(parsed.value.cpu_ticks) == {AGGREGATE, "0", "1"}
    assert parsed.value.counters == {
        "intr": 214224,
        "ctxt": 330004,
        "btime": 1795447740,
        "processes": 7869,
        "procs_running": 1,
        "procs_blocked": 0,
    }


def test_stat_pads_old_kernels_without_steal() -> None:
    """A 2.6-era cpu line with only 7 columns is accepted and the missing modes read as 0."""
    parsed = parse_stat("cpu 1 2 3 4 5 6 7\n")
    assert parsed.problems == ()
    assert parsed.value.cpu_ticks[AGGREGATE] == (1, 2, 3, 4, 5, 6, 7, 0)


def test_stat_skips_malformed_lines_and_keeps_the_rest() -> None:
    """Short, non-numeric and unknown cpu lines are each reported by line number; good lines survive."""
    text = "cpu0 1 2\ncpu1 1 2 x 4 5 6 7 8\ncpufoo 1 2 3 4\nctxt\ncpu2 1 2 3 4 5 6 7 8\nctxt 42\n"
    parsed = parse_stat(text)
    assert list(parsed.value.cpu_ticks) == ["2"]
    assert parsed.value.counters == {"ctxt": 42}
    assert len(parsed.problems) == 4
    assert parsed.problems[0].startswith("line 1:")
    assert "line 4:" in parsed.problems[3]


# --- /proc/meminfo ---------------------------------------------------------------------------


def test_meminfo_converts_kb_to_bytes_and_keeps_counts() -> None:
    """`kB` values are multiplied by 1024; unitless huge page counts are kept as counts."""
    parsed = parse_meminfo(
        "MemTotal:       32811608 kB\nActive(anon):   11843584 kB\nHugePages_Total:       3\n"
    )
    assert parsed.problems == ()
    assert parsed.value == {
        "MemTotal": 32811608 * 1024,
        "Active(anon)": 11843584 * 1024,
        "HugePages_Total": 3,
    }


@pytest.mark.parametrize(
    "line",
    ["garbage", "MemFree: lots kB", "MemFree: 12 MB", "MemFree:", "MemFree: 1 kB extra"],
)
def test_meminfo_reports_each_malformed_line(line: str) -> None:
    """A line that is not `Key: value [kB]` is skipped and named; the other fields still parse."""
    parsed = parse_meminfo(f"MemTotal: 4 kB\n{line}\n")
    assert parsed.value == {"MemTotal": 4096}
    assert len(parsed.problems) == 1
    assert parsed.problems[0].startswith("line 2:")


# --- /proc/loadavg ---------------------------------------------------------------------------


def test_loadavg_parses_averages_and_thread_total() -> None:
    """`L1 L5 L15 running/total lastpid` gives three floats and the total of scheduling entities."""
    parsed = parse_loadavg("0.12 0.15 0.09 2/113 7778\n")
    assert parsed.value == LoadAvg(0.12, 0.15, 0.09, 113)
    assert parsed.problems == ()


@pytest.mark.parametrize("text", ["", "0.1 0.2", "0.1 0.2 0.3 2-113 5", "a b c 1/2 3", "0.1 0.2 0.3 1/x 3"])
def test_loadavg_rejects_malformed_text(text: str) -> None:
    """Anything but the loadavg layout yields no value and exactly one problem quoting the text."""
    parsed = parse_loadavg(text)
    assert parsed.value is None
    assert len(parsed.problems) == 1


# --- /proc/diskstats -------------------------------------------------------------------------

DISKSTATS = """\
   8       0 sda 25354637 34367663 1003346126 18492372 28444756 11134226 505697032 63877960 0 9653880 82621804
   8       1 sda1 250 0 2000 36 0 0 0 0 0 36 36
   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0
 259       0 nvme0n1 47114 4 4643973 21650 1078320 43950 39451633 1011053 3 222766 1032546 0 0 0 0
 259       1 nvme0n1p1 1140 0 9370 16 1 0 1 0 0 16 16
 254       0 vda 37934 9197 3566202 16150 12491 37312 3585304 21808 0 10308 40340 4278 67 87080 1149 1844 1232
 252       0 dm-0 59910002 0 1003337218 46229572 39231014 0 505696880 1158557800 0 11325968 1206301256
 253       0 zram0 0 0 0 0 0 0 0 0 0 0 0
"""


def test_diskstats_converts_sectors_and_milliseconds() -> None:
    """Sectors become bytes (x512), milliseconds become seconds, and in-flight requests are kept."""
    parsed = parse_diskstats(DISKSTATS, re.compile(DISK_EXCLUDE))
    sda = parsed.value["sda"]
    assert sda.reads == 25354637
    assert sda.read_bytes == 1003346126 * 512
    assert sda.written_bytes == 505697032 * 512
    assert sda.read_seconds == pytest.approx(18492.372)
    assert sda.io_seconds == pytest.approx(9653.880)
    assert sda.io_weighted_seconds == pytest.approx(82621.804)
    assert parsed.value["nvme0n1"].in_flight == 3


def test_diskstats_default_exclude_drops_partitions_ram_and_loop() -> None:
    """The default regex keeps whole disks and device-mapper volumes, never partitions, loop or zram."""
    parsed = parse_diskstats(DISKSTATS, re.compile(DISK_EXCLUDE))
    assert sorted(parsed.value) == ["dm-0", "nvme0n1", "sda", "vda"]
    assert sorted(parse_diskstats(DISKSTATS).value) == sorted(
        ["sda", "sda1", "loop0", "nvme0n1", "nvme0n1p1", "vda", "dm-0", "zram0"]
    )


def test_diskstats_skips_short_and_non_numeric_lines() -> None:
    """A truncated line and a line with a non-numeric counter are reported; other devices still parse."""
    text = "8 0 sda 1 2 3\n8 16 sdb 1 2 3 4 5 6 7 x 9 10 11\n" + DISKSTATS.splitlines()[0] + "\n"
    parsed = parse_diskstats(text)
    assert list(parsed.value) == ["sda"]
    assert len(parsed.problems) == 2
    assert "sdb" in parsed.problems[1]


# --- /proc/net/dev ---------------------------------------------------------------------------

NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  112579    1279    0    0    0     0          0         0   112579    1279    0    0    0     0       0          0
veth4B09XN:     648       8    0    0    0     0          0         0  1943284   10640    0    0    0     0       0          0
  eth0:68210035552 520993275    3    4    0     0          0         0 9315587528 43451486    5    6    0     0       0          0
ibr10:30:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
"""  # noqa: E501 - verbatim kernel layout


def test_net_dev_reads_counters_and_alias_names() -> None:
    """Counters glued to the colon and alias names containing ':' both parse; lo and veth are excluded."""
    parsed = parse_net_dev(NET_DEV, re.compile(NET_EXCLUDE))
    assert parsed.problems == ()
    assert sorted(parsed.value) == ["eth0", "ibr10:30"]
    assert parsed.value["eth0"] == {
        "receive_bytes": 68210035552,
        "receive_packets": 520993275,
        "receive_errors": 3,
        "receive_drop": 4,
        "transmit_bytes": 9315587528,
        "transmit_packets": 43451486,
        "transmit_errors": 5,
        "transmit_drop": 6,
    }


def test_net_dev_reports_malformed_interface_lines() -> None:
    """A line without a colon, a short one and a non-numeric one are each reported; eth0 survives."""
    lines = NET_DEV.splitlines()
    text = "\n".join([*lines[:2], "eth9 1 2 3", "eth8: 1 2 3", "eth7:" + " x" * 16, lines[4]]) + "\n"
    parsed = parse_net_dev(text)
    assert list(parsed.value) == ["eth0"]
    assert [p.split(":")[0] for p in parsed.problems] == ["line 3", "line 4", "line 5"]


# --- /proc/pressure --------------------------------------------------------------------------


def test_pressure_converts_percent_and_microseconds() -> None:
    """avg10 percent becomes a 0-1 ratio and the microsecond total becomes seconds."""
    text = (
        "some avg10=12.50 avg60=0.60 avg300=0.84 total=9350622\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )
    parsed = parse_pressure(text)
    assert parsed.problems == ()
    assert parsed.value["some"] == Stall(0.125, 9.350622)
    assert parsed.value["full"] == Stall(0.0, 0.0)


def test_pressure_accepts_cpu_files_without_full_line() -> None:
    """Kernels before 5.13 write only a `some` line for cpu; that is not a problem."""
    parsed = parse_pressure("some avg10=1.00 avg60=0.00 avg300=0.00 total=5\n")
    assert list(parsed.value) == ["some"]
    assert parsed.problems == ()


@pytest.mark.parametrize(
    "line",
    ["half avg10=1.00 total=5", "some avg60=1.00 total=5", "some avg10=x total=5", "some avg10=1.00"],
)
def test_pressure_reports_malformed_lines(line: str) -> None:
    """An unknown kind, a missing avg10/total or a non-number is skipped and reported."""
    parsed = parse_pressure(f"{line}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert list(parsed.value) == ["full"]
    assert len(parsed.problems) == 1


# --- /proc/<pid>/{stat,status,limits} --------------------------------------------------------


def test_process_stat_survives_parentheses_in_the_command_name() -> None:
    """The command name `((a b ) ( c d) )` does not shift the fields (split at the last ')')."""
    text = (
        "1020 ((a b ) ( c d) ) R 28378 1020 28378 34842 1020 4218880 286 0 0 0 17 4 0 0 20 0 3 0 10839175 "
        "10395648 155 18446744073709551615 4194304 4238788 140736466511168 0 0 0 0 0 0 0 0 0 17 5 0 0 0 0 0\n"
    )
    parsed = parse_process_stat(text)
    assert parsed.problems == ()
    assert parsed.value is not None
    assert (parsed.value.utime_ticks, parsed.value.stime_ticks) == (17, 4)
    assert parsed.value.threads == 3
    assert parsed.value.start_ticks == 10839175


@pytest.mark.parametrize("text", ["", "1020 (python R 1 2", "1020 (python) R 1 2 3"])
def test_process_stat_rejects_truncated_text(text: str) -> None:
    """A stat line without its closing parenthesis or with too few fields yields no value and one problem."""
    parsed = parse_process_stat(text)
    assert parsed.value is None
    assert len(parsed.problems) == 1


def test_process_status_picks_memory_and_threads() -> None:
    """VmRSS/VmHWM/VmSize become bytes, Threads a count; unrelated and odd lines are ignored."""
    text = "Name:\tvim\nVmSize:\t 164448 kB\nVmHWM:\t 7468 kB\nVmRSS:\t 7464 kB\nThreads:\t1\nUid:\t1000\n"
    parsed = parse_process_status(text)
    assert parsed.value == {"VmSize": 164448 * 1024, "VmHWM": 7468 * 1024, "VmRSS": 7464 * 1024, "Threads": 1}
    assert parse_process_status("VmRSS:\tlots kB\n").problems == (
        "line 1: expected 'VmRSS: N', got 'VmRSS:\\tlots kB'",
    )


def test_max_open_files_soft_limit() -> None:
    """The soft limit is read; `unlimited` and a missing line give no value without a problem."""
    limits = "Limit                     Soft Limit           Hard Limit           Units\n"
    assert (
        parse_max_open_files(
            limits + "Max open files            2048                 4096                 files\n"
        ).value
        == 2048
    )
    assert (
        parse_max_open_files(
            limits + "Max open files            unlimited            unlimited            files\n"
        ).value
        is None
    )
    assert parse_max_open_files(limits).problems == ()
    assert len(parse_max_open_files("Max open files  lots  4096 files\n").problems) == 1


def test_boot_time_from_proc_stat() -> None:
    """`btime` is found among the other /proc/stat lines; a file without it gives None."""
    assert parse_boot_time(STAT) == 1795447740
    assert parse_boot_time("cpu 1 2 3 4\n") is None


# --- mountinfo -------------------------------------------------------------------------------

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24683656k
30 25 0:27 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24683656k
194 21 0:42 / /mnt/nfs/test rw shared:144 master:3 - nfs4 192.168.1.1:/srv/test rw,vers=4.0
50 27 254:0 /data /mnt/my\\040ckpt rw,relatime shared:1 - ext4 /dev/vda rw
"""


def _stat(major: int, minor: int) -> VolumeStat:
    return VolumeStat(major, minor, 4096, 10, 5, 4, 100, 50, readonly=False)


def test_mountinfo_parses_optional_fields_and_escapes() -> None:
    """Optional fields before '-' are skipped and octal escapes (\\040 = space) are decoded."""
    parsed = parse_mountinfo(MOUNTINFO)
    assert parsed.problems == ()
    assert parsed.value[4] == Mount(0, 42, "/mnt/nfs/test", "nfs4", "192.168.1.1:/srv/test")
    assert parsed.value[5].mountpoint == "/mnt/my ckpt"


def test_mountinfo_reports_malformed_lines() -> None:
    """A line without the '-' separator or with a bad device number is skipped and reported."""
    parsed = parse_mountinfo(
        "1 2 0:1 / /x rw ext4 /dev/sda rw\n1 2 a:b / /y rw - ext4 /dev/sdb rw\n" + MOUNTINFO
    )
    assert len(parsed.value) == 6
    assert [p.split(":")[0] for p in parsed.problems] == ["line 1", "line 2"]


def test_find_mount_prefers_device_then_deepest_then_latest() -> None:
    """Mounts are matched by device, then the deepest containing mount point, then the top of a stack."""
    mounts = parse_mountinfo(MOUNTINFO).value
    root = find_mount(mounts, "/var/lib/trainwarden", _stat(254, 0))
    assert root is not None
    assert root.mountpoint == "/"
    bind = find_mount(mounts, "/mnt/my ckpt/run1", _stat(254, 0))
    assert bind is not None
    assert bind.mountpoint == "/mnt/my ckpt"
    shm = find_mount(mounts, "/dev/shm", _stat(0, 27))
    assert shm is not None
    assert (shm.major, shm.minor) == (0, 27)
    # A path reached through a symlink still finds its device's mount.
    nfs = find_mount(mounts, "/home/me/ckpt", _stat(0, 42))
    assert nfs is not None
    assert nfs.fstype == "nfs4"
    # Unknown device: fall back to the deepest mount point containing the path.
    fallback = find_mount(mounts, "/mnt/nfs/test/x", _stat(9, 9))
    assert fallback is not None
    assert fallback.mountpoint == "/mnt/nfs/test"


def test_device_label_matches_diskstats_names() -> None:
    """`/dev/vda` becomes `vda` so filesystem and diskstats series join; other sources are unchanged."""
    assert device_label("/dev/vda") == "vda"
    assert device_label("tmpfs") == "tmpfs"


def test_meminfo_key_filter_skips_other_fields_unchecked() -> None:
    """With a key filter only the wanted fields are converted; a malformed unwanted line is not a problem."""
    parsed = parse_meminfo("MemTotal: 4 kB\nWeird: ??\nMemFree: x kB\n", frozenset({"MemTotal", "MemFree"}))
    assert parsed.value == {"MemTotal": 4096}
    assert len(parsed.problems) == 1
    assert "MemFree" in parsed.problems[0]

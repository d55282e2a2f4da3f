"""The metric names a real `trainwarden daemon` exports on the fixtures, and the names a PromQL text uses.

The shipped alert rules and dashboards are checked against a real scrape, so a renamed series
fails their tests instead of leaving a rule or a panel silently pointing at nothing. The daemon
runs on FakeNvml (`h100-sxm-8gpu`), the 4-port InfiniBand fixture, a kernel log holding two XIDs, a
`checkpoints` disk-usage volume, and one training rank (this process) reporting steps, every
phase, a checkpoint and a collective; the XIDs raise findings and one policy refusal.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from support import free_port, wait_until
from training_support import hello
from trainwarden.protocol import default_socket_path, encode

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
_NAME = re.compile(
    r"(?<![\w:])([a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]*|trainwarden_[a-zA-Z0-9_]+|up)(?![\w:(])"
)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')


def metric_names_in(expr: str) -> set[str]:
    """Series names a PromQL expression selects: `trainwarden_*`, recording rules (`a:b:c`) and `up`.

    Label values (quoted strings) are removed first, so `{volume="checkpoints"}` is not a name.
    """
    return set(_NAME.findall(_STRINGS.sub('""', expr)))


def _rank_records() -> bytes:
    records = [hello(0, job="llm", world_size=1)]
    records += [
        {"type": "step", "step": s, "step_seconds": 0.4, "loss": 2.0, "grad_norm": 0.7, "lr": 3e-4}
        | {"samples": 256, "tokens": 1 << 20}
        for s in range(5)
    ]
    for phase in ("checkpoint", "eval", "data", "init"):
        records += [
            {"type": "phase", "phase": phase, "event": "begin"},
            {"type": "phase", "phase": phase, "event": "end", "seconds": 1.0},
        ]
    records.append({"type": "checkpoint", "step": 4, "path": "/ckpt/4"})
    records += [
        {"type": "collective", "op": "all_reduce", "event": "begin", "seq": 1, "bytes": 1 << 20},
        {"type": "collective", "op": "all_reduce", "event": "end", "seq": 1, "seconds": 0.004},
    ]
    return b"".join(encode(r) for r in records)


def _families(url: str) -> dict[str, set[str]]:
    """Family name -> the sample names it exposes (histograms add _bucket/_sum/_count)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {f.name: {s.name for s in f.samples} for f in text_string_to_metric_families(text)}


@contextmanager
def fixture_daemon(tmp_path: Path) -> Iterator[str]:
    """A daemon on the fixtures with a rank connected and an XID seen; yields its base URL."""
    dev = tmp_path / "dev"
    dev.mkdir()
    kmsg = dev / "kmsg"
    kmsg.write_text("")
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    runtime = tmp_path / "run"
    config = tmp_path / "config.toml"
    config.write_text(
        f"[paths]\ndevfs = '{dev}'\n\n"
        + "".join(f"[collectors.{name}]\ninterval_seconds = 0.5\n\n" for name in ("gpu", "kmsg", "xid"))
        + f"[collectors.disk_usage.volumes]\ncheckpoints = '{checkpoints}'\n"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in {"NOTIFY_SOCKET", "WATCHDOG_USEC"}}
    env["TRAINWARDEN_NVML_FIXTURE"] = "h100-sxm-8gpu"
    cmd = [
        sys.executable, "-m", "trainwarden.daemon.cli", "daemon", "--config", str(config),
        "--listen", f"127.0.0.1:{port}", "--runtime-dir", str(runtime),
        "--state-dir", str(tmp_path / "state"),
        "--path.sysfs", str(FIXTURES / "infiniband" / "ndr_4port" / "sys"),
    ]  # fmt: skip
    log = tmp_path / "daemon.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    rank = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:

        def serving(name: str) -> bool:
            if proc.poll() is not None:
                raise AssertionError(log.read_text())
            try:
                return name in _families(url)
            except OSError:
                return False

        wait_until(lambda: serving("trainwarden_gpu_up"), 60.0, "the daemon's first GPU collection")
        rank.connect(str(default_socket_path(runtime)))
        rank.sendall(_rank_records())
        # Two XIDs on two GPUs: two findings of one incident, so the policy refuses the second
        # (cooldown), and the refusal counter appears.
        kmsg.write_text(
            "4,1,1,-;NVRM: Xid (PCI:0000:18:00): 13, pid=1, name=python, Graphics Exception\n"
            "4,2,2,-;NVRM: Xid (PCI:0000:db:00): 79, pid=1, name=python, GPU has fallen off the bus.\n"
        )
        wait_until(lambda: serving("trainwarden_train_step"), 60.0, "the rank's steps")
        wait_until(lambda: serving("trainwarden_gpu_xid_errors"), 60.0, "the XIDs")
        wait_until(lambda: serving("trainwarden_policy_refusals"), 60.0, "the policy's refusal")
        yield url
    finally:
        rank.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def exported_series_names(tmp_path: Path) -> set[str]:
    """Every sample name the fixture daemon exposes over its first scrapes, plus Prometheus' own."""
    seen: set[str] = set()

    def finding_seen() -> bool:
        for names in _families(url).values():
            seen.update(names)
        return "trainwarden_rule_active" in seen  # only while a finding fires: collect until one did

    with fixture_daemon(tmp_path) as url:
        wait_until(finding_seen, 60.0, "a finding to fire")
    return seen | PROMETHEUS_SERIES

"""Starting the real `trainwarden daemon` process for a test: one command line, one stop.

The tests that drive the daemon over HTTP and signals (`test_daemon_process`, `test_gpu_daemon`,
`test_metrics_scrape`, `test_sdnotify`, `test_reload`) build its command line, its environment and
its shutdown here, so a change of the CLI is made in one place.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from support import free_port, wait_until

HOST = Path(__file__).parent / "fixtures" / "hosts" / "vm_psi"
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]

_SCRIPT = Path(sys.executable).parent / "trainwarden"
TRAINWARDEN = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "trainwarden.daemon.cli"]
"""The CLI: the installed entry point, else the module (a checkout without `pip install -e`)."""


def daemon_argv(
    root: Path, *, listen: str, procfs: Path, sysfs: Path, config: Path | None = None
) -> list[str]:
    """`trainwarden daemon` with its runtime and state directories under `root`, on fixture trees."""
    return [
        *TRAINWARDEN,
        "daemon",
        *(["--config", str(config)] if config is not None else []),
        "--listen",
        listen,
        "--runtime-dir",
        str(root / "run"),
        "--state-dir",
        str(root / "state"),
        "--path.procfs",
        str(procfs),
        "--path.sysfs",
        str(sysfs),
    ]


def daemon_env(**extra: str) -> dict[str, str]:
    """This process's environment without systemd's notify variables (a test under systemd), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}}
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM, then wait; a daemon that does not stop in `timeout` is killed and the test fails."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def parse_metrics(body: str) -> Metrics:
    """Every sample of a `/metrics` body, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


@dataclass
class Running:
    """A started daemon: its process, URL, config file and log."""

    proc: subprocess.Popen[bytes]
    url: str
    config: Path
    log: Path

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, dict(response.headers.items()), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers.items()), exc.read()

    def metrics(self) -> Metrics:
        _, _, body = self.get("/metrics")
        return parse_metrics(body.decode())

    def status(self) -> dict[str, object]:
        _, _, body = self.get("/status")
        result: dict[str, object] = json.loads(body)
        return result

    def healthy(self) -> bool:
        try:
            return self.get("/healthz")[0] == 200
        except OSError:
            return False


def start_daemon(tmp_path: Path, config_text: str) -> Running:
    """The daemon on the `vm_psi` host fixture with `config_text`, once `/healthz` answers."""
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(config_text)
    log = tmp_path / "daemon.log"
    cmd = daemon_argv(
        tmp_path, config=config, listen=f"127.0.0.1:{port}", procfs=HOST / "proc", sysfs=HOST / "sys"
    )
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=daemon_env())
    running = Running(proc, f"http://127.0.0.1:{port}", config, log)
    try:
        wait_until(lambda: running.healthy() or proc.poll() is not None, 20.0, "/healthz")
    except BaseException:
        stop(running)
        raise
    assert proc.poll() is None, log.read_text()
    return running


def stop(running: Running) -> int:
    """Stop a `start_daemon` daemon; its exit status."""
    return stop_process(running.proc)

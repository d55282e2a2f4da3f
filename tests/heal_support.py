"""Helpers for the end-to-end healing tests: `trainwarden run` around a real 2-rank torchrun toy job."""

from __future__ import annotations

import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from toy_launch import Proc, torchrun_command, toy_env
from trainwarden.journal import JOURNAL_NAME, Entry, Journal

REPO = Path(__file__).resolve().parent.parent
TRAINWARDEN = [sys.executable, "-m", "trainwarden.daemon.cli"]
JOB = "toy"


def config_text(tmp: Path, *, cooldown: float = 45.0, policy: str = "", extra: str = "") -> str:
    """A config for fast tests: actions on, 0.5 s training collection, short learned stall floor.

    The cooldown stays above every rule's resolve_after_seconds, so a finding held firing by
    hysteresis after a restart is not acted on twice.
    """
    return f"""
[daemon]
listen = "127.0.0.1:0"
runtime_dir = "{tmp / "run"}"
state_dir = "{tmp / "state"}"

[policy]
actions_enabled = true
cooldown_seconds = {cooldown}
{policy}

[collectors.training]
interval_seconds = 0.5

[rules.stall]
floor_seconds = 4.0
min_samples = 10

[rules.process_gone]
resolve_after_seconds = 2.0
{extra}
"""


def toy_command(toy_args: list[str], nproc: int = 2) -> list[str]:
    """torchrun (no restarts of its own: `trainwarden run` restarts) with the packaged toy job."""
    return torchrun_command(["-m", "trainwarden.demo.toy_job", *toy_args], nproc)


@dataclass
class Run:
    """A `trainwarden run` process and where its files are."""

    proc: Proc
    tmp: Path

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    def port(self) -> int:
        return int(self.proc.wait_for(r"listening on http://127\.0\.0\.1:(\d+)", 30).group(1))

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port()}/metrics", timeout=5) as response:
            text: str = response.read().decode()
        return text

    def journal(self) -> list[Entry]:
        journal = Journal(self.state / JOURNAL_NAME)
        try:
            return journal.recent(500)
        finally:
            journal.close()

    def rank_pid(self, rank: int, timeout: float = 30.0, script: str = "toy_job") -> int:
        """Pid of a worker of the current run (a descendant running `script` with RANK=rank)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                children = psutil.Process(self.proc.popen.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for child in children:
                try:
                    cmdline = " ".join(child.cmdline())
                    worker = script in cmdline and "torch.distributed.run" not in cmdline
                    if worker and child.environ().get("RANK") == str(rank):
                        return child.pid
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            time.sleep(0.1)
        raise AssertionError(f"no worker with RANK={rank}; output:\n{self.proc.output()}")


def start_run(
    tmp: Path, toy_args: list[str], *, cooldown: float = 45.0, policy: str = "", extra: str = ""
) -> Run:
    """Write the config and start `trainwarden run --config ... -- torchrun toy ...`."""
    config = tmp / "config.toml"
    config.write_text(config_text(tmp, cooldown=cooldown, policy=policy, extra=extra), encoding="utf-8")
    env = toy_env(tmp)
    for name in ("TRAINWARDEN_SOCKET", "TRAINWARDEN_CONTROL_DIR"):
        env.pop(name)  # `trainwarden run` sets them for its child
    cmd = [*TRAINWARDEN, "run", "--config", str(config), "--job", JOB, "--", *toy_command(toy_args)]
    return Run(Proc(cmd, env), tmp)


def taken(entries: list[Entry], healer: str, rule: str | None = None) -> list[Entry]:
    """Journal entries of actions taken by `healer` (optionally for one rule)."""
    return [e for e in entries if e.decision == "taken" and e.healer == healer and rule in (None, e.rule)]


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus exposition (labels compared as a set)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None

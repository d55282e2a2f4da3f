"""A real single-node Slurm (munged, slurmctld, slurmd) started in a temp dir for tests.

Reusable by any test that needs Slurm: `yield from cluster_for_tests(request)` in a fixture, or
`with slurm_cluster_running() as cluster:`. Everything lives under one private temp
dir (key, sockets, state, spool, logs) on free loopback ports; `scontrol`/`sbatch` find it through
`SLURM_CONF` in `cluster.env`. Teardown cancels jobs, stops the daemons and sweeps any process that
still carries this cluster's marker in its environment (slurmstepd reparents itself to init).
Skips (with the reason) only when the Slurm/munge binaries are missing or we are not root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "scontrol", "sbatch", "scancel", "squeue")
MARKER = "TRAINWARDEN_TEST_SLURM"
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in SBIN:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def skip_reason() -> str | None:
    """Why a real Slurm cannot run here, or None when it can."""
    missing = [name for name in BINARIES if _which(name) is None]
    if missing:
        return f"Slurm/munge binaries missing: {', '.join(missing)} (apt-get install slurmctld slurmd munge)"
    if os.geteuid() != 0:
        return "a real slurmd must run as root (slurmd/slurmstepd switch users)"
    return None


SLURM_CONF = """\
ClusterName=twtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=300
"""
NODE_LINE = (
    "NodeName={name} NodeAddr={address} NodeHostname={name} Port={port} CPUs={cpus}"
    " RealMemory=256 State=UNKNOWN"
)
PARTITION_LINE = "PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP"


@dataclass
class SlurmCluster:
    """A running single-node cluster; `env` is what a client (scontrol, sbatch) needs."""

    root: Path
    node: str
    conf: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def run(self, *argv: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster."""
        result = subprocess.run(
            list(argv),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
        )
        if check and result.returncode != 0:
            cmd = " ".join(argv)
            raise AssertionError(
                f"{cmd} -> {result.returncode}\n{result.stdout}{result.stderr}\n{self.logs()}"
            )
        return result

    def scontrol(self, *args: str, check: bool = True) -> str:
        """`scontrol ARGS` output."""
        return self.run("scontrol", *args, check=check).stdout

    def node_line(self, node: str | None = None) -> str:
        """`scontrol show node -o NODE` (this cluster's first node by default)."""
        return self.scontrol("show", "node", "-o", node or self.node).strip()

    def node_field(self, key: str, node: str | None = None) -> str:
        """One field of a node's record (Reason keeps its `[user@time]` stamp and runs to the line's end)."""
        line = self.node_line(node)
        marker = f" {key}="
        start = line.find(marker)
        if start < 0:
            return ""
        rest = line[start + len(marker) :]
        if key == "Reason":
            return rest.strip()
        return rest.split(" ", 1)[0]

    def wait_for(self, predicate: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
        """Poll `check()` until true; fail with the daemons' logs when it never is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise AssertionError(
                        f"{name} exited with {proc.returncode} while waiting for {predicate}\n{self.logs()}"
                    )
            with contextlib.suppress(subprocess.TimeoutExpired, AssertionError):
                if check():
                    return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {predicate}\n{self.logs()}")

    def wait_idle(self, timeout: float = 30.0, node: str | None = None) -> None:
        """Wait until a node (the first by default) is IDLE and responding (no flags)."""
        name = node or self.node
        self.wait_for(f"node {name} IDLE", lambda: self.node_field("State", name) == "IDLE", timeout)

    def reset(self) -> None:
        """Cancel every job and resume the node, so each test starts from an idle node."""
        self.run("scancel", "--user=root", check=False)
        self.wait_for("no jobs", lambda: not self.run("squeue", "-h").stdout.strip(), 30.0)
        if "DRAIN" in self.node_field("State") or "DOWN" in self.node_field("State"):
            self.scontrol("update", f"NodeName={self.node}", "State=RESUME")
        self.wait_idle()

    def job_field(self, job_id: str, key: str) -> str:
        """One field of `scontrol show job -o JOB`."""
        for item in self.scontrol("show", "job", "-o", job_id).split():
            if item.startswith(f"{key}="):
                return item.split("=", 1)[1]
        return ""

    def submit(self, command: str, *extra: str) -> str:
        """`sbatch --wrap COMMAND` (output appended to `ROOT/job-ID.out`); returns the job id."""
        out_path = str(self.root / "job-%j.out")
        argv = ["sbatch", "--parsable", "--open-mode=append", "-o", out_path, *extra, "--wrap", command]
        return self.run(*argv).stdout.strip().split(";")[0]

    def job_output(self, job_id: str) -> str:
        """What a job submitted with `submit` has written so far."""
        path = self.root / f"job-{job_id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, tail_lines: int = 60) -> str:
        """The tail of every daemon log, for failure messages.

        A daemon's stderr repeats its log file, so only its last lines are shown (they hold what it
        printed before the log file was open, e.g. a fatal config error).
        """
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            keep = 8 if path.suffix == ".stderr" and path.with_suffix(".log").exists() else tail_lines
            try:
                lines = path.read_text(errors="replace").splitlines()[-keep:]
            except OSError as exc:
                lines = [f"(unreadable: {exc})"]
            parts.append(f"----- {path.name} -----\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel jobs, stop the daemons, then kill whatever still carries this cluster's marker."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.run("scancel", "--user=root", check=False, timeout=10)
                deadline = time.monotonic() + 10
                while (
                    time.monotonic() < deadline
                    and self.run("squeue", "-h", check=False, timeout=10).stdout.strip()
                ):
                    time.sleep(0.2)
        slurmds = sorted(name for name in self.processes if name.startswith("slurmd-"))
        for name in (*slurmds, "slurmctld", "munged"):
            proc = self.processes.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for pid in marked_pids(str(self.root)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def marked_pids(root: str) -> list[int]:
    """Processes started by the cluster rooted at `root` (they inherit its marker variable)."""
    needle = f"{MARKER}={root}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes() + b"\0"
        except OSError:
            continue
        if needle in environ:
            found.append(int(entry.name))
    return found


def _write_private(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def slurm_conf(root: Path, host: str, nodes: Mapping[str, str], cpus: int, munge_socket: Path) -> str:
    """slurm.conf: slurmctld on `host`, one slurmd per {node name: address}, each on a port of its own."""
    lines = SLURM_CONF.format(
        host=host, ctld_port=free_port(), slurmd_port=free_port(), munge_socket=munge_socket, root=root
    ).splitlines()
    lines.extend(
        NODE_LINE.format(name=name, address=address, port=free_port(), cpus=cpus)
        for name, address in nodes.items()
    )
    lines.append(PARTITION_LINE.format(names=",".join(nodes)))
    return "\n".join(lines) + "\n"


def start_slurm_cluster(timeout: float = 40.0, nodes: Mapping[str, str] | None = None) -> SlurmCluster:
    """Start munged, slurmctld and a slurmd per node under a fresh temp dir; wait until every node is idle.

    Without `nodes`, one node named after this host on 127.0.0.1 with every CPU; with {name: loopback
    address}, one slurmd each (1 CPU), and the cluster's `node` is the first name.
    """
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    # Short path: the munge socket path must fit in sun_path (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="tw-slurm-"))
    root.chmod(0o755)  # munged requires its socket dir to be searchable by all
    for sub in ("state", "spool", "log", "run", "munge"):
        (root / sub).mkdir(mode=0o755)
    (root / "key").mkdir(mode=0o700)
    _write_private(root / "key" / "munge.key", os.urandom(1024), 0o400)
    host = socket.gethostname().split(".")[0]  # slurmctld runs only where SlurmctldHost names
    cpus = (os.cpu_count() or 1) if nodes is None else 1
    nodes = {host: "127.0.0.1"} if nodes is None else dict(nodes)
    for name in nodes:
        (root / "spool" / name).mkdir(mode=0o755)
    conf = root / "slurm.conf"
    munge_socket = root / "munge" / "munge.sock"
    conf.write_text(slurm_conf(root, host, nodes, cpus, munge_socket), encoding="utf-8")
    env = {**os.environ, "SLURM_CONF": str(conf), MARKER: str(root)}
    env["PATH"] = ":".join([env.get("PATH", ""), *SBIN])
    cluster = SlurmCluster(root, next(iter(nodes)), conf, env)

    def spawn(name: str, argv: list[str]) -> None:
        with (root / "log" / f"{name}.stderr").open("wb") as log:
            cluster.processes[name] = subprocess.Popen(
                argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    try:
        spawn(
            "munged",
            [
                str(_which("munged")),
                "--foreground",
                f"--socket={munge_socket}",
                f"--key-file={root / 'key' / 'munge.key'}",
                f"--pid-file={root / 'run' / 'munged.pid'}",
                f"--log-file={root / 'log' / 'munged.log'}",
                f"--seed-file={root / 'run' / 'munged.seed'}",
            ],
        )
        cluster.wait_for("munge socket", munge_socket.exists, 10.0)
        spawn("slurmctld", [str(_which("slurmctld")), "-D", "-i", "-f", str(conf)])
        cluster.wait_for(
            "slurmctld answering", lambda: cluster.run("scontrol", "ping").returncode == 0, timeout
        )
        for name in nodes:
            spawn(f"slurmd-{name}", [str(_which("slurmd")), "-D", "-N", name, "-f", str(conf)])
        for name in nodes:
            cluster.wait_idle(timeout, node=name)
    except BaseException:
        logs = cluster.logs()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        if isinstance(logs, str):
            print(logs)
        raise
    return cluster


@contextlib.contextmanager
def slurm_cluster_running(timeout: float = 40.0) -> Iterator[SlurmCluster]:
    """Start a cluster, yield it, always tear it down and remove its temp dir."""
    cluster = start_slurm_cluster(timeout)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def cluster_for_tests(request: pytest.FixtureRequest) -> Iterator[SlurmCluster]:
    """Body of a Slurm fixture: yields a cluster; if a test failed, shows the daemons' logs at teardown.

    Use it as `yield from cluster_for_tests(request)` in a (module-scoped) fixture of your own.
    The logs go straight to the terminal: output captured during a module fixture's teardown
    would otherwise be shown with no failure report.
    """
    failed_before = request.session.testsfailed
    with slurm_cluster_running() as cluster:
        yield cluster
        if request.session.testsfailed > failed_before:
            show(request.config, f"\n===== Slurm logs ({cluster.root}) =====\n{cluster.logs()}")


def show(config: pytest.Config, text: str) -> None:
    """Print past pytest's output capture."""
    capture = config.pluginmanager.getplugin("capturemanager")
    context = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
    with context:
        print(text, flush=True)

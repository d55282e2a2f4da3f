"""deploy/slurm/trainwarden-preflight.sh as Prolog and HealthCheckProgram of a real slurmctld + slurmd.

A healthy node runs the job; a node with an injected fault (NVML fixture with a lost GPU, a full
checkpoint volume, an XID 79 in the kernel log fixture) is drained with the `trainwarden:` reason
and the job does not run on it.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from preflight_support import KMSG_CAPTURE, FixtureNode, healthy_node
from slurm_cluster import SlurmCluster, cluster_for_tests
from trainwarden.journal import JOURNAL_NAME, Entry, Journal

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "slurm" / "trainwarden-preflight.sh"
TRAINWARDEN = Path(sys.executable).parent / "trainwarden"


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[SlurmCluster]:
    """One real single-node Slurm for this module, its Prolog pointed at the shipped script."""
    for started in cluster_for_tests(request):
        wrapper = started.root / "prolog-wrapper.sh"
        # slurmd gives a prolog a bare environment: the wrapper adds what a node's slurm.conf and
        # /etc/trainwarden/preflight.env would give it, then runs the shipped script unchanged.
        wrapper.write_text(
            "#!/bin/sh\n"
            f"export SLURM_CONF={shlex.quote(str(started.conf))}\n"
            f"export TRAINWARDEN_ENV={shlex.quote(str(started.root / 'preflight.env'))}\n"
            f"exec {shlex.quote(str(SCRIPT))}\n"
        )
        wrapper.chmod(0o755)
        with started.conf.open("a") as conf:
            conf.write(f"Prolog={wrapper}\nEpilog={wrapper}\n")
        started.scontrol("reconfigure")
        yield started


@pytest.fixture
def node(cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FixtureNode]:
    """A healthy fixture node whose settings the Slurm node's prolog reads; the cluster is reset after."""
    fixture = healthy_node(tmp_path, monkeypatch)
    tmp_path.chmod(0o755)
    write_env(cluster, fixture)
    cluster.wait_idle()
    yield fixture
    # Healthy again before the resume, so no epilog or health check still running drains it anew.
    fixture.use_nvml("h100-sxm-8gpu")
    fixture.kmsg.write_text("")
    write_env(cluster, fixture)
    cluster.reset()


def write_env(cluster: SlurmCluster, node: FixtureNode, *extra: str) -> None:
    """The admin's preflight.env: which trainwarden, which NVML, which fixture trees and floors."""
    args = [
        f"--path.procfs={node.procfs}",
        f"--path.sysfs={node.sysfs}",
        f"--path.devfs={node.devfs}",
        f"--state-dir={node.state_dir}",
        f"--checkpoint-dir={node.checkpoints}",
        "--min-free-gib=0.001",
        "--write-probe-mib=1",
        "--min-write-mib-per-second=0",
        "--daemon-url=http://127.0.0.1:9",
        *extra,
    ]
    (cluster.root / "preflight.env").write_text(
        f"TRAINWARDEN_BIN={shlex.quote(str(TRAINWARDEN))}\n"
        f"TRAINWARDEN_CONFIG=/nonexistent\n"
        f"export TRAINWARDEN_NVML_FIXTURE={shlex.quote(os.environ['TRAINWARDEN_NVML_FIXTURE'])}\n"
        f"TRAINWARDEN_PREFLIGHT_ARGS={shlex.quote(' '.join(args))}\n"
    )


def run_to_end(cluster: SlurmCluster) -> str:
    """Submit a job that prints a marker; wait until it completed; its output."""
    job = cluster.submit("echo job-ran-here")
    cluster.wait_for(f"job {job} COMPLETED", lambda: cluster.job_field(job, "JobState") == "COMPLETED", 60.0)
    return cluster.job_output(job)


def kept_off(cluster: SlurmCluster) -> tuple[str, str]:
    """Submit a job; wait until Slurm has handled the prolog failure; the node's reason, the job's output.

    Slurm requeues and holds a batch job whose prolog failed; once it is held, Slurm's own
    prolog-failure drain has happened too, so the reason read then is the one that stays.
    """
    job = cluster.submit("echo job-ran-here")

    def held() -> bool:
        return cluster.job_field(job, "JobState") == "PENDING" and "held" in cluster.job_field(job, "Reason")

    cluster.wait_for(f"job {job} requeued and held", held, 60.0)
    assert "DRAIN" in cluster.node_field("State")
    return cluster.node_field("Reason"), cluster.job_output(job)


def test_healthy_node_runs_the_job(cluster: SlurmCluster, node: FixtureNode) -> None:
    """With every check passing, the prolog lets the job run and the node stays in service."""
    assert "job-ran-here" in run_to_end(cluster)
    assert "DRAIN" not in cluster.node_field("State")
    assert (node.state_dir / "preflight.json").is_file()


def test_epilog_records_the_end_of_the_job(cluster: SlurmCluster, node: FixtureNode) -> None:
    """As the Epilog, the node is checked again and the journal holds a row naming the job that ended."""
    job = cluster.submit("echo job-ran-here")
    cluster.wait_for(f"job {job} COMPLETED", lambda: cluster.job_field(job, "JobState") == "COMPLETED", 60.0)

    def epilog_row() -> list[Entry]:
        if not (node.state_dir / JOURNAL_NAME).exists():
            return []
        journal = Journal(node.state_dir / JOURNAL_NAME)
        try:
            return [e for e in journal.recent() if e.subject.endswith(f",job={job}")]
        finally:
            journal.close()

    cluster.wait_for("the epilog's journal row", lambda: bool(epilog_row()), 60.0)
    (row,) = epilog_row()
    assert row.rule == "preflight"
    assert row.result == "healthy"
    assert row.reason.startswith(f"after job {job} ended: ")
    assert "DRAIN" not in cluster.node_field("State")


def test_lost_gpu_drains_the_node_and_the_job_does_not_run(cluster: SlurmCluster, node: FixtureNode) -> None:
    """An NVML fixture with a lost GPU: drained with trainwarden's reason naming the GPU, job not run."""
    node.use_nvml("h100-lost-gpu")
    write_env(cluster, node)
    reason, output = kept_off(cluster)
    assert reason.startswith("trainwarden: preflight gpu_nvml"), reason
    assert "GPU 3 is lost" in reason
    assert "job-ran-here" not in output


def test_full_checkpoint_volume_drains_the_node(cluster: SlurmCluster, node: FixtureNode) -> None:
    """A checkpoint volume below the free-space floor keeps the job off the node, with that reason."""
    write_env(cluster, node, "--min-free-gib=1000000000")
    reason, output = kept_off(cluster)
    assert reason.startswith("trainwarden: preflight checkpoint_space"), reason
    assert "job-ran-here" not in output


def test_xid_in_the_kernel_log_drains_the_node(cluster: SlurmCluster, node: FixtureNode) -> None:
    """An XID 79 in the kernel log fixture keeps the job off the node, naming the XID."""
    node.kmsg.write_text(KMSG_CAPTURE.read_text())
    reason, output = kept_off(cluster)
    assert reason.startswith("trainwarden: preflight kernel_xid"), reason
    assert "XID 79" in reason
    assert "job-ran-here" not in output


def test_health_check_program_drains_a_node_that_goes_bad_between_jobs(
    cluster: SlurmCluster, node: FixtureNode
) -> None:
    """As HealthCheckProgram: a healthy node stays in service; a lost GPU then drains it, with no job."""
    with cluster.conf.open("a") as conf:
        conf.write(f"HealthCheckProgram={cluster.root / 'prolog-wrapper.sh'}\nHealthCheckInterval=2\n")
    cluster.scontrol("reconfigure")
    result = node.state_dir / "preflight.json"
    cluster.wait_for("a health check run", result.is_file, 60.0)
    assert "DRAIN" not in cluster.node_field("State")
    node.use_nvml("h100-lost-gpu")
    write_env(cluster, node)
    cluster.wait_for("node drained", lambda: "DRAIN" in cluster.node_field("State"), 60.0)
    assert cluster.node_field("Reason").startswith("trainwarden: preflight gpu_nvml")
    assert cluster.run("squeue", "-h").stdout.strip() == ""
    node.use_nvml("h100-sxm-8gpu")  # healthy again, so the teardown's resume is not drained anew
    write_env(cluster, node)


def test_health_check_leaves_an_admins_drain_and_reason_alone(
    cluster: SlurmCluster, node: FixtureNode
) -> None:
    """A node an admin drained for maintenance keeps that reason while a failing health check runs on it."""
    if "HealthCheckProgram" not in cluster.conf.read_text():
        with cluster.conf.open("a") as conf:
            conf.write(f"HealthCheckProgram={cluster.root / 'prolog-wrapper.sh'}\nHealthCheckInterval=2\n")
        cluster.scontrol("reconfigure")
    cluster.scontrol("update", f"NodeName={cluster.node}", "State=DRAIN", "Reason=maintenance")
    node.use_nvml("h100-lost-gpu")
    write_env(cluster, node)
    result = node.state_dir / "preflight.json"

    def failing_check_ran() -> bool:
        return result.is_file() and '"healthy": false' in result.read_text()

    cluster.wait_for("a failing health check run", failing_check_ran, 60.0)
    assert cluster.node_field("Reason").startswith("maintenance")
    node.use_nvml("h100-sxm-8gpu")
    write_env(cluster, node)

"""The Slurm drain healer and requeue backend against a real single-node Slurm started by the test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, cluster_for_tests
from trainwarden.backends.slurm import Scontrol, requeue_job
from trainwarden.commands import CommandRunner
from trainwarden.healers.base import Action, ActionOutcome, HealerContext
from trainwarden.healers.slurm_drain import SlurmDrainHealer, SlurmDrainOptions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster_module(request: pytest.FixtureRequest) -> Iterator[SlurmCluster]:
    """One real Slurm for the whole module (startup takes a few seconds)."""
    yield from cluster_for_tests(request)


@pytest.fixture
def slurm(cluster_module: SlurmCluster) -> SlurmCluster:
    """The module's cluster, reset to an idle node with no jobs before each test."""
    cluster_module.reset()
    return cluster_module


def make_healer(cluster: SlurmCluster, tmp_path: Path, **overrides: object) -> SlurmDrainHealer:
    options = SlurmDrainOptions(slurm_conf=str(cluster.conf), node=cluster.node, **overrides)  # type: ignore[arg-type]
    return SlurmDrainHealer(options, HealerContext(runtime_dir=tmp_path, state_dir=tmp_path))


def drain(reason: str = "xid 79 on gpu 3", **params: str | int) -> Action:
    return Action("slurm_drain", f"drain-{reason}", reason, params={"operation": "drain", **params})


UNDRAIN = Action("slurm_drain", "undrain", "healthy again", params={"operation": "undrain"})


def test_drain_sets_drain_state_with_trainwarden_reason(slurm: SlurmCluster, tmp_path: Path) -> None:
    """Draining a healthy node leaves it in DRAIN with a reason that starts with `trainwarden:`."""
    result = make_healer(slurm, tmp_path).apply(drain('xid 79 "gpu=3"\nrm -rf /'), dry_run=False)
    assert result.outcome is ActionOutcome.APPLIED, result.detail
    assert "DRAIN" in slurm.node_field("State")
    reason = slurm.node_field("Reason")
    assert reason.startswith("trainwarden: xid 79 _gpu_3_ rm -rf /"), reason


def test_drain_twice_is_noop(slurm: SlurmCluster, tmp_path: Path) -> None:
    """A second drain of a node trainwarden already drained changes nothing and says NOOP."""
    healer = make_healer(slurm, tmp_path)
    assert healer.apply(drain(), dry_run=False).outcome is ActionOutcome.APPLIED
    first = slurm.node_field("Reason")
    second = healer.apply(drain("another reason"), dry_run=False)
    assert second.outcome is ActionOutcome.NOOP, second.detail
    assert slurm.node_field("Reason") == first


def test_admin_drain_is_never_touched(slurm: SlurmCluster, tmp_path: Path) -> None:
    """A node an admin drained keeps its reason: drain is a NOOP and undrain is refused."""
    slurm.scontrol("update", f"NodeName={slurm.node}", "State=DRAIN", "Reason=admin: bad DIMM")
    healer = make_healer(slurm, tmp_path)
    drained = healer.apply(drain(), dry_run=False)
    assert drained.outcome is ActionOutcome.NOOP
    assert "someone else" in drained.detail
    undrained = healer.apply(UNDRAIN, dry_run=False)
    assert undrained.outcome is ActionOutcome.FAILED
    assert undrained.data["refused"] == "foreign_drain"
    assert "DRAIN" in slurm.node_field("State")
    assert slurm.node_field("Reason").startswith("admin: bad DIMM")


def test_undrain_resumes_our_drain(slurm: SlurmCluster, tmp_path: Path) -> None:
    """Undrain resumes a node trainwarden drained, and a second undrain is a NOOP."""
    healer = make_healer(slurm, tmp_path)
    assert healer.apply(drain(), dry_run=False).outcome is ActionOutcome.APPLIED
    result = healer.apply(UNDRAIN, dry_run=False)
    assert result.outcome is ActionOutcome.APPLIED, result.detail
    assert "DRAIN" not in slurm.node_field("State")
    assert healer.apply(UNDRAIN, dry_run=False).outcome is ActionOutcome.NOOP


def test_budget_refuses_when_reached(slurm: SlurmCluster, tmp_path: Path) -> None:
    """With a budget of 0 drained nodes the drain is refused and the node stays schedulable."""
    result = make_healer(slurm, tmp_path, max_drained_nodes=0).apply(drain(), dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert result.data["refused"] == "budget"
    assert "budget of 0" in result.detail
    assert slurm.node_field("State") == "IDLE"


def test_budget_counts_drains_from_scontrol(slurm: SlurmCluster, tmp_path: Path) -> None:
    """The budget counts nodes drained by trainwarden as scontrol reports them, not a local tally."""
    healer = make_healer(slurm, tmp_path, max_drained_nodes=1)
    assert healer.apply(drain(), dry_run=False).outcome is ActionOutcome.APPLIED
    nodes = healer.scontrol.nodes()
    assert [n.name for n in nodes if n.drained_by_trainwarden] == [slurm.node]


def test_dry_run_changes_nothing(slurm: SlurmCluster, tmp_path: Path) -> None:
    """A dry-run drain reports what it would do and leaves the node IDLE."""
    result = make_healer(slurm, tmp_path).apply(drain(), dry_run=True)
    assert result.outcome is ActionOutcome.DRY_RUN
    assert "would drain" in result.detail
    assert slurm.node_field("State") == "IDLE"
    assert slurm.node_field("Reason") in ("", "(null)")


def test_bad_node_name_is_refused_and_counted(slurm: SlurmCluster, tmp_path: Path) -> None:
    """A node name that could be an option or carry shell text is refused before scontrol runs."""
    healer = make_healer(slurm, tmp_path)
    action = Action("slurm_drain", "k", "r", subject={"node": "--all; reboot"})
    result = healer.apply(action, dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert result.data["refused"] == "bad_input"
    counts = {dict(s.labels)["result"]: s.value for s in healer.samples()}
    assert counts.get("refused") == 1


def test_unknown_node_fails_clearly(slurm: SlurmCluster, tmp_path: Path) -> None:
    """Draining a node Slurm does not know fails with a message naming the node."""
    action = Action("slurm_drain", "k", "r", subject={"node": "no-such-node"})
    result = make_healer(slurm, tmp_path).apply(action, dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert "no-such-node is unknown to Slurm" in result.detail


def test_requeue_of_running_batch_job(slurm: SlurmCluster) -> None:
    """A running `sbatch --wrap 'sleep 300'` job is requeued (restarts +1), and again only once."""
    out = slurm.run("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 300").stdout
    job_id = out.strip().split(";")[0]
    slurm.wait_for(f"job {job_id} RUNNING", lambda: slurm.job_field(job_id, "JobState") == "RUNNING")
    scontrol = Scontrol(CommandRunner(env={"SLURM_CONF": str(slurm.conf)}))
    assert requeue_job(scontrol, job_id, dry_run=True).outcome is ActionOutcome.DRY_RUN
    assert slurm.job_field(job_id, "Restarts") == "0"
    result = requeue_job(scontrol, job_id, dry_run=False, restarts_seen=0)
    assert result.outcome is ActionOutcome.APPLIED, result.detail
    assert slurm.job_field(job_id, "Restarts") == "1"
    again = requeue_job(scontrol, job_id, dry_run=False, restarts_seen=0)
    assert again.outcome is ActionOutcome.NOOP, again.detail
    assert slurm.job_field(job_id, "Restarts") == "1"


def test_requeue_refuses_cancelled_job(slurm: SlurmCluster) -> None:
    """A job its owner cancelled is not brought back by a requeue."""
    job_id = slurm.run("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 300").stdout.strip()
    slurm.run("scancel", job_id)
    slurm.wait_for(f"job {job_id} CANCELLED", lambda: slurm.job_field(job_id, "JobState") == "CANCELLED")
    scontrol = Scontrol(CommandRunner(env={"SLURM_CONF": str(slurm.conf)}))
    result = requeue_job(scontrol, job_id, dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert result.data["refused"] == "job_state"
    time.sleep(0.2)
    assert slurm.job_field(job_id, "JobState") == "CANCELLED"


def test_requeue_unknown_job_fails_clearly(slurm: SlurmCluster) -> None:
    """Requeueing a job id slurmctld does not know fails with a message naming the job."""
    scontrol = Scontrol(CommandRunner(env={"SLURM_CONF": str(slurm.conf)}))
    result = requeue_job(scontrol, "987654", dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert "987654 is unknown" in result.detail


def test_drain_with_a_running_job_lets_it_finish(slurm: SlurmCluster, tmp_path: Path) -> None:
    """Draining a busy node marks it draining (ALLOCATED/MIXED+DRAIN) and the running job keeps running."""
    job_id = slurm.run("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 300").stdout.strip()
    slurm.wait_for(f"job {job_id} RUNNING", lambda: slurm.job_field(job_id, "JobState") == "RUNNING")
    result = make_healer(slurm, tmp_path).apply(drain(), dry_run=False)
    assert result.outcome is ActionOutcome.APPLIED, result.detail
    state = slurm.node_field("State")
    assert state.split("+")[0] in ("ALLOCATED", "MIXED"), state
    assert "DRAIN" in state
    assert slurm.job_field(job_id, "JobState") == "RUNNING"


def test_missing_scontrol_fails_clearly(tmp_path: Path) -> None:
    """Without a usable scontrol the action fails with a message naming the command, and never raises."""
    options = SlurmDrainOptions(enabled=True, scontrol=str(tmp_path / "no-scontrol"), node="n1")
    healer = SlurmDrainHealer(options, HealerContext(runtime_dir=tmp_path, state_dir=tmp_path))
    result = healer.apply(drain(), dry_run=False)
    assert result.outcome is ActionOutcome.FAILED
    assert "scontrol show node n1" in result.detail
    assert "not_found" in result.detail


def test_requeued_job_runs_again_and_sees_its_restart_count(slurm: SlurmCluster) -> None:
    """After a requeue with `start_now`, Slurm starts the job again at once with SLURM_RESTART_COUNT=1."""
    job_id = slurm.submit("echo run restart=${SLURM_RESTART_COUNT:-0}; sleep 300")
    slurm.wait_for(f"job {job_id} first run", lambda: "restart=0" in slurm.job_output(job_id))
    scontrol = Scontrol(CommandRunner(env={"SLURM_CONF": str(slurm.conf)}))
    result = requeue_job(scontrol, job_id, dry_run=False, restarts_seen=0, start_now=True)
    assert result.outcome is ActionOutcome.APPLIED, result.detail
    assert "begin-time hold cleared" in result.detail
    slurm.wait_for(f"job {job_id} second run", lambda: "restart=1" in slurm.job_output(job_id), timeout=30)
    assert slurm.job_field(job_id, "JobState") == "RUNNING"

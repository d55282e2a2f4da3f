"""Parsing `scontrol show ... -o` output, on lines captured from Slurm 22.05.8 (Debian 12)."""

from __future__ import annotations

import pytest

from trainwarden.backends.slurm import SlurmError, parse_job, parse_nodes, parse_record

# Captured with `scontrol show node -o vm` after `scontrol update NodeName=vm State=DRAIN
# "Reason=trainwarden: xid 79 on gpu 3 (rank=2)"` on a test cluster.
DRAINED_NODE = (
    "NodeName=vm Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 CPUEfctv=2 CPUTot=2 CPULoad=0.16 "
    "AvailableFeatures=(null) ActiveFeatures=(null) Gres=(null) NodeAddr=127.0.0.1 NodeHostName=vm "
    "Version=22.05.8 OS=Linux 6.18.44-fc-v782 #1 SMP PREEMPT_DYNAMIC @0  RealMemory=256 AllocMem=0 "
    "FreeMem=23296 Sockets=2 Boards=1 State=IDLE+DRAIN ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A "
    "MCS_label=N/A Partitions=debug  BootTime=2026-11-23T15:28:59 SlurmdStartTime=2026-11-23T15:37:25 "
    "LastBusyTime=2026-11-23T15:37:25 CfgTRES=cpu=2,mem=256M,billing=2 AllocTRES= CapWatts=n/a "
    "CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s "
    "Reason=trainwarden: xid 79 on gpu 3 (rank=2) [root@2026-11-23T15:37:30]"
)
IDLE_NODE = (
    "NodeName=vm2 Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 CPUEfctv=2 CPUTot=2 CPULoad=0.15 "
    "NodeAddr=127.0.0.1 NodeHostName=vm2 Version=22.05.8 OS=Linux 6.18.44-fc-v782 #1 SMP PREEMPT_DYNAMIC @0  "
    "RealMemory=256 State=IDLE ThreadsPerCore=1 Partitions=debug  CfgTRES=cpu=2,mem=256M,billing=2 "
    "AllocTRES= ExtSensorsTemp=n/s"
)
ADMIN_DOWN = (
    "NodeName=vm3 Arch=x86_64 State=DOWN+DRAIN+NOT_RESPONDING ThreadsPerCore=1 Partitions=debug "
    "Reason=admin: bad DIMM, ticket 42 [alice@2026-11-20T09:00:00]"
)
RUNNING_JOB = (
    "JobId=1 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901759 Nice=0 "
    "Account=(null) QOS=(null) JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=0 "
    "BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:01 TimeLimit=UNLIMITED TimeMin=N/A "
    "AllocNode:Sid=localhost:4327 ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 "
    "NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 "
    "WorkDir=/tmp StdErr=/dev/null StdIn=/dev/null StdOut=/dev/null Power= "
)


def test_values_with_spaces_stay_whole() -> None:
    """Values that contain spaces (OS, Reason) are read whole, and `Key:Sub` / `A/B` keys are kept."""
    fields = parse_record(DRAINED_NODE)
    assert fields["OS"] == "Linux 6.18.44-fc-v782 #1 SMP PREEMPT_DYNAMIC @0"
    assert fields["CfgTRES"] == "cpu=2,mem=256M,billing=2"
    assert fields["AllocTRES"] == ""
    job = parse_record(RUNNING_JOB)
    assert job["AllocNode:Sid"] == "localhost:4327"
    assert job["CPUs/Task"] == "1"
    assert job["ReqB:S:C:T"] == "0:0:*:*"


def test_node_state_flags_and_reason() -> None:
    """State splits into base and flags; the reason loses its `[user@time]` stamp, which is kept apart."""
    drained, idle, down = parse_nodes(f"{DRAINED_NODE}\n{IDLE_NODE}\n\n{ADMIN_DOWN}\n")
    assert (drained.name, drained.state, drained.flags) == ("vm", "IDLE", frozenset({"DRAIN"}))
    assert drained.reason == "trainwarden: xid 79 on gpu 3 (rank=2)"
    assert drained.reason_user == "root"
    assert drained.drained_by_trainwarden
    assert not idle.drained
    assert idle.reason == ""
    assert down.state == "DOWN"
    assert down.drained
    assert not down.drained_by_trainwarden
    assert down.reason == "admin: bad DIMM, ticket 42"


def test_job_fields() -> None:
    """A job record gives its state, requeue permission, restart count and batch flag."""
    job = parse_job(RUNNING_JOB)
    assert (job.job_id, job.state, job.requeue_allowed, job.restarts, job.batch) == (
        "1",
        "RUNNING",
        True,
        0,
        True,
    )


@pytest.mark.parametrize("text", ["", "garbage without fields", "JobId=1 Restarts=x JobState=RUNNING"])
def test_unreadable_job_output_is_a_clear_error(text: str) -> None:
    """Output we cannot read raises SlurmError naming the problem, never a KeyError."""
    with pytest.raises(SlurmError):
        parse_job(text)


def test_node_record_without_state_is_a_clear_error() -> None:
    """A node line without NodeName or State raises SlurmError."""
    with pytest.raises(SlurmError, match="lacks NodeName or State"):
        parse_nodes("NodeName=vm Arch=x86_64")

"""What the healers learn from the training socket: each rank's pid and stack file (hello), a clean exit
(bye), and forgetting a restarted job; the Reporter announcing its faulthandler file; and the supervised
job's ranks recognised by their process ancestry, whatever job name they report."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from training_support import collect_into, connect, hello, received, running_collector, send, wait_until
from trainwarden.backends.base import RankProcess
from trainwarden.backends.lineage import descends_from, parent_of
from trainwarden.backends.supervise import Supervisor
from trainwarden.client.reporter import Reporter
from trainwarden.healers.base import ActionOutcome
from trainwarden.model import MetricSpec
from trainwarden.paths import HostPaths
from trainwarden.protocol import Hello, Reason, RecordError, encode, parse
from trainwarden.store import Store


def test_hello_carries_an_optional_stack_file() -> None:
    """A hello may name its stack file; absent means none; a non-string or NUL path is a bad field."""
    parsed = parse(encode({**hello(0), "stack_file": "/run/tw/stacks/toy.rank0.1.stacks.txt"})[4:])
    assert isinstance(parsed, Hello)
    assert parsed.stack_file.endswith("toy.rank0.1.stacks.txt")
    plain = parse(encode(hello(0))[4:])
    assert isinstance(plain, Hello)
    assert plain.stack_file == ""
    for bad in (42, "a\x00b", ""):
        with pytest.raises(RecordError) as info:
            parse(encode({**hello(0), "stack_file": bad})[4:])
        assert info.value.reason == Reason.BAD_FIELD
        assert "stack_file" in str(info.value)


def test_collector_lists_rank_processes_marks_clean_exits_and_forgets_a_job(tmp_path: Path) -> None:
    """processes() gives each rank's pid and stack file; a bye sets exited_cleanly; forget() drops the job."""
    with running_collector(tmp_path / "run") as collector:
        sock = connect(collector)
        send(sock, {**hello(1, world_size=2), "stack_file": "/tmp/s1"})
        other = connect(collector)
        send(other, hello(0, job="other", world_size=1))
        wait_until(lambda: received(collector) == 2, what="hellos")
        assert collector.processes("toy") == [RankProcess("toy", 1, 1, os.getpid(), "/tmp/s1")]
        store = collect_into(collector)
        assert store.value("trainwarden_train_exited_cleanly", job="toy", rank="1") == 0.0
        send(sock, {"type": "bye"})
        wait_until(lambda: received(collector) == 3, what="bye")
        store = collect_into(collector, Store())
        assert store.value("trainwarden_train_exited_cleanly", job="toy", rank="1") == 1.0
        collector.forget("toy")
        assert collector.processes("toy") == []
        assert [p.job for p in collector.processes("other")] == ["other"]
        assert collect_into(collector, Store()).value("trainwarden_train_pid", job="toy", rank="1") is None
        sock.close()
        other.close()


def test_store_drop_windows_forgets_only_the_matching_series() -> None:
    """drop_windows(job=...) removes the history of that job's series and keeps every other window."""
    spec = MetricSpec("trainwarden_test_loss", "t", labelnames=("job", "rank"), window=True)
    store = Store()
    store.replace(
        "s", [spec.sample(1.0, 1.0, job="a", rank="0"), spec.sample(2.0, 1.0, job="b", rank="0")], 1.0
    )
    assert store.drop_windows(job="a") == 1
    assert store.window("trainwarden_test_loss", (("job", "a"), ("rank", "0"))) == []
    assert len(store.window("trainwarden_test_loss", (("job", "b"), ("rank", "0")))) == 1


def test_reporter_registers_a_stack_file_and_can_opt_out(tmp_path: Path) -> None:
    """The Reporter opens its rank's stack file under TRAINWARDEN_STACK_DIR; stack_dump=False opens none."""
    env = {
        "TRAINWARDEN_SOCKET": str(tmp_path / "absent.sock"),
        "TRAINWARDEN_STACK_DIR": str(tmp_path / "stacks"),
        "RANK": "3",
        "WORLD_SIZE": "4",
    }
    with Reporter(job="toy", env=env, background=False) as reporter:
        assert reporter.stack_file == tmp_path / "stacks" / f"toy.rank3.{os.getpid()}.stacks.txt"
        assert reporter.stack_file.exists()
    with Reporter(job="toy", env=env, background=False, stack_dump=False) as quiet:
        assert quiet.stack_file is None


# A launcher-like parent whose worker (in a session of its own, as torchrun starts it) reports under a
# job name of its own choosing, then idles.
NAMED_TREE = """
import subprocess, sys
worker = (
    "import time; from trainwarden.client.reporter import Reporter; "
    "reporter = Reporter.from_env(job='mine'); time.sleep(600)"
)
child = subprocess.Popen([sys.executable, "-c", worker], start_new_session=True)
child.wait()
"""


def test_supervisor_recognises_its_ranks_by_ancestry_whatever_job_they_name(tmp_path: Path) -> None:
    """A rank descending from the supervised child is restartable under the name it chose; a rank of
    another process tree is refused with the reason, and the restarted tree's ranks are forgotten."""
    with running_collector(tmp_path / "run") as collector:
        env = {**os.environ, "TRAINWARDEN_SOCKET": str(collector.socket_path)}
        sup = Supervisor(
            [sys.executable, "-c", NAMED_TREE],
            job="python",
            env=env,
            ranks=collector.processes,
            forget=collector.forget,
        )
        outsider = connect(collector)
        send(outsider, hello(0, job="other", world_size=1))
        sup.start()
        try:
            wait_until(lambda: len(collector.processes("mine")) == 1, timeout=30, what="the worker's hello")
            wait_until(lambda: len(collector.processes("other")) == 1, what="the outsider's hello")
            worker = collector.processes("mine")[0].pid
            assert worker != sup.pid
            assert sup.supervised_jobs() == {"python", "mine"}
            refused = sup.restart("other", "test", key="k-other")
            assert refused.outcome is ActionOutcome.FAILED
            assert "is not the supervised job 'python'" in refused.detail
            assert f"pid(s) [{os.getpid()}]" in refused.detail
            assert sup.generation == 1
            result = sup.restart("mine", "stall", key="k-mine")
            assert result.outcome is ActionOutcome.APPLIED, result.detail
            assert result.data["killed"] == 2
            assert sup.retired(worker)
            assert [p.job for p in collector.processes("other")] == ["other"]
            wait_until(
                lambda: [p.pid for p in collector.processes("mine")] not in ([], [worker]),
                timeout=30,
                what="the restarted worker's hello",
            )
            assert sup.supervised_jobs() == {"python", "mine"}
        finally:
            sup.stop()
            outsider.close()


def test_descends_from_walks_parent_links_of_a_fixture_proc_tree(tmp_path: Path) -> None:
    """Ancestry is read from /proc/PID/stat through HostPaths: a grandchild descends, a sibling does not."""
    tree = {10: 1, 11: 10, 12: 11, 20: 1}
    for pid, ppid in tree.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (py thon) S {ppid} {pid} {pid} 0 -1\n")
    paths = HostPaths(procfs=tmp_path)
    assert parent_of(12, paths) == 11
    assert descends_from(12, 10, paths)
    assert descends_from(10, 10, paths)
    assert not descends_from(20, 10, paths)
    assert not descends_from(99, 10, paths)  # gone
    assert not descends_from(12, 0, paths)

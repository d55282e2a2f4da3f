"""What the healers learn from the training socket: each rank's pid and stack file (hello), a clean exit
(bye), and forgetting a restarted job; plus the Reporter announcing its faulthandler file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training_support import collect_into, connect, hello, received, running_collector, send, wait_until
from trainwarden.backends.base import RankProcess
from trainwarden.client.reporter import Reporter
from trainwarden.model import MetricSpec
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

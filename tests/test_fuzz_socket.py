"""Fuzzing the training socket: every hostile frame is counted once, the server lives, real clients get in."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import fuzz
from training_support import connect, hello, received, running_collector, send, wait_until
from trainwarden.collectors.training import TrainingCollector
from trainwarden.protocol import MAX_RECORD_BYTES

FUZZ = fuzz()

VALID: list[dict[str, Any]] = [
    hello(0),
    {"type": "step", "step": 5, "step_seconds": 0.1, "loss": 1.5, "grad_norm": 0.7, "lr": 1e-3},
    {"type": "phase", "phase": "eval", "event": "begin"},
    {"type": "phase", "phase": "eval", "event": "end", "seconds": 2.0},
    {"type": "checkpoint", "step": 5, "path": "/ckpt/step_5"},
    {"type": "checkpoint", "step": 6, "path": "/ckpt/step_6", "seconds": 0.2, "local_skipped": 3},
    {"type": "collective", "op": "all_reduce", "event": "begin", "seq": 1, "bytes": 1024},
    {"type": "bye", "dropped": 0},
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63 - 1, 2**53, 2**53 - 1, -1, 0]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "", "x" * 5000, "../../etc/passwd", "\x00"]),
    st.text(max_size=16),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """One frame's payload: a valid record with fields replaced, raw bytes, or a JSON bomb."""
    kind = draw(st.integers(min_value=0, max_value=9))
    if kind == 0:
        return draw(st.binary(max_size=64))
    if kind == 1:
        depth = draw(st.integers(min_value=1, max_value=30_000))
        return (b"[" * depth + b"]" * depth)[:MAX_RECORD_BYTES]
    record = dict(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        key = draw(st.sampled_from([*sorted(record), "type", "extra_key"]))
        record[key] = draw(json_values)
    return json.dumps(record).encode()[:MAX_RECORD_BYTES]


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainingCollector]:
    """One real collector for every example (its counters only grow), rank table big enough for all."""
    with running_collector(tmp_path_factory.mktemp("sock"), max_ranks=1 << 20) as running:
        yield running


def _accounted(collector: TrainingCollector) -> int:
    status = collector.status()
    return int(status["received"]) + sum(int(n) for n in status["rejected"].values())


@fuzz(1 / 3)
@given(frames=st.lists(payloads(), min_size=1, max_size=12), with_hello=st.booleans())
def test_every_frame_is_received_or_rejected_once_and_the_server_lives(
    collector: TrainingCollector, frames: list[bytes], with_hello: bool
) -> None:
    """Each well-framed payload, valid or hostile, counts exactly once; collection and status never fail."""
    before = _accounted(collector)
    sock = connect(collector)
    wire = b"".join(struct.pack(">I", len(p)) + p for p in frames)
    if with_hello:
        send(sock, hello(0, job="fuzz"))
    sock.sendall(wire)
    expected = before + len(frames) + int(with_hello)
    wait_until(lambda: _accounted(collector) == expected, what=f"{len(frames)} frames accounted for")
    sock.close()
    assert collector._thread is not None
    assert collector._thread.is_alive()
    for sample in collector.collect():
        name = sample.key[0]
        if name == "trainwarden_train_step":
            assert 0 <= sample.value < 2**53
        assert not (name.endswith("_total") and math.isnan(sample.value))


@fuzz(1 / 5)
@given(blob=st.binary(min_size=1, max_size=600))
def test_byte_soup_then_a_real_client_is_served(collector: TrainingCollector, blob: bytes) -> None:
    """After arbitrary bytes (bad headers, oversized frames, cut-off frames) a real client is still served."""
    bad = connect(collector)
    bad.sendall(blob)
    bad.close()
    good = connect(collector)
    before = received(collector)
    send(good, hello(1, job="real"), {"type": "step", "step": 1})
    wait_until(lambda: received(collector) >= before + 2, what="the real client's records")
    good.close()

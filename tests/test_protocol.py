"""The client/daemon wire format: framing, encoding and validation of every record type."""

from __future__ import annotations

import json
import math
import struct

import pytest

from trainwarden.protocol import (
    MAX_RECORD_BYTES,
    ByeRecord,
    CheckpointRecord,
    CollectiveRecord,
    FrameDecoder,
    Hello,
    PhaseRecord,
    Reason,
    RecordError,
    StepRecord,
    control_dir_from_env,
    encode,
    parse,
    socket_path_from_env,
    wire_float,
)

HELLO = {
    "type": "hello",
    "v": 1,
    "job": "toy",
    "rank": 1,
    "local_rank": 1,
    "world_size": 2,
    "pid": 42,
    "restart_count": 3,
}


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def reason_of(payload: bytes) -> str:
    with pytest.raises(RecordError) as info:
        parse(payload)
    return info.value.reason


def test_every_record_type_round_trips() -> None:
    """Each record type encodes to one frame that decodes back to the same values."""
    records = [
        HELLO,
        {
            "type": "step",
            "step": 7,
            "step_seconds": 0.5,
            "loss": 2.0,
            "grad_norm": 1.5,
            "lr": 1e-3,
            "samples": 32,
            "tokens": 4096,
            "dropped": 2,
        },
        {"type": "phase", "phase": "checkpoint", "event": "end", "seconds": 3.0},
        {"type": "checkpoint", "step": 7, "path": "/ckpt/step-7"},
        {"type": "checkpoint", "step": 8, "path": "/ckpt/step-8", "seconds": 0.5, "local_skipped": 4},
        {"type": "collective", "op": "all_reduce", "event": "begin", "seq": 9, "bytes": 1024},
        {"type": "bye", "dropped": 0},
    ]
    stream = b"".join(encode(r) for r in records)
    payloads = FrameDecoder().feed(stream)
    parsed = [parse(p) for p in payloads]
    assert parsed == [
        Hello("toy", 1, 1, 2, 42, 3, 1),
        StepRecord(7, 0.5, 2.0, 1.5, 1e-3, 32.0, 4096.0, 2),
        PhaseRecord("checkpoint", "end", 3.0),
        CheckpointRecord(7, "/ckpt/step-7"),
        CheckpointRecord(8, "/ckpt/step-8", 0.5, 4),
        CollectiveRecord("all_reduce", "begin", 9, 1024),
        ByeRecord(0),
    ]


def test_frames_split_across_reads_are_reassembled() -> None:
    """A stream fed one byte at a time yields the same records as one big read."""
    stream = encode(HELLO) + encode({"type": "step", "step": 1})
    decoder = FrameDecoder()
    payloads = [p for i in range(len(stream)) for p in decoder.feed(stream[i : i + 1])]
    assert [parse(p) for p in payloads][1] == StepRecord(1)
    assert decoder.pending == 0


def test_oversized_frame_is_fatal_for_the_stream() -> None:
    """Frames before an oversized header are returned; the header sets `oversized` and stops the stream."""
    decoder = FrameDecoder()
    payloads = decoder.feed(encode(HELLO) + struct.pack(">I", MAX_RECORD_BYTES + 1) + encode(HELLO))
    assert len(payloads) == 1
    assert decoder.error is not None
    assert decoder.error.reason == Reason.OVERSIZED
    assert decoder.feed(encode(HELLO)) == []


def test_encode_refuses_oversized_records() -> None:
    """The client never produces a frame the daemon would reject as oversized."""
    with pytest.raises(ValueError, match="exceeds"):
        encode({"type": "checkpoint", "step": 1, "path": "x" * MAX_RECORD_BYTES})


def test_non_finite_loss_travels_as_strict_json() -> None:
    """NaN/Inf losses become strings on the wire and NaN/Inf again after parsing."""
    payload = encode(
        {"type": "step", "step": 1, "loss": wire_float(math.nan), "grad_norm": wire_float(math.inf)}
    )
    body = payload[4:]
    json.loads(body, parse_constant=lambda c: pytest.fail(f"bare {c} on the wire"))
    record = parse(body)
    assert isinstance(record, StepRecord)
    assert record.loss is not None
    assert math.isnan(record.loss)
    assert record.grad_norm == math.inf


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe{}", Reason.BAD_UTF8),
        (b"{not json", Reason.MALFORMED),
        (b"[1, 2]", Reason.MALFORMED),
        (b'{"type": "step", "step": NaN}', Reason.MALFORMED),
        (b"[" * 50_000, Reason.MALFORMED),
        (b'{"type": "exec", "cmd": "rm -rf /"}', Reason.UNKNOWN_TYPE),
        (b'{"type": 5}', Reason.UNKNOWN_TYPE),
        (b'{"step": 1}', Reason.UNKNOWN_TYPE),
        (b'{"type": "step", "step": "1"}', Reason.BAD_FIELD),
        (b'{"type": "step", "step": true}', Reason.BAD_FIELD),
        (b'{"type": "step", "step": -1}', Reason.BAD_FIELD),
        (b'{"type": "step", "step": 1e3}', Reason.BAD_FIELD),
        (b'{"type": "step", "step": 99999999999999999999999999}', Reason.BAD_FIELD),
        (b'{"type": "step", "step": 1, "step_seconds": 1e400}', Reason.BAD_FIELD),
        (b'{"type": "step", "step": 1, "step_seconds": -0.5}', Reason.BAD_FIELD),
        (b'{"type": "step", "step": 1, "lr": "NaN"}', Reason.BAD_FIELD),
        (b'{"type": "step", "step": 1, "loss": "lots"}', Reason.BAD_FIELD),
        (b'{"type": "phase", "phase": "lunch", "event": "begin"}', Reason.BAD_FIELD),
        (b'{"type": "phase", "phase": "eval", "event": "pause"}', Reason.BAD_FIELD),
        (b'{"type": "checkpoint", "step": 1, "path": ""}', Reason.BAD_FIELD),
        (b'{"type": "checkpoint", "step": 1, "path": "a\\u0000b"}', Reason.BAD_FIELD),
        (b'{"type": "checkpoint", "step": 1, "path": "/c", "local_skipped": -1}', Reason.BAD_FIELD),
        (b'{"type": "checkpoint", "step": 1, "path": "/c", "local_skipped": true}', Reason.BAD_FIELD),
        (b'{"type": "checkpoint", "step": 1, "path": "/c", "local_skipped": 1.5}', Reason.BAD_FIELD),
        (b'{"type": "collective", "op": "send", "event": "begin", "seq": 1}', Reason.BAD_FIELD),
    ],
)
def test_bad_payloads_are_rejected_with_their_reason(payload: bytes, reason: str) -> None:
    """Each kind of bad payload raises RecordError carrying the expected bounded reason."""
    assert reason_of(payload) == reason


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"job": "../etc"}, "job"),
        ({"job": "x" * 200}, "job"),
        ({"rank": 2}, "rank"),
        ({"rank": 1 << 40}, "rank"),
        ({"world_size": 0}, "world_size"),
        ({"pid": 0}, "pid"),
        ({"v": "1"}, "v"),
    ],
)
def test_bad_hello_names_the_field(change: dict[str, object], field: str) -> None:
    """A bad hello is rejected as bad_field and the message names the offending field."""
    with pytest.raises(RecordError) as info:
        parse(json.dumps({**HELLO, **change}).encode())
    assert info.value.reason == Reason.BAD_FIELD
    assert f"hello.{field}" in str(info.value)


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    """A newer client's extra keys do not make an older daemon reject the record."""
    assert parse(b'{"type": "step", "step": 3, "future": {"x": 1}}') == StepRecord(3)


def test_socket_and_control_paths_follow_the_environment() -> None:
    """Env variables override the defaults under /run/trainwarden."""
    assert str(socket_path_from_env({})) == "/run/trainwarden/client.sock"
    assert str(control_dir_from_env({})) == "/run/trainwarden/control"
    env = {"TRAINWARDEN_SOCKET": "/tmp/s.sock", "TRAINWARDEN_CONTROL_DIR": "/tmp/ctl"}
    assert str(socket_path_from_env(env)) == "/tmp/s.sock"
    assert str(control_dir_from_env(env)) == "/tmp/ctl"


@pytest.mark.parametrize(
    ("record", "ok"),
    [
        ({"type": "step", "step": 1, "grad_norm": "-Infinity"}, False),
        ({"type": "step", "step": 1, "grad_norm": "Infinity"}, True),
        ({"type": "step", "step": 1, "grad_norm": "NaN"}, True),
        ({"type": "step", "step": 1, "loss": "-Infinity"}, True),
        ({"type": "step", "step": 2**63 - 1}, False),
        ({"type": "step", "step": 2**53}, False),
        ({"type": "step", "step": 2**53 - 1}, True),
        ({"type": "checkpoint", "step": 2**63 - 1, "path": "/c"}, False),
    ],
)
def test_values_outside_their_range_are_refused(record: dict[str, object], ok: bool) -> None:
    """grad_norm -Infinity is outside [0, 1e300]; steps beyond 2**53 would not stay exact as floats."""
    payload = json.dumps(record).encode()
    if ok:
        parse(payload)
        return
    with pytest.raises(RecordError) as err:
        parse(payload)
    assert err.value.reason == Reason.BAD_FIELD


def test_the_largest_step_renders_exactly() -> None:
    """The largest accepted step survives the float the store keeps, digit for digit."""
    record = parse(json.dumps({"type": "step", "step": 2**53 - 1}).encode())
    assert isinstance(record, StepRecord)
    assert int(float(record.step)) == 2**53 - 1
    assert f"{float(record.step):.0f}" == str(2**53 - 1)

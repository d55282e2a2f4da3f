"""Hypothesis fuzz of the preflight result file: any content is a result or a named refusal, never a crash."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import fuzz
from trainwarden.collectors.base import CollectorContext
from trainwarden.config import CollectorOptions
from trainwarden.preflight.collector import PreflightResultCollector
from trainwarden.preflight.record import PreflightRecordError, read_result, result_path

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
CHECK = st.fixed_dictionaries(
    {"check": st.text(max_size=70), "status": st.sampled_from(["pass", "fail", "skipped", "ok", ""])},
    optional={"reason": SCALARS, "duration_seconds": SCALARS, "detail": JSON},
)
DOCUMENT = st.fixed_dictionaries(
    {"format_version": st.sampled_from([1, 1, 2, "1"])},
    optional={
        "checks": st.lists(CHECK, max_size=5) | JSON,
        "healthy": SCALARS,
        "finished_at": SCALARS,
        "duration_seconds": SCALARS,
        "node": SCALARS,
    },
)


def check_content(raw: bytes) -> None:
    """Write `raw` as the result file; reading and collecting must answer or refuse, never raise else."""
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        result_path(state).write_bytes(raw)
        refusal = ""
        try:
            read_result(state)
        except PreflightRecordError as exc:
            refusal = str(exc)
        assert not refusal or str(result_path(state)) in refusal
        collector = PreflightResultCollector(CollectorOptions(), CollectorContext(state_dir=state))
        names = {s.spec.name for s in collector.collect()}
        assert "trainwarden_preflight_result_errors_total" in names


@fuzz(1 / 2)
@given(st.binary(max_size=200))
def test_random_bytes_are_refused_by_name(raw: bytes) -> None:
    """Arbitrary bytes in the result file are a PreflightRecordError naming the file, or a result."""
    check_content(raw)


@fuzz()
@given(DOCUMENT)
def test_result_shaped_documents_are_accepted_or_refused(document: dict[str, object]) -> None:
    """Documents of nearly the right shape, mistyped fields included, never crash the reader or collector."""
    check_content(json.dumps(document).encode())

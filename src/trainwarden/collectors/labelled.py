"""Build a sample from a label mapping (per-GPU, per-port labels are computed once and reused).

`MetricSpec.sample(value, **labels)` cannot take a `dict[str, str]` under mypy strict, because
its keyword parameters (`timestamp`, `suffix`) could collide; this checks the names the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

from trainwarden.model import MetricSpec, Sample


def labelled(spec: MetricSpec, value: float, labels: Mapping[str, str], **extra: str) -> Sample:
    """A sample of `spec` with `labels` plus `extra`; the names must be exactly `spec.labelnames`."""
    merged = {**labels, **extra}
    if set(merged) != set(spec.labelnames):
        raise ValueError(f"{spec.name}: labels {sorted(merged)} != {sorted(spec.labelnames)}")
    return Sample(spec, float(value), tuple(sorted(merged.items())))

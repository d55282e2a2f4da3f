"""Exposition encoders that produce exactly prometheus_client's bytes, several times faster.

prometheus_client 0.26 escapes every metric name character by character for OpenMetrics (to
support UTF-8 names), which was two thirds of a scrape's CPU here. Our names and label names are
always legacy-valid (`[a-zA-Z_:][a-zA-Z0-9_:]*`), and for those every escaping scheme is the
identity, so the output can be built with plain string operations. Anything this module does not
reproduce exactly (a non-legacy name, exemplars, native histograms) falls back to the library's
own encoder for the whole scrape; tests compare both byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import cast

from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Encoder = Callable[[Collector], bytes]
_go_float = cast("Callable[[float], str]", floatToGoString)  # untyped upstream; Go's float format

_LEGACY_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LEGACY_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TEXT_TYPES = {"stateset": "gauge", "gaugehistogram": "histogram", "unknown": "untyped"}
_OM_ONLY_SUFFIXES = ("_created", "_gsum", "_gcount")


class _FallbackError(Exception):
    """Something only the library encoder renders exactly."""


@lru_cache(maxsize=4096)
def _legacy_name(name: str) -> bool:
    return bool(_LEGACY_NAME.match(name))


@lru_cache(maxsize=1024)
def _legacy_label(name: str) -> bool:
    return bool(_LEGACY_LABEL.match(name))


def _escape_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    parts = []
    for key, value in sorted(labels.items()):
        if not _legacy_label(key):
            raise _FallbackError
        parts.append(f'{key}="{_escape_value(value)}"')
    return "{" + ",".join(parts) + "}"


def _check(metric: Metric) -> None:
    if not _legacy_name(metric.name):
        raise _FallbackError
    for sample in metric.samples:
        if (
            sample.exemplar is not None
            or sample.native_histogram is not None
            or not _legacy_name(sample.name)
        ):
            raise _FallbackError


def _text(families: Iterable[Metric]) -> bytes:
    """Prometheus text format 0.0.4, as `prometheus_client.exposition.generate_latest`."""
    out: list[str] = []
    for metric in families:
        _check(metric)
        name, kind = metric.name, metric.type
        if kind == "counter":
            name += "_total"
        elif kind == "info":
            name += "_info"
            kind = "gauge"
        else:
            kind = _TEXT_TYPES.get(kind, kind)
        help_text = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
        extra: dict[str, list[str]] = {}
        for s in metric.samples:
            timestamp = "" if s.timestamp is None else f" {int(float(s.timestamp) * 1000):d}"
            line = f"{s.name}{_labels(s.labels)} {_go_float(s.value)}{timestamp}\n"
            suffix = next((x for x in _OM_ONLY_SUFFIXES if s.name == metric.name + x), None)
            if suffix is None:
                out.append(line)
            else:
                extra.setdefault(suffix, []).append(line)
        for suffix, lines in sorted(extra.items()):
            out.append(f"# HELP {metric.name}{suffix} {help_text}\n# TYPE {metric.name}{suffix} gauge\n")
            out.extend(lines)
    return "".join(out).encode()


def _openmetrics(families: Iterable[Metric]) -> bytes:
    """OpenMetrics 1.0 text, as `prometheus_client.openmetrics.exposition.generate_latest`."""
    out: list[str] = []
    for metric in families:
        _check(metric)
        name = metric.name
        out.append(f"# HELP {name} {_escape_value(metric.documentation)}\n# TYPE {name} {metric.type}\n")
        if metric.unit:
            out.append(f"# UNIT {name} {metric.unit}\n")
        for s in metric.samples:
            timestamp = "" if s.timestamp is None else f" {s.timestamp}"
            value = "" if s.value is None else _go_float(s.value)
            out.append(f"{s.name}{_labels(s.labels)} {value}{timestamp}\n")
    out.append("# EOF\n")
    return "".join(out).encode()


def fast_encoder(accept_header: str) -> tuple[Encoder, str]:
    """Like `prometheus_client.exposition.choose_encoder`, with faster encoders for legacy names."""
    library_encoder, content_type = choose_encoder(accept_header)
    fast = _openmetrics if content_type.startswith("application/openmetrics-text") else _text
    escaping = content_type.rpartition("escaping=")[2] if "escaping=" in content_type else "underscores"
    # `dots` and `values` rewrite even legacy names, and OpenMetrics 2 adds native histograms.
    if escaping not in {"underscores", "allow-utf-8"} or "version=2" in content_type:
        return library_encoder, content_type

    def encode(registry: Collector) -> bytes:
        try:
            return fast(list(registry.collect()))
        except _FallbackError:
            return library_encoder(registry)

    return encode, content_type

"""InfiniBand/RoCE ports from one pass of the daemon's infiniband collector.

Every port must be active with its link up, at or above `infiniband_min_rate_gbps`, and its
`link_downed` counter must not have grown since the previous preflight on this node (the
counter is cumulative, so an increase is the only news; the baseline is kept in the result file).
"""

from __future__ import annotations

import time

from trainwarden.collectors.base import CollectorContext
from trainwarden.collectors.host_common import HostCollector
from trainwarden.collectors.infiniband import COUNTERS, RATE, UP, InfinibandCollector
from trainwarden.config import CollectorOptions
from trainwarden.preflight.model import CheckResult, PreflightOptions, Status
from trainwarden.preflight.record import previous_detail
from trainwarden.store import Store

LINKS = "infiniband_links"
_DOWNED = COUNTERS["link_downed"][0].name
_DOWNED_KEY = "link_downed:"


def check_links(options: PreflightOptions) -> list[CheckResult]:
    """Active ports at the expected rate and no new link-downed events; no ports is a skip."""
    started = time.monotonic()
    collector: HostCollector = InfinibandCollector(CollectorOptions(), CollectorContext(paths=options.paths))
    store = Store()
    store.replace("infiniband", collector.collect(), time.time())
    ports = {_port(s.labels): s.value for s in store.find(UP.name)}
    took = time.monotonic() - started
    if not ports:
        root = options.paths.sys("class", "infiniband")
        return [CheckResult(LINKS, Status.SKIPPED, f"no InfiniBand/RoCE ports under {root}", took)]
    rates = {_port(s.labels): s.value * 8 / 1e9 for s in store.find(RATE.name)}
    downed = {_port(s.labels): s.value for s in store.find(_DOWNED)}
    before = previous_detail(options.state_dir, LINKS)
    problems = [f"{port} not active" for port, up in sorted(ports.items()) if up != 1.0]
    floor = options.infiniband_min_rate_gbps
    problems += [
        f"{port} at {rate:g} Gb/s < {floor:g}"
        for port, rate in sorted(rates.items())
        if floor and rate < floor
    ]
    for port, count in sorted(downed.items()):
        old = before.get(_DOWNED_KEY + port)
        if isinstance(old, float) and count > old:
            problems.append(f"{port} link went down {count - old:g} time(s) since the last preflight")
    detail: dict[str, float | str] = {_DOWNED_KEY + port: count for port, count in downed.items()}
    detail["ports"] = float(len(ports))
    if problems:
        return [CheckResult(LINKS, Status.FAIL, "; ".join(problems), took, detail)]
    speeds = ",".join(sorted({f"{r:g}" for r in rates.values()})) or "?"
    return [CheckResult(LINKS, Status.PASS, f"{len(ports)} port(s) active at {speeds} Gb/s", took, detail)]


def _port(labels: tuple[tuple[str, str], ...]) -> str:
    found = dict(labels)
    return f"{found.get('device', '?')}/{found.get('port', '?')}"

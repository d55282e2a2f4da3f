"""Golden exposition of every host collector on each fixture host tree (`pytest --update-golden` rewrites)."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from host_cases import case_dirs, collect_case, host_collectors
from trainwarden.daemon.exporter import make_registry


def exposition(case: Path) -> str:
    """The /metrics text for `case`, minus build info (it names the Python version running the test)."""
    text = generate_latest(make_registry(collect_case(case))).decode()
    return "".join(line for line in text.splitlines(keepends=True) if "trainwarden_build" not in line)


@pytest.mark.parametrize("case", case_dirs(), ids=lambda p: p.name)
def test_golden_exposition(case: Path, update_golden: bool) -> None:
    """Every host collector run on the case's tree renders exactly the committed expected.prom."""
    golden = case / "expected.prom"
    actual = exposition(case)
    if update_golden:
        golden.write_text(actual)
    expected = golden.read_text()
    diff = "".join(
        difflib.unified_diff(expected.splitlines(True), actual.splitlines(True), "expected", "actual")
    )
    assert actual == expected, f"exposition of {case.name} differs (pytest --update-golden rewrites):\n{diff}"


def test_both_kinds_of_host_are_covered() -> None:
    """The fixture cases include a host with PSI and one without, as the issue asks."""
    with_psi = [case for case in case_dirs() if (case / "proc" / "pressure").is_dir()]
    without_psi = [case for case in case_dirs() if not (case / "proc" / "pressure").exists()]
    assert with_psi
    assert without_psi


@pytest.mark.parametrize("case", case_dirs(), ids=lambda p: p.name)
def test_every_sample_matches_its_spec(case: Path) -> None:
    """Samples carry exactly their spec's label names, sorted, and no unbounded label such as a path.

    The one exception is the mount point on `trainwarden_host_filesystem_info`: one series per
    configured volume, so bounded, and what an operator needs to find the volume on the node.
    """
    for collector in host_collectors(case):
        collector.start()
        for sample in collector.collect():
            names = [name for name, _ in sample.labels]
            assert names == sorted(sample.spec.labelnames), (sample.spec.name, sample.labels)
            unbounded = {"path", "step", "pid"}
            if sample.spec.name != "trainwarden_host_filesystem_info":
                unbounded.add("mountpoint")
            assert not unbounded & set(names), sample.spec.name

"""The one-way layers of docs/ARCHITECTURE.md, checked by import-linter on the real import graph.

Each break test runs `lint-imports` on a copy of the package with exactly one bad import added, so
it shows that the contracts in `.importlinter` would catch that mistake in CI.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "trainwarden"
CONFIG = ROOT / ".importlinter"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

# What the client and the integrations may import of trainwarden, directly or not.
CLIENT_SIDE = ("trainwarden.client", "trainwarden.integrations")
CLIENT_MAY_IMPORT = (
    "trainwarden.protocol",
    "trainwarden.control",
    "trainwarden.errors",
    "trainwarden.safe_files",
    "trainwarden.spike_math",  # the spike detector the Snapshotter shares with the rule: stdlib only
)


def lint_imports(src: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` with the project's contracts, analysing the package under `src`."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [str(LINT_IMPORTS), str(CONFIG), "--no-cache", "--no-logo"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def package_copy(tmp_path: Path) -> Path:
    """A copy of `src/trainwarden` (sources only) under `tmp_path/src`; returns that `src`."""
    src = tmp_path / "src"
    shutil.copytree(
        PACKAGE, src / "trainwarden", ignore=shutil.ignore_patterns("__pycache__", "fixtures", "*.pyc")
    )
    return src


def add_import(src: Path, module: str, line: str) -> None:
    """Append one import statement to `module`'s file in the copy."""
    path = src / Path(*module.split(".")).with_suffix(".py")
    assert path.is_file(), path
    with path.open("a") as file:
        file.write(f"\n{line}\n")


def test_the_tree_keeps_every_contract() -> None:
    """The committed package keeps every import contract, so CI's `lint-imports` step passes."""
    result = lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract", "evidence"),
    [
        pytest.param(
            "trainwarden.model",
            "from trainwarden.daemon import app as _app",
            "Layers",
            "trainwarden.model -> trainwarden.daemon.app",
            id="shared-model-imports-the-daemon",
        ),
        pytest.param(
            "trainwarden.backends.base",
            "from trainwarden.healers import base as _healers_base",
            "Layers",
            "trainwarden.backends.base -> trainwarden.healers.base",
            id="backend-imports-a-healer",
        ),
        pytest.param(
            "trainwarden.collectors.labelled",
            "from trainwarden.collectors import gpu as _gpu",
            "No import cycles",
            ".labelled -> .gpu",
            id="cycle-inside-a-layer",
        ),
        pytest.param(
            "trainwarden.daemon.http_routes",
            "import torch as _torch",
            "The daemon never imports torch",
            "trainwarden.daemon.http_routes -> torch",
            id="daemon-imports-torch",
        ),
        pytest.param(
            "trainwarden.collectors.cpu",
            "from trainwarden.rules import base as _rules_base",
            "Collectors never import rules",
            "trainwarden.collectors.cpu -> trainwarden.rules.base",
            id="collector-imports-a-rule",
        ),
        pytest.param(
            "trainwarden.nvml",
            "from trainwarden import testing as _testing",
            "Nothing imports the test fakes",
            "trainwarden.nvml -> trainwarden.testing",
            id="nvml-imports-the-fake",
        ),
        pytest.param(
            "trainwarden.client.identity",
            "from trainwarden.daemon import run_cli as _run_cli",
            "The client and the integrations",
            "trainwarden.client.identity -> trainwarden.daemon.run_cli",
            id="client-imports-the-daemon",
        ),
    ],
)
def test_one_bad_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str, evidence: str
) -> None:
    """One import against the architecture, added to a copy of the package, fails `lint-imports` naming it."""
    src = package_copy(tmp_path)
    add_import(src, module, line)
    result = lint_imports(src)
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout
    assert evidence in broken, result.stdout


def test_a_module_outside_every_layer_is_caught(tmp_path: Path) -> None:
    """A new top-level module must be placed in a layer (the layers contract is exhaustive)."""
    src = package_copy(tmp_path)
    (src / "trainwarden" / "unplaced.py").write_text('"""Belongs to no layer yet."""\n')
    result = lint_imports(src)
    assert result.returncode != 0, result.stdout
    assert "unplaced" in result.stdout.split("Broken contracts", 1)[-1], result.stdout


def test_the_client_reaches_only_protocol_and_control() -> None:
    """All of trainwarden that the client and the integrations import, even indirectly, is on the list."""
    graph = grimp.build_graph("trainwarden", cache_dir=None)
    client = {m for m in graph.modules if m.startswith(CLIENT_SIDE)}
    reached = set().union(*(graph.find_upstream_modules(m) for m in client)) - client
    allowed = {m for m in reached if m.startswith(CLIENT_MAY_IMPORT)}
    assert reached - allowed == set()
    assert {"trainwarden.protocol", "trainwarden.control"} <= reached  # the check sees real imports


def documented_layers() -> list[str]:
    """The layer lines of docs/ARCHITECTURE.md's diagram, without their comments."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    return [re.split(r"\s{2,}", line.strip())[0] for line in block.splitlines() if line.strip()]


def test_the_architecture_page_shows_the_checked_layers() -> None:
    """docs/ARCHITECTURE.md lists exactly the layers `.importlinter` checks, in the same order."""
    config = configparser.ConfigParser()
    config.read(CONFIG)
    checked = [
        " ".join(line.split()) for line in config["importlinter:contract:layers"]["layers"].split("\n")
    ]
    assert documented_layers() == [line for line in checked if line]


def test_the_architecture_page_names_real_files() -> None:
    """Every source file docs/ARCHITECTURE.md names exists, so the page cannot drift from the tree."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([a-z_]+(?:/[a-z_<>]+)*\.py)`", text)) - {"py"}
    concrete = {name for name in named if "<" not in name}
    assert len(concrete) > 20
    missing = sorted(
        name for name in concrete if not (PACKAGE / name).is_file() and not (ROOT / name).is_file()
    )
    assert missing == []

"""The Python in README.md and docs/*.md runs: imports resolve, whole snippets execute, the example trains.

A fenced ```python block that uses only names it defines itself is executed as it stands; a
fragment (one that uses `model`, `loss`... from the reader's own loop) is compiled and its imports
are executed, so a renamed module or function fails here. README's training script is run for
real with torch: trained, stopped, resumed from its checkpoint.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(path: Path) -> list[str]:
    """The fenced python blocks of a markdown file, in order."""
    return FENCE.findall(path.read_text(encoding="utf-8"))


def readme_example() -> str:
    """The runnable script of README's "Instrument your training loop" section."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Instrument your training loop", 1)[1]
    match = FENCE.search(section)
    assert match is not None, "README's instrument section has no python block"
    return match.group(1)


def free_names(tree: ast.Module) -> set[str]:
    """Names a block reads but never binds (imports, assignments, defs, loop targets, arguments)."""
    bound = set(dir(builtins))
    loaded: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return loaded - bound


BLOCKS = [(path, i, block) for path in DOCS for i, block in enumerate(python_blocks(path))]


def test_docs_have_python_to_check() -> None:
    """The README example and the client docs' snippets are found (an empty list would pass vacuously)."""
    names = {path.name for path, _, _ in BLOCKS}
    assert {"README.md", "CLIENT.md"} <= names
    assert "Reporter.from_env()" in readme_example()


@pytest.mark.parametrize(("path", "index", "block"), BLOCKS, ids=[f"{p.name}#{i}" for p, i, _ in BLOCKS])
def test_snippet_imports_resolve_and_whole_snippets_run(
    path: Path, index: int, block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each snippet compiles and its imports exist; a self-contained one also runs without error."""
    tree = ast.parse(block, filename=f"{path.name} block {index}")
    imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    namespace: dict[str, object] = {"__name__": "snippet"}
    exec(compile(ast.Module(body=imports, type_ignores=[]), f"{path.name}#{index}", "exec"), namespace)
    if free_names(tree):
        return  # a fragment of the reader's own loop: compiled and imports checked
    monkeypatch.setenv("TRAINWARDEN_SOCKET", str(tmp_path / "client.sock"))
    monkeypatch.setenv("TRAINWARDEN_CONTROL_DIR", str(tmp_path / "control"))
    monkeypatch.chdir(tmp_path)
    exec(compile(tree, f"{path.name}#{index}", "exec"), namespace)


@pytest.mark.slow
def test_readme_training_script_trains_stops_and_resumes(tmp_path: Path) -> None:
    """README's script trains without a daemon, and a second run resumes from its newest checkpoint."""
    script = tmp_path / "train.py"
    script.write_text(readme_example())
    env = {**os.environ, "TRAINWARDEN_SOCKET": str(tmp_path / "absent.sock")}
    env.pop("RANK", None)
    ckpt = tmp_path / "ckpt"

    def run(steps: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), "--steps", str(steps), "--ckpt-dir", str(ckpt)],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
            cwd=tmp_path,
            check=False,
        )

    first = run(30)
    assert first.returncode == 0, first.stderr
    assert "done: trained up to step 29" in first.stdout
    assert first.stderr.count("trainwarden daemon not reachable") == 1  # the one warning, then quiet
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000000019"]
    second = run(50)
    assert second.returncode == 0, second.stderr
    assert "resumed after step 19" in second.stdout
    assert "done: trained up to step 49" in second.stdout

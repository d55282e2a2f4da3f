"""The complete examples of docs/INTEGRATIONS.md run as written: trained, then resumed from a checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "INTEGRATIONS.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
SECTIONS = {"lightning": "## PyTorch Lightning", "transformers": "## Hugging Face Trainer"}


def example(framework: str) -> str:
    """The first python block under the framework's section heading."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split(SECTIONS[framework], 1)[1].split("\n## ", 1)[0]
    match = FENCE.search(section)
    assert match is not None, f"{SECTIONS[framework]} has no python block"
    return match.group(1)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("framework", sorted(SECTIONS))
def test_example_trains_then_resumes_from_its_checkpoint(framework: str, tmp_path: Path) -> None:
    """The example trains 15 steps without a daemon; run again for 25, it resumes from its checkpoint."""
    script = tmp_path / "train.py"
    script.write_text(example(framework), encoding="utf-8")
    env = {**os.environ, "TRAINWARDEN_SOCKET": str(tmp_path / "absent.sock"), "OMP_NUM_THREADS": "1"}
    env["TRAINWARDEN_CONTROL_DIR"] = str(tmp_path / "control")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)

    def run(steps: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), "--steps", str(steps), "--ckpt-dir", str(tmp_path / "ckpt")],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
            cwd=tmp_path,
            check=False,
        )

    first = run(15)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "done: trained up to step 14" in first.stdout
    second = run(25)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "done: trained up to step 24" in second.stdout
    resumed = "Restoring states from the checkpoint" if framework == "lightning" else "resuming from "
    assert resumed in second.stdout + second.stderr, second.stderr[-3000:]

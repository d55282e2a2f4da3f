"""The start-up's fixture switch: which NVML the daemon runs on, real or the shipped fake.

The only module outside the tests that imports `trainwarden.testing` (an import-linter contract
says so): the NVML boundary in `nvml.py` stays free of the fake, and the fake stays free of the
collectors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from trainwarden.nvml import FIXTURE_ENV, Nvml, PynvmlBinding, resolve_fixture


def load_nvml(environ: Mapping[str, str] | None = None) -> Nvml:
    """The NVML to use: `FakeNvml` on the fixture named by `TRAINWARDEN_NVML_FIXTURE`, else pynvml.

    The variable takes a JSON file path or the name of a shipped fixture (e.g. `h100-sxm-8gpu`).
    """
    env = os.environ if environ is None else environ
    fixture = env.get(FIXTURE_ENV, "").strip()
    if fixture:
        from trainwarden.testing import FakeNvml  # noqa: PLC0415 - only when a fixture is named

        return FakeNvml.from_fixture(resolve_fixture(fixture))
    return PynvmlBinding()

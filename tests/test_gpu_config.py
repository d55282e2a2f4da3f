"""The sample configs in the GPU, kernel-log and interconnect collectors' docstrings load as written."""

from __future__ import annotations

import importlib
import re
import textwrap

import pytest

from trainwarden.collectors import collector_classes
from trainwarden.config import load_config_text
from trainwarden.errors import ConfigError

MODULES = ["gpu", "kmsg", "infiniband", "nccl_inspector", "nccl_ras"]
GROUPS = {"collectors": {name: cls.Options for name, cls in collector_classes().items()}}


def sample_of(module: str) -> str:
    doc = importlib.import_module(f"trainwarden.collectors.{module}").__doc__ or ""
    match = re.search(r"\n(    \[collectors\.[a-z_]+\]\n(?:    .*\n)+)", doc)
    assert match is not None, f"{module} has no sample config"
    return textwrap.dedent(match.group(1))


@pytest.mark.parametrize("module", MODULES)
def test_docstring_sample_config_loads(module: str) -> None:
    """Each collector's documented sample config passes the real config loader with every key known."""
    config = load_config_text(sample_of(module), GROUPS, f"{module} docstring")
    assert config.plugin("collectors", module).enabled


def test_unknown_keys_in_my_sections_are_rejected() -> None:
    """A misspelt key under [collectors.gpu] is reported with its section and the valid keys."""
    with pytest.raises(ConfigError, match=r"\[collectors\.gpu\] event: unknown key \(valid keys: .*events"):
        load_config_text("[collectors.gpu]\nevent = true\n", GROUPS)


def test_semantic_problems_are_reported_together() -> None:
    """An enabled inspector without a directory and a bad RAS address come back in one error."""
    text = "[collectors.nccl_inspector]\nenabled = true\n\n[collectors.nccl_ras]\naddress = 'nowhere'\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text, GROUPS)
    where = {(p.section, p.key) for p in info.value.problems}
    assert ("collectors.nccl_inspector", "directory") in where
    assert ("collectors.nccl_ras", "address") in where

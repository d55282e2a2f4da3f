"""The suite's one fuzzing budget: seeded (derandomized), bounded, and without deadlines on a loaded machine.

`TRAINWARDEN_FUZZ_EXAMPLES` (300 by default) sets it for a longer hunt; each fuzz test takes a share of it
(`@fuzz(1 / 3)`), so one variable scales every input surface's fuzzer alike.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("TRAINWARDEN_FUZZ_EXAMPLES", "300"))


def fuzz(share: float = 1.0) -> settings:
    """Hypothesis settings for `share` of the budget (at least one example)."""
    return settings(
        derandomize=True,
        deadline=None,
        max_examples=max(1, round(EXAMPLES * share)),
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )

"""What runs inside the training process: reporting to the daemon and reading its control file.

torch is imported only where a tensor is actually handled, so importing this package is cheap.
"""

from trainwarden.client.collectives import time_collectives
from trainwarden.client.identity import Identity, identity_from_env
from trainwarden.client.reporter import Reporter, ReporterStats
from trainwarden.control import ClipSettings, ControlState

__all__ = [
    "ClipSettings",
    "ControlState",
    "Identity",
    "Reporter",
    "ReporterStats",
    "identity_from_env",
    "time_collectives",
]

"""trainwarden: keep long PyTorch training jobs alive and healthy."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trainwarden")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]

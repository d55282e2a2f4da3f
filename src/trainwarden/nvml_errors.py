"""NVML failures as exceptions: one `NvmlError` subclass per return code the collector treats apart.

Both the pynvml binding and the fake NVML raise these, so the collector never touches pynvml's own
exception classes and a test sees exactly what a real card would make it see.
"""

from __future__ import annotations

from trainwarden.errors import TrainwardenError
from trainwarden.nvml_codes import (
    ERROR_DRIVER_NOT_LOADED,
    ERROR_FUNCTION_NOT_FOUND,
    ERROR_GPU_IS_LOST,
    ERROR_INVALID_ARGUMENT,
    ERROR_LIB_RM_VERSION_MISMATCH,
    ERROR_LIBRARY_NOT_FOUND,
    ERROR_NO_DATA,
    ERROR_NO_PERMISSION,
    ERROR_NOT_FOUND,
    ERROR_NOT_SUPPORTED,
    ERROR_RESET_REQUIRED,
    ERROR_TIMEOUT,
    ERROR_UNINITIALIZED,
    ERROR_UNKNOWN,
)


class NvmlError(TrainwardenError):
    """An NVML call failed; `code` is NVML's return code, `call` the NVML function that failed."""

    code: int = ERROR_UNKNOWN
    description: str = "unknown error"

    def __init__(self, call: str = "", detail: str = "") -> None:
        self.call = call
        where = f"{call}: " if call else ""
        extra = f" ({detail})" if detail else ""
        super().__init__(f"{where}NVML error {self.code}: {self.description}{extra}")

    @property
    def name(self) -> str:
        """Short stable name for metric labels, e.g. `not_supported`."""
        return _ERROR_NAMES.get(self.code, "unknown")


class NvmlNotSupportedError(NvmlError):
    """The device does not support this query (skipped quietly)."""

    code = ERROR_NOT_SUPPORTED
    description = "not supported"


class NvmlNoPermissionError(NvmlError):
    """The caller lacks permission for this query."""

    code = ERROR_NO_PERMISSION
    description = "insufficient permissions"


class NvmlNotFoundError(NvmlError):
    """The object asked for does not exist."""

    code = ERROR_NOT_FOUND
    description = "not found"


class NvmlTimeoutError(NvmlError):
    """A wait (event set) timed out; normal in the event loop."""

    code = ERROR_TIMEOUT
    description = "timeout"


class NvmlLibraryNotFoundError(NvmlError):
    """libnvidia-ml.so.1 is not installed: no NVIDIA driver on this host."""

    code = ERROR_LIBRARY_NOT_FOUND
    description = "NVML shared library not found"


class NvmlDriverNotLoadedError(NvmlError):
    """The library exists but the kernel driver is not loaded."""

    code = ERROR_DRIVER_NOT_LOADED
    description = "NVIDIA driver not loaded"


class NvmlGpuLostError(NvmlError):
    """The GPU fell off the bus or stopped answering: a hardware finding, not a collector failure."""

    code = ERROR_GPU_IS_LOST
    description = "GPU is lost"


class NvmlResetRequiredError(NvmlError):
    """The GPU needs a reset before it can be used again; treated like a lost GPU."""

    code = ERROR_RESET_REQUIRED
    description = "GPU requires reset"


class NvmlVersionMismatchError(NvmlError):
    """The user-space library and the kernel module differ (driver upgraded without reboot)."""

    code = ERROR_LIB_RM_VERSION_MISMATCH
    description = "NVML/RM version mismatch"


_ERROR_CLASSES: dict[int, type[NvmlError]] = {
    cls.code: cls
    for cls in (
        NvmlNotSupportedError,
        NvmlNoPermissionError,
        NvmlNotFoundError,
        NvmlTimeoutError,
        NvmlLibraryNotFoundError,
        NvmlDriverNotLoadedError,
        NvmlGpuLostError,
        NvmlResetRequiredError,
        NvmlVersionMismatchError,
    )
}
_ERROR_NAMES: dict[int, str] = {
    ERROR_UNINITIALIZED: "uninitialized",
    ERROR_INVALID_ARGUMENT: "invalid_argument",
    ERROR_NOT_SUPPORTED: "not_supported",
    ERROR_NO_PERMISSION: "no_permission",
    ERROR_NOT_FOUND: "not_found",
    ERROR_DRIVER_NOT_LOADED: "driver_not_loaded",
    ERROR_TIMEOUT: "timeout",
    ERROR_LIBRARY_NOT_FOUND: "library_not_found",
    ERROR_FUNCTION_NOT_FOUND: "function_not_found",
    ERROR_GPU_IS_LOST: "gpu_is_lost",
    ERROR_RESET_REQUIRED: "reset_required",
    ERROR_LIB_RM_VERSION_MISMATCH: "version_mismatch",
    ERROR_NO_DATA: "no_data",
    ERROR_UNKNOWN: "unknown",
}
ERROR_CODES_BY_NAME: dict[str, int] = {name.upper(): code for code, name in _ERROR_NAMES.items()}
"""`NOT_SUPPORTED` → 3 etc., the spelling JSON fixtures use."""

UNAVAILABLE_ERRORS = (NvmlLibraryNotFoundError, NvmlDriverNotLoadedError, NvmlVersionMismatchError)
"""Errors from `init()` that mean "no usable NVML on this host": the collector disables itself."""

LOST_ERRORS = (NvmlGpuLostError, NvmlResetRequiredError)
"""Errors that mean one GPU is gone while the others may be fine."""


def nvml_error(code: int, call: str = "", detail: str = "") -> NvmlError:
    """The `NvmlError` subclass for an NVML return code."""
    cls = _ERROR_CLASSES.get(code)
    if cls is None:
        err = NvmlError(call, detail)
        err.code = code
        err.description = _ERROR_NAMES.get(code, f"code {code}").replace("_", " ")
        err.args = (f"{call}: NVML error {code}: {err.description}",)
        return err
    return cls(call, detail)

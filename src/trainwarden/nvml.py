"""The NVML boundary: a Protocol of exactly the NVML calls trainwarden makes, and its pynvml binding.

This is the only module that imports `pynvml` (lazily, inside `PynvmlBinding`), so everything else
runs against the `Nvml` Protocol and a test (or the whole daemon, via `TRAINWARDEN_NVML_FIXTURE`)
can swap in `trainwarden.testing.FakeNvml`. Errors cross the boundary as `NvmlError` subclasses
carrying NVML's own return codes, so the collector never touches pynvml's classes and the fake
raises exactly what the binding raises.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from trainwarden.errors import TrainwardenError

FIXTURE_ENV = "TRAINWARDEN_NVML_FIXTURE"
"""Environment variable naming a JSON fixture (a path or a shipped fixture name) to run on FakeNvml."""

# NVML return codes (nvml.h `nvmlReturn_t`); values match pynvml's NVML_ERROR_* constants.
ERROR_UNINITIALIZED = 1
ERROR_INVALID_ARGUMENT = 2
ERROR_NOT_SUPPORTED = 3
ERROR_NO_PERMISSION = 4
ERROR_NOT_FOUND = 6
ERROR_DRIVER_NOT_LOADED = 9
ERROR_TIMEOUT = 10
ERROR_LIBRARY_NOT_FOUND = 12
ERROR_FUNCTION_NOT_FOUND = 13
ERROR_GPU_IS_LOST = 15
ERROR_RESET_REQUIRED = 16
ERROR_LIB_RM_VERSION_MISMATCH = 18
ERROR_NO_DATA = 21
ERROR_UNKNOWN = 999

# Enum values used as call arguments (nvml.h).
TEMPERATURE_GPU = 0
CLOCK_SM = 1
CLOCK_MEM = 2
PCIE_UTIL_TX_BYTES = 0
PCIE_UTIL_RX_BYTES = 1

# Field ids for nvmlDeviceGetFieldValues (nvml.h NVML_FI_DEV_*).
FI_ECC_SBE_VOL_TOTAL = 3
FI_ECC_DBE_VOL_TOTAL = 4
FI_ECC_SBE_AGG_TOTAL = 5
FI_ECC_DBE_AGG_TOTAL = 6
FI_RETIRED_SBE = 29
FI_RETIRED_DBE = 30
FI_RETIRED_PENDING = 31
FI_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL = 38
FI_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL = 45
FI_NVLINK_REPLAY_ERROR_COUNT_TOTAL = 52
FI_NVLINK_RECOVERY_ERROR_COUNT_TOTAL = 59
FI_MEMORY_TEMP = 82
FI_PCIE_REPLAY_COUNTER = 94
FI_PCIE_COUNT_TX_BYTES = 197
FI_PCIE_COUNT_RX_BYTES = 198
FI_GET_GPU_RECOVERY_ACTION = 230

# Event types (nvml.h nvmlEventType*).
EVENT_SINGLE_BIT_ECC = 0x1
EVENT_DOUBLE_BIT_ECC = 0x2
EVENT_XID_CRITICAL = 0x8
EVENT_GPU_UNAVAILABLE = 0x4000
EVENT_GPU_RECOVERY_ACTION = 0x8000

# Clock event (throttle) reasons (nvml.h nvmlClocksEventReason*): bit → our label value.
CLOCK_EVENT_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}

# GPU recovery actions (nvml.h nvmlDeviceGpuRecoveryAction_t).
RECOVERY_ACTIONS: dict[int, str] = {
    0: "none",
    1: "gpu_reset",
    2: "node_reboot",
    3: "drain_p2p",
    4: "drain_and_reset",
    5: "recover_imex_domain",
    6: "bus_reset",
    7: "system_reboot",
}

VALUE_NOT_AVAILABLE = 0xFFFFFFFFFFFFFFFF
"""NVML_VALUE_NOT_AVAILABLE: what usedGpuMemory reads when the driver cannot attribute memory."""


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


# --- neutral result types -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Utilization:
    """Call `nvmlUtilization_t`: percent of time the GPU / memory controller was busy."""

    gpu: int
    memory: int


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    """nvmlMemory_t, in bytes."""

    total: int
    used: int
    free: int


@dataclass(frozen=True, slots=True)
class RemappedRows:
    """Call `nvmlDeviceGetRemappedRows`: counts and the pending/failure flags."""

    correctable: int
    uncorrectable: int
    pending: bool
    failure: bool


@dataclass(frozen=True, slots=True)
class FieldValue:
    """One entry of nvmlDeviceGetFieldValues: a value, or the per-field error."""

    field_id: int
    value: float | None
    error: NvmlError | None = None


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """nvmlProcessInfo_t; `used_gpu_memory` is None when the driver cannot attribute it."""

    pid: int
    used_gpu_memory: int | None


@dataclass(frozen=True, slots=True)
class EventData:
    """Call `nvmlEventData_t`: which device, what happened, and the XID (or recovery action) for it."""

    device: object
    event_type: int
    event_data: int


# --- the Protocol ---------------------------------------------------------------------------


class Nvml(Protocol):
    """Exactly the NVML calls trainwarden uses (names follow nvml.h without the `nvml` prefix).

    Every method raises `NvmlError` subclasses; device handles and event sets are opaque.
    """

    def init(self) -> None:
        """Call `nvmlInit_v2`."""

    def shutdown(self) -> None:
        """Call `nvmlShutdown`."""

    def system_get_driver_version(self) -> str:
        """Call `nvmlSystemGetDriverVersion`."""

    def device_get_count(self) -> int:
        """Call `nvmlDeviceGetCount_v2`."""

    def device_get_handle_by_index(self, index: int) -> object:
        """Call `nvmlDeviceGetHandleByIndex_v2`."""

    def device_get_uuid(self, handle: object) -> str:
        """Call `nvmlDeviceGetUUID`."""

    def device_get_name(self, handle: object) -> str:
        """Call `nvmlDeviceGetName`."""

    def device_get_pci_bus_id(self, handle: object) -> str:
        """Call `nvmlDeviceGetPciInfo_v3` → busId, e.g. `00000000:18:00.0`."""

    def device_get_utilization_rates(self, handle: object) -> Utilization:
        """Call `nvmlDeviceGetUtilizationRates`."""

    def device_get_memory_info(self, handle: object) -> MemoryInfo:
        """Call `nvmlDeviceGetMemoryInfo`."""

    def device_get_temperature(self, handle: object, sensor: int) -> int:
        """Call `nvmlDeviceGetTemperature` (degrees C)."""

    def device_get_power_usage(self, handle: object) -> int:
        """Call `nvmlDeviceGetPowerUsage` (milliwatts)."""

    def device_get_total_energy_consumption(self, handle: object) -> int:
        """Call `nvmlDeviceGetTotalEnergyConsumption` (millijoules since driver load)."""

    def device_get_clock_info(self, handle: object, clock_type: int) -> int:
        """Call `nvmlDeviceGetClockInfo` (MHz)."""

    def device_get_current_clocks_event_reasons(self, handle: object) -> int:
        """Call `nvmlDeviceGetCurrentClocksEventReasons` (bitmask)."""

    def device_get_remapped_rows(self, handle: object) -> RemappedRows:
        """Call `nvmlDeviceGetRemappedRows`."""

    def device_get_pcie_throughput(self, handle: object, counter: int) -> int:
        """Call `nvmlDeviceGetPcieThroughput` (KB/s over a 20 ms sample; blocks that long)."""

    def device_get_field_values(self, handle: object, field_ids: Sequence[int]) -> list[FieldValue]:
        """nvmlDeviceGetFieldValues; per-field failures come back in `FieldValue.error`."""

    def device_get_compute_running_processes(self, handle: object) -> list[ProcessInfo]:
        """Call `nvmlDeviceGetComputeRunningProcesses_v3`."""

    def device_get_supported_event_types(self, handle: object) -> int:
        """Call `nvmlDeviceGetSupportedEventTypes` (bitmask)."""

    def event_set_create(self) -> object:
        """Call `nvmlEventSetCreate`."""

    def device_register_events(self, handle: object, event_types: int, event_set: object) -> None:
        """Call `nvmlDeviceRegisterEvents`."""

    def event_set_wait(self, event_set: object, timeout_ms: int) -> EventData:
        """nvmlEventSetWait_v2; raises `NvmlTimeoutError` when nothing happened."""

    def event_set_free(self, event_set: object) -> None:
        """Call `nvmlEventSetFree`."""


# --- the real binding -------------------------------------------------------------------------

R = TypeVar("R")


class PynvmlBinding:
    """`Nvml` on nvidia-ml-py; imports pynvml on first use and translates its errors."""

    def __init__(self) -> None:
        self._pynvml: Any = None

    def _mod(self) -> Any:
        if self._pynvml is None:
            try:
                import pynvml  # noqa: PLC0415 - lazy: importing must not require the package
            except ImportError as exc:
                raise NvmlLibraryNotFoundError("import pynvml", "nvidia-ml-py is not installed") from exc
            self._pynvml = pynvml
        return self._pynvml

    def _call(self, name: str, fn: Callable[..., R], *args: Any) -> R:
        mod = self._mod()
        try:
            return fn(*args)
        except mod.NVMLError as exc:
            raise nvml_error(int(exc.value), name) from exc

    def init(self) -> None:
        """Call `nvmlInit_v2`."""
        self._call("nvmlInit", self._mod().nvmlInit)

    def shutdown(self) -> None:
        """Call `nvmlShutdown`."""
        self._call("nvmlShutdown", self._mod().nvmlShutdown)

    def system_get_driver_version(self) -> str:
        """Call `nvmlSystemGetDriverVersion`."""
        return _text(self._call("nvmlSystemGetDriverVersion", self._mod().nvmlSystemGetDriverVersion))

    def device_get_count(self) -> int:
        """Call `nvmlDeviceGetCount_v2`."""
        return int(self._call("nvmlDeviceGetCount", self._mod().nvmlDeviceGetCount))

    def device_get_handle_by_index(self, index: int) -> object:
        """Call `nvmlDeviceGetHandleByIndex_v2`."""
        return self._call("nvmlDeviceGetHandleByIndex", self._mod().nvmlDeviceGetHandleByIndex, index)

    def device_get_uuid(self, handle: object) -> str:
        """Call `nvmlDeviceGetUUID`."""
        return _text(self._call("nvmlDeviceGetUUID", self._mod().nvmlDeviceGetUUID, handle))

    def device_get_name(self, handle: object) -> str:
        """Call `nvmlDeviceGetName`."""
        return _text(self._call("nvmlDeviceGetName", self._mod().nvmlDeviceGetName, handle))

    def device_get_pci_bus_id(self, handle: object) -> str:
        """Call `nvmlDeviceGetPciInfo_v3` → busId."""
        info = self._call("nvmlDeviceGetPciInfo", self._mod().nvmlDeviceGetPciInfo, handle)
        return _text(info.busId)

    def device_get_utilization_rates(self, handle: object) -> Utilization:
        """Call `nvmlDeviceGetUtilizationRates`."""
        util = self._call("nvmlDeviceGetUtilizationRates", self._mod().nvmlDeviceGetUtilizationRates, handle)
        return Utilization(gpu=int(util.gpu), memory=int(util.memory))

    def device_get_memory_info(self, handle: object) -> MemoryInfo:
        """Call `nvmlDeviceGetMemoryInfo`."""
        mem = self._call("nvmlDeviceGetMemoryInfo", self._mod().nvmlDeviceGetMemoryInfo, handle)
        return MemoryInfo(total=int(mem.total), used=int(mem.used), free=int(mem.free))

    def device_get_temperature(self, handle: object, sensor: int) -> int:
        """Call `nvmlDeviceGetTemperature`."""
        return int(
            self._call("nvmlDeviceGetTemperature", self._mod().nvmlDeviceGetTemperature, handle, sensor)
        )

    def device_get_power_usage(self, handle: object) -> int:
        """Call `nvmlDeviceGetPowerUsage`."""
        return int(self._call("nvmlDeviceGetPowerUsage", self._mod().nvmlDeviceGetPowerUsage, handle))

    def device_get_total_energy_consumption(self, handle: object) -> int:
        """Call `nvmlDeviceGetTotalEnergyConsumption`."""
        fn = self._mod().nvmlDeviceGetTotalEnergyConsumption
        return int(self._call("nvmlDeviceGetTotalEnergyConsumption", fn, handle))

    def device_get_clock_info(self, handle: object, clock_type: int) -> int:
        """Call `nvmlDeviceGetClockInfo`."""
        return int(
            self._call("nvmlDeviceGetClockInfo", self._mod().nvmlDeviceGetClockInfo, handle, clock_type)
        )

    def device_get_current_clocks_event_reasons(self, handle: object) -> int:
        """Call `nvmlDeviceGetCurrentClocksEventReasons`."""
        fn = self._mod().nvmlDeviceGetCurrentClocksEventReasons
        return int(self._call("nvmlDeviceGetCurrentClocksEventReasons", fn, handle))

    def device_get_remapped_rows(self, handle: object) -> RemappedRows:
        """Call `nvmlDeviceGetRemappedRows`."""
        corr, unc, pending, failure = self._call(
            "nvmlDeviceGetRemappedRows", self._mod().nvmlDeviceGetRemappedRows, handle
        )
        return RemappedRows(int(corr), int(unc), bool(pending), bool(failure))

    def device_get_pcie_throughput(self, handle: object, counter: int) -> int:
        """Call `nvmlDeviceGetPcieThroughput`."""
        fn = self._mod().nvmlDeviceGetPcieThroughput
        return int(self._call("nvmlDeviceGetPcieThroughput", fn, handle, counter))

    def device_get_field_values(self, handle: object, field_ids: Sequence[int]) -> list[FieldValue]:
        """nvmlDeviceGetFieldValues, decoding each value by its valueType."""
        raw = self._call(
            "nvmlDeviceGetFieldValues", self._mod().nvmlDeviceGetFieldValues, handle, list(field_ids)
        )
        out: list[FieldValue] = []
        for item in raw:
            field_id = int(item.fieldId)
            if int(item.nvmlReturn) != 0:
                out.append(FieldValue(field_id, None, nvml_error(int(item.nvmlReturn), f"field {field_id}")))
                continue
            out.append(FieldValue(field_id, _field_number(int(item.valueType), item.value)))
        return out

    def device_get_compute_running_processes(self, handle: object) -> list[ProcessInfo]:
        """Call `nvmlDeviceGetComputeRunningProcesses_v3`."""
        fn = self._mod().nvmlDeviceGetComputeRunningProcesses
        procs = self._call("nvmlDeviceGetComputeRunningProcesses", fn, handle)
        out = []
        for proc in procs:
            used = proc.usedGpuMemory
            out.append(ProcessInfo(int(proc.pid), None if used in (None, VALUE_NOT_AVAILABLE) else int(used)))
        return out

    def device_get_supported_event_types(self, handle: object) -> int:
        """Call `nvmlDeviceGetSupportedEventTypes`."""
        fn = self._mod().nvmlDeviceGetSupportedEventTypes
        return int(self._call("nvmlDeviceGetSupportedEventTypes", fn, handle))

    def event_set_create(self) -> object:
        """Call `nvmlEventSetCreate`."""
        return self._call("nvmlEventSetCreate", self._mod().nvmlEventSetCreate)

    def device_register_events(self, handle: object, event_types: int, event_set: object) -> None:
        """Call `nvmlDeviceRegisterEvents`."""
        fn = self._mod().nvmlDeviceRegisterEvents
        self._call("nvmlDeviceRegisterEvents", fn, handle, event_types, event_set)

    def event_set_wait(self, event_set: object, timeout_ms: int) -> EventData:
        """Call `nvmlEventSetWait_v2`."""
        data = self._call("nvmlEventSetWait", self._mod().nvmlEventSetWait_v2, event_set, timeout_ms)
        return EventData(device=data.device, event_type=int(data.eventType), event_data=int(data.eventData))

    def event_set_free(self, event_set: object) -> None:
        """Call `nvmlEventSetFree`."""
        self._call("nvmlEventSetFree", self._mod().nvmlEventSetFree, event_set)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


def _field_number(value_type: int, value: Any) -> float:
    member = _VALUE_MEMBERS.get(value_type, "ullVal")
    return float(getattr(value, member))


def load_nvml(environ: dict[str, str] | None = None) -> Nvml:
    """The NVML to use: `FakeNvml` on the fixture named by `TRAINWARDEN_NVML_FIXTURE`, else pynvml.

    The variable takes a JSON file path or the name of a shipped fixture (e.g. `h100-sxm-8gpu`).
    """
    env = os.environ if environ is None else environ
    fixture = env.get(FIXTURE_ENV, "").strip()
    if fixture:
        from trainwarden.testing import FakeNvml  # noqa: PLC0415 - only when asked for

        return FakeNvml.from_fixture(resolve_fixture(fixture))
    return PynvmlBinding()


FIXTURE_DIR = Path(__file__).parent / "fixtures" / "nvml"


def resolve_fixture(name_or_path: str) -> Path:
    """A fixture path, or the shipped `fixtures/nvml/NAME.json`; clear error when neither exists."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = FIXTURE_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in FIXTURE_DIR.glob("*.json")))
    raise NvmlLibraryNotFoundError(
        f"{FIXTURE_ENV}={name_or_path}",
        f"no such file, and no shipped fixture of that name (shipped: {names})",
    )


def handle_key(handle: object) -> object:
    """A hashable identity for a device handle: the pointer value of a ctypes handle, else the handle.

    Event data carries a fresh ctypes pointer object for the same device, which compares unequal
    to the handle we hold; its address does not.
    """
    import ctypes  # noqa: PLC0415 - only needed for real handles

    if isinstance(handle, ctypes._Pointer | ctypes.c_void_p):  # noqa: SLF001 - ctypes' pointer base
        return ("ptr", ctypes.cast(handle, ctypes.c_void_p).value)
    return handle

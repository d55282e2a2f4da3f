"""The NVML boundary: a Protocol of exactly the NVML calls trainwarden makes, and its pynvml binding.

This is the only module that imports `pynvml` (lazily, inside `PynvmlBinding`), so everything else
runs against the `Nvml` Protocol and a test (or the whole daemon, via `TRAINWARDEN_NVML_FIXTURE` and
the start-up's `fixture_switch.load_nvml`) can swap in `trainwarden.testing.FakeNvml`; this module
never imports the fake. Errors cross the boundary as `NvmlError` subclasses (`nvml_errors.py`)
carrying NVML's own return codes (`nvml_codes.py`, re-exported here), so the collector never
touches pynvml's classes and the fake raises exactly what the binding raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from trainwarden.nvml_api import (
    EventData,
    FieldValue,
    MemoryInfo,
    Nvml,
    ProcessInfo,
    RemappedRows,
    Utilization,
)
from trainwarden.nvml_codes import (
    CLOCK_EVENT_REASONS,
    CLOCK_MEM,
    CLOCK_SM,
    ECC_FIELDS,
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
    EVENT_DOUBLE_BIT_ECC,
    EVENT_GPU_RECOVERY_ACTION,
    EVENT_GPU_UNAVAILABLE,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID_CRITICAL,
    FI_ECC_DBE_AGG_TOTAL,
    FI_ECC_DBE_VOL_TOTAL,
    FI_ECC_SBE_AGG_TOTAL,
    FI_ECC_SBE_VOL_TOTAL,
    FI_GET_GPU_RECOVERY_ACTION,
    FI_MEMORY_TEMP,
    FI_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL,
    FI_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL,
    FI_NVLINK_RECOVERY_ERROR_COUNT_TOTAL,
    FI_NVLINK_REPLAY_ERROR_COUNT_TOTAL,
    FI_PCIE_COUNT_RX_BYTES,
    FI_PCIE_COUNT_TX_BYTES,
    FI_PCIE_REPLAY_COUNTER,
    FI_RETIRED_DBE,
    FI_RETIRED_PENDING,
    FI_RETIRED_SBE,
    FIELD_IDS,
    NVLINK_FIELDS,
    PCIE_BYTE_FIELDS,
    PCIE_UTIL_RX_BYTES,
    PCIE_UTIL_TX_BYTES,
    RECOVERY_ACTIONS,
    RETIRED_FIELDS,
    TEMPERATURE_GPU,
    VALUE_NOT_AVAILABLE,
)
from trainwarden.nvml_errors import (
    ERROR_CODES_BY_NAME,
    LOST_ERRORS,
    UNAVAILABLE_ERRORS,
    NvmlDriverNotLoadedError,
    NvmlError,
    NvmlGpuLostError,
    NvmlLibraryNotFoundError,
    NvmlNoPermissionError,
    NvmlNotFoundError,
    NvmlNotSupportedError,
    NvmlResetRequiredError,
    NvmlTimeoutError,
    NvmlVersionMismatchError,
    nvml_error,
)

__all__ = [
    "CLOCK_EVENT_REASONS",
    "CLOCK_MEM",
    "CLOCK_SM",
    "ECC_FIELDS",
    "ERROR_CODES_BY_NAME",
    "ERROR_DRIVER_NOT_LOADED",
    "ERROR_FUNCTION_NOT_FOUND",
    "ERROR_GPU_IS_LOST",
    "ERROR_INVALID_ARGUMENT",
    "ERROR_LIBRARY_NOT_FOUND",
    "ERROR_LIB_RM_VERSION_MISMATCH",
    "ERROR_NOT_FOUND",
    "ERROR_NOT_SUPPORTED",
    "ERROR_NO_DATA",
    "ERROR_NO_PERMISSION",
    "ERROR_RESET_REQUIRED",
    "ERROR_TIMEOUT",
    "ERROR_UNINITIALIZED",
    "ERROR_UNKNOWN",
    "EVENT_DOUBLE_BIT_ECC",
    "EVENT_GPU_RECOVERY_ACTION",
    "EVENT_GPU_UNAVAILABLE",
    "EVENT_SINGLE_BIT_ECC",
    "EVENT_XID_CRITICAL",
    "FIELD_IDS",
    "FIXTURE_DIR",
    "FIXTURE_ENV",
    "FI_ECC_DBE_AGG_TOTAL",
    "FI_ECC_DBE_VOL_TOTAL",
    "FI_ECC_SBE_AGG_TOTAL",
    "FI_ECC_SBE_VOL_TOTAL",
    "FI_GET_GPU_RECOVERY_ACTION",
    "FI_MEMORY_TEMP",
    "FI_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL",
    "FI_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
    "FI_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
    "FI_NVLINK_REPLAY_ERROR_COUNT_TOTAL",
    "FI_PCIE_COUNT_RX_BYTES",
    "FI_PCIE_COUNT_TX_BYTES",
    "FI_PCIE_REPLAY_COUNTER",
    "FI_RETIRED_DBE",
    "FI_RETIRED_PENDING",
    "FI_RETIRED_SBE",
    "LOST_ERRORS",
    "NVLINK_FIELDS",
    "PCIE_BYTE_FIELDS",
    "PCIE_UTIL_RX_BYTES",
    "PCIE_UTIL_TX_BYTES",
    "RECOVERY_ACTIONS",
    "RETIRED_FIELDS",
    "TEMPERATURE_GPU",
    "UNAVAILABLE_ERRORS",
    "VALUE_NOT_AVAILABLE",
    "EventData",
    "FieldValue",
    "MemoryInfo",
    "Nvml",
    "NvmlDriverNotLoadedError",
    "NvmlError",
    "NvmlGpuLostError",
    "NvmlLibraryNotFoundError",
    "NvmlNoPermissionError",
    "NvmlNotFoundError",
    "NvmlNotSupportedError",
    "NvmlResetRequiredError",
    "NvmlTimeoutError",
    "NvmlVersionMismatchError",
    "ProcessInfo",
    "PynvmlBinding",
    "RemappedRows",
    "Utilization",
    "handle_key",
    "nvml_error",
    "resolve_fixture",
]

FIXTURE_ENV = "TRAINWARDEN_NVML_FIXTURE"
"""Environment variable naming a JSON fixture (a path or a shipped fixture name) to run on FakeNvml."""

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

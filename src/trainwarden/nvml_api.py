"""The NVML calls trainwarden makes, as a Protocol, and the neutral types their results come back in.

The pynvml binding (`nvml.PynvmlBinding`) and the fake (`testing.FakeNvml`) both implement `Nvml`;
the collector and the preflight check see only this, never pynvml's own structures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from trainwarden.nvml_errors import NvmlError

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

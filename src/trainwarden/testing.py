"""Fakes for tests, public so users can test their own integrations: `FakeNvml` above all.

`FakeNvml` implements the `trainwarden.nvml.Nvml` Protocol from a JSON snapshot (see the shipped
`trainwarden/fixtures/nvml/*.json`) and raises the same `NvmlError` classes the pynvml binding
raises. It is not a mock: calls it does not implement do not exist, and state changes (a GPU
falling off the bus, an XID event) go through explicit methods. Set
`TRAINWARDEN_NVML_FIXTURE=h100-sxm-8gpu` (or a path) to run the whole daemon on it.

Fixture format (per GPU, any call's key may instead hold `{"error": "NOT_SUPPORTED"}`):
`index, uuid, name, pci_bus_id, lost, handle_error, utilization{gpu,memory}, memory{total,used,free}`,
`temperature_gpu, power_usage_mw, energy_mj, clocks_mhz{sm,mem}, clocks_event_reasons`,
`remapped_rows{correctable,uncorrectable,pending,failure}, pcie_throughput_kbps{tx,rx}`,
`fields{"<field id>": number | "NOT_SUPPORTED"}, processes[{pid,used_gpu_memory}]`,
`supported_event_types, events[{type,data}]`; top level: `driver_version, init_error, gpus`.
"""

from __future__ import annotations

import copy
import json
import threading
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainwarden import nvml
from trainwarden.errors import TrainwardenError
from trainwarden.nvml import EventData, FieldValue, MemoryInfo, ProcessInfo, RemappedRows, Utilization
from trainwarden.nvml_snapshot import capture_snapshot, main

# Capturing a real node moved to `nvml_snapshot.py`; re-exported here, where users and
# `python -m trainwarden.testing nvml-snapshot` have always found it.
__all__ = ["FakeHandle", "FakeNvml", "FixtureError", "capture_snapshot", "main"]


class FixtureError(TrainwardenError):
    """A fake's fixture that cannot be used; names the file and the bad key."""


@dataclass(frozen=True, slots=True)
class FakeHandle:
    """Opaque device handle of the fake (the real one is a ctypes pointer)."""

    index: int


@dataclass
class _FakeEventSet:
    registered: dict[int, int] = field(default_factory=dict)  # gpu index → event mask
    pending: deque[EventData] = field(default_factory=deque)
    freed: bool = False


class FakeNvml:
    """The `Nvml` Protocol served from a JSON snapshot; thread-safe, mutable through explicit methods."""

    def __init__(self, snapshot: Mapping[str, Any], source: str = "<snapshot>") -> None:
        self.source = source
        self._data = copy.deepcopy(dict(snapshot))
        self._gpus: list[dict[str, Any]] = list(self._data.get("gpus", []))
        self._validate()
        self._lock = threading.Condition()
        self._initialized = 0
        self._event_sets: list[_FakeEventSet] = []
        self.calls: Counter[str] = Counter()
        """How often each Protocol method was called (tests check cost and call paths)."""
        # Fixture events wait for the first event set that registers their GPU and type.
        self._initial_events: list[tuple[int, int, int]] = [
            (gpu["index"], int(ev["type"]), int(ev.get("data", 0)))
            for gpu in self._gpus
            for ev in gpu.get("events", [])
        ]

    @classmethod
    def from_fixture(cls, path: Path | str) -> FakeNvml:
        """Load a fixture file; a missing or malformed file raises `FixtureError` naming it."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise FixtureError(f"{path}: cannot read NVML fixture: {exc.strerror or exc}") from exc
        except json.JSONDecodeError as exc:
            raise FixtureError(f"{path}: NVML fixture is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise FixtureError(f"{path}: NVML fixture must be a JSON object")
        return cls(data, str(path))

    @classmethod
    def shipped(cls, name: str) -> FakeNvml:
        """One of the fixtures shipped in `trainwarden/fixtures/nvml/` by name, e.g. `a100-sxm4-4gpu`."""
        return cls.from_fixture(nvml.resolve_fixture(name))

    def _validate(self) -> None:
        init_error = self._data.get("init_error")
        if init_error is not None and str(init_error).upper() not in nvml.ERROR_CODES_BY_NAME:
            raise FixtureError(f"{self.source}: init_error {init_error!r} is not an NVML error name")
        seen: set[int] = set()
        for position, gpu in enumerate(self._gpus):
            if not isinstance(gpu, dict):
                raise FixtureError(f"{self.source}: gpus[{position}] must be an object")
            for key in ("index", "uuid", "name", "pci_bus_id"):
                if key not in gpu:
                    raise FixtureError(f"{self.source}: gpus[{position}] lacks {key!r}")
            if gpu["index"] != position or gpu["index"] in seen:
                raise FixtureError(f"{self.source}: gpus[{position}].index must be {position}")
            seen.add(gpu["index"])
            for key in gpu.get("fields", {}):
                if not str(key).isdigit():
                    raise FixtureError(
                        f"{self.source}: gpus[{position}].fields key {key!r} is not a field id"
                    )

    # --- mutators for tests -------------------------------------------------------------------

    def set_lost(self, index: int, lost: bool = True) -> None:
        """Make one GPU fall off the bus (every query on it raises `NvmlGpuLostError`), or come back.

        Coming back also clears a fixture's `handle_error` (a GPU lost before NVML started, whose
        handle could not be had at all).
        """
        with self._lock:
            self._gpus[index]["lost"] = lost
            if not lost:
                self._gpus[index].pop("handle_error", None)

    def set_value(self, index: int, key: str, value: Any) -> None:
        """Replace one fixture key of one GPU (e.g. `temperature_gpu`, or `{"error": ...}`)."""
        with self._lock:
            self._gpus[index][key] = value

    def set_field(self, index: int, field_id: int, value: float | str) -> None:
        """Set one field value (a number, or an error name such as `NOT_SUPPORTED`)."""
        with self._lock:
            self._gpus[index].setdefault("fields", {})[str(field_id)] = value

    def emit_event(self, index: int, event_type: int, data: int = 0) -> None:
        """Deliver an event to every event set that registered this type for this GPU."""
        with self._lock:
            self._deliver(index, event_type, data)
            self._lock.notify_all()

    def _deliver(self, index: int, event_type: int, data: int) -> None:
        for event_set in self._event_sets:
            if event_set.registered.get(index, 0) & event_type:
                event_set.pending.append(EventData(FakeHandle(index), event_type, data))

    # --- helpers ------------------------------------------------------------------------------

    def _check_init(self, call: str) -> None:
        self.calls[call] += 1
        if self._initialized <= 0:
            raise nvml.nvml_error(nvml.ERROR_UNINITIALIZED, call)

    def _gpu(self, handle: object, call: str) -> dict[str, Any]:
        self._check_init(call)
        if not isinstance(handle, FakeHandle) or not 0 <= handle.index < len(self._gpus):
            raise nvml.nvml_error(nvml.ERROR_INVALID_ARGUMENT, call)
        gpu = self._gpus[handle.index]
        if gpu.get("lost"):
            raise nvml.NvmlGpuLostError(call)
        return gpu

    def _value(self, handle: object, key: str, call: str) -> Any:
        with self._lock:
            gpu = self._gpu(handle, call)
            if key not in gpu:
                raise nvml.NvmlNotSupportedError(call, f"fixture {self.source} has no {key!r}")
            value = gpu[key]
            if isinstance(value, dict) and "error" in value:
                raise _named_error(str(value["error"]), call)
            return copy.deepcopy(value)

    # --- the Protocol -------------------------------------------------------------------------

    def init(self) -> None:
        """Call `nvmlInit_v2`: fails as the fixture's `init_error` says (e.g. no driver)."""
        self.calls["init"] += 1
        error = self._data.get("init_error")
        if error:
            raise _named_error(str(error), "nvmlInit")
        with self._lock:
            self._initialized += 1

    def shutdown(self) -> None:
        """Call `nvmlShutdown`."""
        with self._lock:
            self._check_init("shutdown")
            self._initialized -= 1

    def system_get_driver_version(self) -> str:
        """Call `nvmlSystemGetDriverVersion`."""
        with self._lock:
            self._check_init("system_get_driver_version")
            return str(self._data.get("driver_version", ""))

    def device_get_count(self) -> int:
        """Call `nvmlDeviceGetCount_v2`."""
        with self._lock:
            self._check_init("device_get_count")
            return len(self._gpus)

    def device_get_handle_by_index(self, index: int) -> object:
        """Call `nvmlDeviceGetHandleByIndex_v2`; fails only as the GPU's `handle_error` says."""
        with self._lock:
            self._check_init("device_get_handle_by_index")
            if not 0 <= index < len(self._gpus):
                raise nvml.nvml_error(nvml.ERROR_INVALID_ARGUMENT, "nvmlDeviceGetHandleByIndex")
            error = self._gpus[index].get("handle_error")
            if error:
                raise _named_error(str(error), "nvmlDeviceGetHandleByIndex")
            return FakeHandle(index)

    def device_get_uuid(self, handle: object) -> str:
        """Call `nvmlDeviceGetUUID`."""
        return str(self._value(handle, "uuid", "device_get_uuid"))

    def device_get_name(self, handle: object) -> str:
        """Call `nvmlDeviceGetName`."""
        return str(self._value(handle, "name", "device_get_name"))

    def device_get_pci_bus_id(self, handle: object) -> str:
        """Call `nvmlDeviceGetPciInfo_v3` → busId."""
        return str(self._value(handle, "pci_bus_id", "device_get_pci_bus_id"))

    def device_get_utilization_rates(self, handle: object) -> Utilization:
        """Call `nvmlDeviceGetUtilizationRates`."""
        value = self._value(handle, "utilization", "device_get_utilization_rates")
        return Utilization(gpu=int(value["gpu"]), memory=int(value["memory"]))

    def device_get_memory_info(self, handle: object) -> MemoryInfo:
        """Call `nvmlDeviceGetMemoryInfo`."""
        value = self._value(handle, "memory", "device_get_memory_info")
        return MemoryInfo(total=int(value["total"]), used=int(value["used"]), free=int(value["free"]))

    def device_get_temperature(self, handle: object, sensor: int) -> int:
        """Call `nvmlDeviceGetTemperature` (only the GPU sensor exists, as on current drivers)."""
        if sensor != nvml.TEMPERATURE_GPU:
            raise nvml.nvml_error(nvml.ERROR_INVALID_ARGUMENT, "nvmlDeviceGetTemperature")
        return int(self._value(handle, "temperature_gpu", "device_get_temperature"))

    def device_get_power_usage(self, handle: object) -> int:
        """Call `nvmlDeviceGetPowerUsage` (mW)."""
        return int(self._value(handle, "power_usage_mw", "device_get_power_usage"))

    def device_get_total_energy_consumption(self, handle: object) -> int:
        """Call `nvmlDeviceGetTotalEnergyConsumption` (mJ)."""
        return int(self._value(handle, "energy_mj", "device_get_total_energy_consumption"))

    def device_get_clock_info(self, handle: object, clock_type: int) -> int:
        """Call `nvmlDeviceGetClockInfo` (MHz)."""
        clocks = self._value(handle, "clocks_mhz", "device_get_clock_info")
        key = {nvml.CLOCK_SM: "sm", nvml.CLOCK_MEM: "mem"}.get(clock_type)
        if key is None:
            raise nvml.nvml_error(nvml.ERROR_INVALID_ARGUMENT, "nvmlDeviceGetClockInfo")
        return int(clocks[key])

    def device_get_current_clocks_event_reasons(self, handle: object) -> int:
        """Call `nvmlDeviceGetCurrentClocksEventReasons`."""
        return int(self._value(handle, "clocks_event_reasons", "device_get_current_clocks_event_reasons"))

    def device_get_remapped_rows(self, handle: object) -> RemappedRows:
        """Call `nvmlDeviceGetRemappedRows`."""
        value = self._value(handle, "remapped_rows", "device_get_remapped_rows")
        return RemappedRows(
            int(value["correctable"]),
            int(value["uncorrectable"]),
            bool(value["pending"]),
            bool(value["failure"]),
        )

    def device_get_pcie_throughput(self, handle: object, counter: int) -> int:
        """Call `nvmlDeviceGetPcieThroughput` (KB/s)."""
        value = self._value(handle, "pcie_throughput_kbps", "device_get_pcie_throughput")
        key = {nvml.PCIE_UTIL_TX_BYTES: "tx", nvml.PCIE_UTIL_RX_BYTES: "rx"}.get(counter)
        if key is None:
            raise nvml.nvml_error(nvml.ERROR_INVALID_ARGUMENT, "nvmlDeviceGetPcieThroughput")
        return int(value[key])

    def device_get_field_values(self, handle: object, field_ids: Sequence[int]) -> list[FieldValue]:
        """Call `nvmlDeviceGetFieldValues`: absent fields read NOT_SUPPORTED, as the driver reports them."""
        with self._lock:
            gpu = self._gpu(handle, "device_get_field_values")
            fields: dict[str, Any] = gpu.get("fields", {})
            out = []
            for field_id in field_ids:
                value = fields.get(str(field_id), "NOT_SUPPORTED")
                if isinstance(value, str):
                    out.append(FieldValue(field_id, None, _named_error(value, f"field {field_id}")))
                else:
                    out.append(FieldValue(field_id, float(value)))
            return out

    def device_get_compute_running_processes(self, handle: object) -> list[ProcessInfo]:
        """Call `nvmlDeviceGetComputeRunningProcesses_v3`."""
        procs = self._value(handle, "processes", "device_get_compute_running_processes")
        return [
            ProcessInfo(
                int(p["pid"]), None if p.get("used_gpu_memory") is None else int(p["used_gpu_memory"])
            )
            for p in procs
        ]

    def device_get_supported_event_types(self, handle: object) -> int:
        """Call `nvmlDeviceGetSupportedEventTypes`."""
        return int(self._value(handle, "supported_event_types", "device_get_supported_event_types"))

    def event_set_create(self) -> object:
        """Call `nvmlEventSetCreate`."""
        with self._lock:
            self._check_init("event_set_create")
            event_set = _FakeEventSet()
            self._event_sets.append(event_set)
            return event_set

    def device_register_events(self, handle: object, event_types: int, event_set: object) -> None:
        """Call `nvmlDeviceRegisterEvents`: only supported types may be registered, as with the driver."""
        supported = self.device_get_supported_event_types(handle)
        with self._lock:
            self._gpu(handle, "device_register_events")
            if event_types & ~supported:
                raise nvml.NvmlNotSupportedError("nvmlDeviceRegisterEvents", f"mask {event_types:#x}")
            if not isinstance(event_set, _FakeEventSet) or event_set.freed:
                raise nvml.nvml_error(nvml.ERROR_INVALID_ARGUMENT, "nvmlDeviceRegisterEvents")
            assert isinstance(handle, FakeHandle)
            event_set.registered[handle.index] = event_set.registered.get(handle.index, 0) | event_types
            remaining = []
            for index, event_type, data in self._initial_events:
                if index == handle.index and event_type & event_types:
                    event_set.pending.append(EventData(FakeHandle(index), event_type, data))
                else:
                    remaining.append((index, event_type, data))
            self._initial_events[:] = remaining

    def event_set_wait(self, event_set: object, timeout_ms: int) -> EventData:
        """Call `nvmlEventSetWait_v2`: the next event, or `NvmlTimeoutError` after `timeout_ms`."""
        with self._lock:
            self._check_init("event_set_wait")
            if not isinstance(event_set, _FakeEventSet) or event_set.freed:
                raise nvml.nvml_error(nvml.ERROR_INVALID_ARGUMENT, "nvmlEventSetWait")
            self._lock.wait_for(lambda: bool(event_set.pending) or event_set.freed, timeout_ms / 1000)
            if event_set.freed or not event_set.pending:
                raise nvml.NvmlTimeoutError("nvmlEventSetWait")
            return event_set.pending.popleft()

    def event_set_free(self, event_set: object) -> None:
        """Call `nvmlEventSetFree` (wakes a waiter, which then times out)."""
        with self._lock:
            self._check_init("event_set_free")
            if isinstance(event_set, _FakeEventSet):
                event_set.freed = True
                if event_set in self._event_sets:
                    self._event_sets.remove(event_set)
            self._lock.notify_all()


def _named_error(name: str, call: str) -> nvml.NvmlError:
    code = nvml.ERROR_CODES_BY_NAME.get(name.upper())
    if code is None:
        raise FixtureError(f"{call}: fixture names unknown NVML error {name!r}")
    return nvml.nvml_error(code, call)


if __name__ == "__main__":
    raise SystemExit(main())

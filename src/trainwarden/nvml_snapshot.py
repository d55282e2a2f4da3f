"""Capture a real node's NVML state as a fixture: `python -m trainwarden.testing nvml-snapshot`.

Runs on a machine with NVIDIA GPUs and writes the JSON that `testing.FakeNvml` loads, so a card's
real answers (and its refusals) become a test fixture. Reads only through the `Nvml` Protocol.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from trainwarden import nvml_codes
from trainwarden.nvml import Nvml, NvmlError, PynvmlBinding


def capture_snapshot(api: Nvml, description: str = "") -> dict[str, Any]:
    """Read every GPU through `api` into the fixture format `FakeNvml` loads.

    Run on a machine with NVIDIA GPUs (`python -m trainwarden.testing nvml-snapshot > node.json`)
    to keep its state as a fixture; a query the GPU refuses is stored as `{"error": NAME}` so the
    fake refuses it the same way.
    """

    def attempt(call: Any) -> Any:
        try:
            return call()
        except NvmlError as exc:
            return {"error": exc.name.upper()}

    api.init()
    try:
        gpus: list[dict[str, Any]] = []
        for index in range(api.device_get_count()):
            try:
                h = api.device_get_handle_by_index(index)
            except NvmlError as exc:
                blank = {"uuid": "", "name": "", "pci_bus_id": ""}
                gpus.append({"index": index, **blank, "lost": True, "handle_error": exc.name.upper()})
                continue

            def pair(call: Any, *args: Any) -> Any:
                return attempt(lambda c=call, a=args: c(h, *a))  # noqa: B023 - called at once

            gpu: dict[str, Any] = {
                "index": index,
                "uuid": pair(api.device_get_uuid),
                "name": pair(api.device_get_name),
                "pci_bus_id": pair(api.device_get_pci_bus_id),
            }
            if any(isinstance(gpu[k], dict) for k in ("uuid", "name", "pci_bus_id")):
                gpus.append({**{k: "" if isinstance(v, dict) else v for k, v in gpu.items()}, "lost": True})
                continue
            util = pair(api.device_get_utilization_rates)
            mem = pair(api.device_get_memory_info)
            rows = pair(api.device_get_remapped_rows)
            sm = pair(api.device_get_clock_info, nvml_codes.CLOCK_SM)
            mem_clock = pair(api.device_get_clock_info, nvml_codes.CLOCK_MEM)
            tx = pair(api.device_get_pcie_throughput, nvml_codes.PCIE_UTIL_TX_BYTES)
            rx = pair(api.device_get_pcie_throughput, nvml_codes.PCIE_UTIL_RX_BYTES)
            fields = pair(api.device_get_field_values, nvml_codes.FIELD_IDS)
            procs = pair(api.device_get_compute_running_processes)
            gpu |= {
                "utilization": util if isinstance(util, dict) else {"gpu": util.gpu, "memory": util.memory},
                "memory": mem
                if isinstance(mem, dict)
                else {"total": mem.total, "used": mem.used, "free": mem.free},
                "temperature_gpu": pair(api.device_get_temperature, nvml_codes.TEMPERATURE_GPU),
                "power_usage_mw": pair(api.device_get_power_usage),
                "energy_mj": pair(api.device_get_total_energy_consumption),
                "clocks_mhz": sm if isinstance(sm, dict) else {"sm": sm, "mem": mem_clock},
                "clocks_event_reasons": pair(api.device_get_current_clocks_event_reasons),
                "remapped_rows": rows
                if isinstance(rows, dict)
                else {
                    "correctable": rows.correctable,
                    "uncorrectable": rows.uncorrectable,
                    "pending": rows.pending,
                    "failure": rows.failure,
                },
                "pcie_throughput_kbps": tx if isinstance(tx, dict) else {"tx": tx, "rx": rx},
                "fields": fields
                if isinstance(fields, dict)
                else {
                    str(f.field_id): f.value if f.error is None else (f.error.name.upper()) for f in fields
                },
                "processes": procs
                if isinstance(procs, dict)
                else [{"pid": p.pid, "used_gpu_memory": p.used_gpu_memory} for p in procs],
                "supported_event_types": pair(api.device_get_supported_event_types),
            }
            gpus.append(gpu)
        return {
            "description": description or "captured with trainwarden.testing.capture_snapshot",
            "driver_version": api.system_get_driver_version(),
            "gpus": gpus,
        }
    finally:
        api.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m trainwarden.testing nvml-snapshot [DESCRIPTION]`: print this node's NVML snapshot."""
    import sys  # noqa: PLC0415 - only for the command line

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "nvml-snapshot":
        sys.stderr.write("usage: python -m trainwarden.testing nvml-snapshot [DESCRIPTION] > node.json\n")
        return 2
    try:
        snapshot = capture_snapshot(PynvmlBinding(), " ".join(args[1:]))
    except NvmlError as exc:
        sys.stderr.write(f"cannot read NVML: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(snapshot, indent=1) + "\n")
    return 0

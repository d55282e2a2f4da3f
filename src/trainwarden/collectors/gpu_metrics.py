"""The GPU collector's series: every `trainwarden_gpu_*` metric it exports, with its help and labels.

Kept apart from the collector so a reader (or the preflight GPU check) sees the whole metric contract
in one place, without the NVML sampling around it.
"""

from __future__ import annotations

from trainwarden.model import MetricKind, MetricSpec
from trainwarden.nvml_codes import (
    ECC_FIELDS,
    FI_GET_GPU_RECOVERY_ACTION,
    FI_MEMORY_TEMP,
    FI_PCIE_REPLAY_COUNTER,
    FI_RETIRED_PENDING,
    NVLINK_FIELDS,
    PCIE_BYTE_FIELDS,
    RETIRED_FIELDS,
)

GPU_LABELS = ("gpu", "uuid", "model")
_C = MetricKind.COUNTER
_G = MetricKind.GAUGE


def _spec(
    name: str, help_text: str, kind: MetricKind = _G, extra: tuple[str, ...] = (), window: bool = False
) -> MetricSpec:
    return MetricSpec(f"trainwarden_gpu_{name}", help_text, kind, GPU_LABELS + extra, window)


NVML_FAKE = MetricSpec(
    "trainwarden_nvml_fake",
    "1 when the GPU series come from an NVML fixture (TRAINWARDEN_NVML_FIXTURE), not from real GPUs.",
)
UP = _spec(
    "up", "1 while NVML answers for this GPU; 0 once it is lost (fell off the bus, needs reset).", window=True
)
INFO = MetricSpec(
    "trainwarden_gpu_info",
    "Identity of each GPU: PCI bus id and driver version.",
    MetricKind.INFO,
    (*GPU_LABELS, "pci_bus_id", "driver_version"),
)
UTILIZATION = _spec(
    "utilization_ratio", "Fraction of the last sample period a kernel ran (0-1).", window=True
)
MEMORY_UTILIZATION = _spec(
    "memory_utilization_ratio", "Fraction of the last sample period memory was read/written."
)
MEMORY_USED = _spec("memory_used_bytes", "Framebuffer memory in use.", window=True)
MEMORY_TOTAL = _spec("memory_total_bytes", "Framebuffer memory size.")
TEMPERATURE = _spec(
    "temperature_celsius", "Temperature of the GPU die or of its memory.", extra=("sensor",), window=True
)
POWER = _spec("power_watts", "Power draw of the board.", window=True)
ENERGY = _spec("energy_joules_total", "Energy used since the driver loaded.", _C)
CLOCK = _spec("clock_hertz", "Current SM or memory clock.", extra=("clock",))
CLOCK_EVENT = _spec(
    "clock_event_reason_active",
    "1 while this reason holds clocks down (throttling: power cap, thermal, HW slowdown...).",
    extra=("reason",),
)
ECC = _spec(
    "ecc_errors_total",
    "ECC errors: corrected (single-bit) or uncorrected (double-bit); volatile (since driver load) "
    "or aggregate (lifetime).",
    _C,
    ("type", "counter"),
)
REMAPPED_ROWS = _spec(
    "remapped_rows_total", "Memory rows remapped, by the error that caused it.", _C, ("cause",)
)
REMAP_PENDING = _spec("row_remap_pending", "1 when a row remap waits for a GPU reset to take effect.")
REMAP_FAILURE = _spec("row_remap_failure", "1 when a row could not be remapped: the GPU needs service.")
RETIRED_PAGES = _spec(
    "retired_pages_total", "Memory pages retired (pre-Ampere GPUs), by cause.", _C, ("cause",)
)
RETIRED_PENDING = _spec("retired_pages_pending", "1 when page retirement waits for a driver reload.")
PCIE_REPLAYS = _spec(
    "pcie_replays_total", "PCIe replays (link-level retransmissions): a flaky slot or riser.", _C
)
PCIE_BYTES = _spec("pcie_bytes_total", "Bytes moved over PCIe by the GPU.", _C, ("direction",))
PCIE_THROUGHPUT = _spec(
    "pcie_throughput_bytes_per_second",
    "PCIe throughput over NVML's 20 ms sample, where the GPU has no byte counters.",
    extra=("direction",),
)
NVLINK_ERRORS = _spec("nvlink_errors_total", "NVLink errors summed over all links, by kind.", _C, ("type",))
RECOVERY_ACTION = _spec(
    "recovery_action",
    "The driver's recommended recovery: 0 none, 1 GPU reset, 2 node reboot, 3 drain P2P, 4 drain and reset, "
    "5 recover IMEX domain, 6 bus reset, 7 system reboot (see xid_catalog.action_for_recovery).",
)
PROCESS_MEMORY = _spec(
    "process_memory_bytes", "GPU memory used by the processes of one training rank.", extra=("job", "rank")
)
UNOWNED_MEMORY = _spec(
    "unowned_process_memory_bytes", "GPU memory used by processes that are not a known training rank."
)
PROCESSES = _spec("processes", "Compute processes on the GPU.")
QUERY_ERRORS = MetricSpec(
    "trainwarden_gpu_query_errors_total",
    "NVML queries that failed for a reason other than 'not supported', by GPU and NVML error.",
    MetricKind.COUNTER,
    ("gpu", "error"),
)
EVENTS = MetricSpec(
    "trainwarden_gpu_events_total",
    "NVML events received (xid, single/double-bit ECC, gpu_unavailable, recovery_action) per GPU.",
    MetricKind.COUNTER,
    ("gpu", "type"),
)
EVENT_WAIT_ERRORS = MetricSpec(
    "trainwarden_gpu_event_wait_errors_total",
    "nvmlEventSetWait failures other than timeouts (the thread backs off 1 s after each).",
    MetricKind.COUNTER,
)
EVENT_WATCHER_UP = MetricSpec(
    "trainwarden_gpu_event_watcher_up", "1 while the NVML event thread is running (0: only polling and kmsg)."
)

FIELD_NAMES = {
    **{k: f"ECC {t} {c}" for k, (t, c) in ECC_FIELDS.items()},
    **{k: f"NVLink {v} errors" for k, v in NVLINK_FIELDS.items()},
    **{k: f"retired pages ({v})" for k, v in RETIRED_FIELDS.items()},
    FI_RETIRED_PENDING: "retired pages pending",
    FI_MEMORY_TEMP: "memory temperature",
    FI_PCIE_REPLAY_COUNTER: "PCIe replay counter",
    **{k: f"PCIe {v} byte counter" for k, v in PCIE_BYTE_FIELDS.items()},
    FI_GET_GPU_RECOVERY_ACTION: "GPU recovery action",
}
# What each field becomes: spec, its extra labels, and whether the value is a 0/1 flag.
FIELD_SERIES: dict[int, tuple[MetricSpec, dict[str, str], bool]] = {
    **{k: (ECC, {"type": t, "counter": c}, False) for k, (t, c) in ECC_FIELDS.items()},
    **{k: (NVLINK_ERRORS, {"type": v}, False) for k, v in NVLINK_FIELDS.items()},
    **{k: (RETIRED_PAGES, {"cause": v}, False) for k, v in RETIRED_FIELDS.items()},
    FI_RETIRED_PENDING: (RETIRED_PENDING, {}, True),
    FI_MEMORY_TEMP: (TEMPERATURE, {"sensor": "memory"}, False),
    FI_PCIE_REPLAY_COUNTER: (PCIE_REPLAYS, {}, False),
    **{k: (PCIE_BYTES, {"direction": v}, False) for k, v in PCIE_BYTE_FIELDS.items()},
    FI_GET_GPU_RECOVERY_ACTION: (RECOVERY_ACTION, {}, False),
}

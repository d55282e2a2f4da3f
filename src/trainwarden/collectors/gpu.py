"""NVIDIA GPUs through NVML: load, memory, heat, power, clocks and throttling, and every error counter.

Talks only to the `trainwarden.nvml.Nvml` Protocol (pynvml, or `FakeNvml` when
`TRAINWARDEN_NVML_FIXTURE` is set). Three failure shapes are kept apart:

- no NVML library or driver: `start()` raises `CollectorUnavailableError` (one log line from the
  scheduler, `trainwarden_collector_success{collector="gpu"} 0`), nothing else is exported;
- a query a GPU does not support: skipped, logged once per GPU and query, listed in `status()`;
- a GPU that fell off the bus: `trainwarden_gpu_up 0` for it while the others go on being sampled.

Every per-GPU series carries `gpu` (NVML index), `uuid` and `model`: bounded by the GPUs on the node.

    [collectors.gpu]
    interval_seconds = 5.0
    events = true                    # NVML event thread (XIDs, ECC, recovery action)
    process_memory = true            # per-rank GPU memory, via the training collector's pids
    pcie_throughput_fallback = true  # 20 ms NVML sample where a GPU lacks PCIe byte counters
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from trainwarden import nvml
from trainwarden.collectors.base import Collector, CollectorContext
from trainwarden.collectors.gpu_events import EVENT_TYPES, NvmlEventWatcher
from trainwarden.collectors.labelled import labelled
from trainwarden.config import CollectorOptions
from trainwarden.errors import CollectorUnavailableError, TrainwardenError
from trainwarden.model import MetricKind, MetricSpec, Sample
from trainwarden.nvml import Nvml, NvmlError

log = logging.getLogger(__name__)

T = TypeVar("T")

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

# Field ids read in one nvmlDeviceGetFieldValues call per GPU, and what each becomes.
_ECC_FIELDS = {
    nvml.FI_ECC_SBE_VOL_TOTAL: ("corrected", "volatile"),
    nvml.FI_ECC_DBE_VOL_TOTAL: ("uncorrected", "volatile"),
    nvml.FI_ECC_SBE_AGG_TOTAL: ("corrected", "aggregate"),
    nvml.FI_ECC_DBE_AGG_TOTAL: ("uncorrected", "aggregate"),
}
_NVLINK_FIELDS = {
    nvml.FI_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL: "crc_flit",
    nvml.FI_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL: "crc_data",
    nvml.FI_NVLINK_REPLAY_ERROR_COUNT_TOTAL: "replay",
    nvml.FI_NVLINK_RECOVERY_ERROR_COUNT_TOTAL: "recovery",
}
_RETIRED_FIELDS = {nvml.FI_RETIRED_SBE: "single_bit_ecc", nvml.FI_RETIRED_DBE: "double_bit_ecc"}
_PCIE_BYTE_FIELDS = {nvml.FI_PCIE_COUNT_TX_BYTES: "tx", nvml.FI_PCIE_COUNT_RX_BYTES: "rx"}
FIELD_IDS: tuple[int, ...] = (
    *_ECC_FIELDS,
    *_NVLINK_FIELDS,
    *_RETIRED_FIELDS,
    nvml.FI_RETIRED_PENDING,
    nvml.FI_MEMORY_TEMP,
    nvml.FI_PCIE_REPLAY_COUNTER,
    *_PCIE_BYTE_FIELDS,
    nvml.FI_GET_GPU_RECOVERY_ACTION,
)
_FIELD_NAMES = {
    **{k: f"ECC {t} {c}" for k, (t, c) in _ECC_FIELDS.items()},
    **{k: f"NVLink {v} errors" for k, v in _NVLINK_FIELDS.items()},
    **{k: f"retired pages ({v})" for k, v in _RETIRED_FIELDS.items()},
    nvml.FI_RETIRED_PENDING: "retired pages pending",
    nvml.FI_MEMORY_TEMP: "memory temperature",
    nvml.FI_PCIE_REPLAY_COUNTER: "PCIe replay counter",
    **{k: f"PCIe {v} byte counter" for k, v in _PCIE_BYTE_FIELDS.items()},
    nvml.FI_GET_GPU_RECOVERY_ACTION: "GPU recovery action",
}
# What each field becomes: spec, its extra labels, and whether the value is a 0/1 flag.
_FIELD_SERIES: dict[int, tuple[MetricSpec, dict[str, str], bool]] = {
    **{k: (ECC, {"type": t, "counter": c}, False) for k, (t, c) in _ECC_FIELDS.items()},
    **{k: (NVLINK_ERRORS, {"type": v}, False) for k, v in _NVLINK_FIELDS.items()},
    **{k: (RETIRED_PAGES, {"cause": v}, False) for k, v in _RETIRED_FIELDS.items()},
    nvml.FI_RETIRED_PENDING: (RETIRED_PENDING, {}, True),
    nvml.FI_MEMORY_TEMP: (TEMPERATURE, {"sensor": "memory"}, False),
    nvml.FI_PCIE_REPLAY_COUNTER: (PCIE_REPLAYS, {}, False),
    **{k: (PCIE_BYTES, {"direction": v}, False) for k, v in _PCIE_BYTE_FIELDS.items()},
    nvml.FI_GET_GPU_RECOVERY_ACTION: (RECOVERY_ACTION, {}, False),
}
_KB = 1000  # nvmlDeviceGetPcieThroughput reports KB/s (1 KB = 1000 B, nvml.h)


@dataclass(frozen=True)
class GpuOptions(CollectorOptions):
    """Options of the GPU collector.

    `events`: run the NVML event thread; `process_memory`: per-rank GPU memory;
    `pcie_throughput_fallback`: where a GPU lacks PCIe byte counters (pre-Hopper), sample
    nvmlDeviceGetPcieThroughput instead (it blocks 20 ms per direction per GPU).
    """

    events: bool = True
    process_memory: bool = True
    pcie_throughput_fallback: bool = True
    event_poll_ms: int = 500

    def problems(self) -> list[tuple[str, str]]:
        """The event wait must be short enough for a prompt shutdown."""
        found = super().problems()
        if not 10 <= self.event_poll_ms <= 5000:
            found.append(("event_poll_ms", "must be between 10 and 5000"))
        return found


@dataclass
class _Gpu:
    index: int
    handle: object | None
    uuid: str
    model: str
    pci_bus_id: str
    lost: bool = False

    def labels(self) -> dict[str, str]:
        return {"gpu": str(self.index), "uuid": self.uuid, "model": self.model}


class _Skip(Exception):  # noqa: N818 - control flow, not an error users see
    """A query that produced nothing this round (unsupported or failed, already accounted)."""


class _Lost(Exception):  # noqa: N818 - control flow
    """The GPU was lost during this round."""


class GpuCollector(Collector):
    """Samples every GPU NVML sees; runs the NVML event thread alongside."""

    name: ClassVar[str] = "gpu"
    Options: ClassVar[type[CollectorOptions]] = GpuOptions

    def __init__(self, options: CollectorOptions, context: CollectorContext, api: Nvml | None = None) -> None:
        super().__init__(options, context)
        self._opts = options if isinstance(options, GpuOptions) else GpuOptions()
        self._api_given = api
        self._api: Nvml | None = None
        self._gpus: list[_Gpu] = []
        self._driver = ""
        self._unsupported: set[tuple[int, str]] = set()
        self._new_unsupported: dict[str, list[int]] = {}
        self._query_errors: Counter[tuple[str, str]] = Counter()
        self._watcher: NvmlEventWatcher | None = None
        self._fake_source = ""

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Initialise NVML and learn each GPU's identity; no NVML means unavailable, not failed."""
        try:
            api = self._api_given if self._api_given is not None else nvml.load_nvml()
            api.init()
        except TrainwardenError as exc:  # NvmlError, or an unusable TRAINWARDEN_NVML_FIXTURE
            raise CollectorUnavailableError(f"NVML unavailable ({exc}); GPU metrics disabled") from exc
        self._api = api
        # Only the fixture fake has a `source`; a node on fake GPUs must never pass for a real one.
        self._fake_source = str(getattr(api, "source", ""))
        if self._fake_source:
            log.warning(
                "FAKE GPUs: NVML answers come from the fixture %s (%s is set), not from this node's GPUs",
                self._fake_source,
                nvml.FIXTURE_ENV,
            )
        try:
            self._driver = api.system_get_driver_version()
            count = api.device_get_count()
        except NvmlError as exc:
            api.shutdown()
            raise CollectorUnavailableError(f"NVML initialised but cannot list GPUs ({exc})") from exc
        self._gpus = [self._identify(api, index) for index in range(count)]
        self.context.xid_ledger.set_gpus({g.pci_bus_id: g.index for g in self._gpus if g.pci_bus_id})
        if self._opts.events:
            handles = {g.index: g.handle for g in self._gpus if not g.lost and g.handle is not None}
            self._watcher = NvmlEventWatcher(
                api, handles, self.context.xid_ledger, self.context.clock, self._opts.event_poll_ms
            )
            try:
                self._watcher.start()
            except NvmlError as exc:
                log.warning("NVML events unavailable (%s); XIDs come from the kernel log only", exc)
                self._watcher = None

    def _identify(self, api: Nvml, index: int) -> _Gpu:
        gpu = _Gpu(index, None, uuid="", model="", pci_bus_id="")
        try:
            # A GPU that fell off the bus before NVML started often has no handle at all.
            gpu.handle = handle = api.device_get_handle_by_index(index)
            gpu.uuid = api.device_get_uuid(handle)
            gpu.model = api.device_get_name(handle)
            gpu.pci_bus_id = api.device_get_pci_bus_id(handle)
        except NvmlError as exc:
            # Lost, or answering nothing useful: reported down and probed again every collection.
            gpu.lost = True
            log.error("GPU %d does not answer at start (%s): reported down", index, exc)  # noqa: TRY400
        return gpu

    def close(self) -> None:
        """Stop the event thread and release NVML."""
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if self._api is not None:
            try:
                self._api.shutdown()
            except NvmlError as exc:
                log.debug("nvmlShutdown: %s", exc)
            self._api = None

    # --- collection -----------------------------------------------------------------------------

    def collect(self) -> Iterable[Sample]:
        """One sample of every GPU; a lost GPU reports `up 0` and never stops the others."""
        samples: list[Sample] = []
        for gpu in self._gpus:
            samples.extend(self.sample_gpu(gpu.index))
        for (gpu_label, error), count in sorted(self._query_errors.items()):
            samples.append(QUERY_ERRORS.sample(count, gpu=gpu_label, error=error))
        if self._watcher is not None:
            for (gpu_label, kind), count in sorted(self._watcher.counts().items()):
                samples.append(EVENTS.sample(count, gpu=gpu_label, type=kind))
            samples.append(EVENT_WAIT_ERRORS.sample(self._watcher.errors))
        samples.append(
            EVENT_WATCHER_UP.sample(1.0 if self._watcher is not None and self._watcher.running else 0.0)
        )
        samples.append(NVML_FAKE.sample(1.0 if self._fake_source else 0.0))
        self._log_new_unsupported()
        return samples

    def sample_gpu(self, index: int) -> list[Sample]:
        """All series of one GPU (public so the benchmark can time one GPU)."""
        gpu = self._gpus[index]
        recovered = not gpu.lost or self._answers_again(gpu)
        labels = gpu.labels()
        info = labelled(INFO, 1, labels, pci_bus_id=gpu.pci_bus_id, driver_version=self._driver)
        if not recovered:
            return [info, labelled(UP, 0, labels)]
        try:
            body = self._read_gpu(gpu, labels)
        except _Lost:
            return [info, labelled(UP, 0, labels)]
        return [info, *body, labelled(UP, 1, labels)]

    def _answers_again(self, gpu: _Gpu) -> bool:
        """Probe a lost GPU once per collection; after a GPU reset it answers and is sampled again."""
        api = self._api
        assert api is not None
        try:
            if gpu.handle is None:
                gpu.handle = api.device_get_handle_by_index(gpu.index)
            uuid = api.device_get_uuid(gpu.handle)
            model = gpu.model or api.device_get_name(gpu.handle)
            pci = gpu.pci_bus_id or api.device_get_pci_bus_id(gpu.handle)
        except NvmlError:
            return False
        gpu.uuid, gpu.model, gpu.pci_bus_id, gpu.lost = uuid, model, pci, False
        log.warning("GPU %d (%s, %s) answers again; sampling resumes", gpu.index, gpu.model, gpu.uuid)
        return True

    def _query(self, gpu: _Gpu, what: str, call: Callable[[], T]) -> T:
        """Run one NVML call, turning its failure into the right accounting."""
        try:
            return call()
        except nvml.LOST_ERRORS as exc:
            if not gpu.lost:
                gpu.lost = True
                log.error("GPU %d (%s, %s) is lost: %s", gpu.index, gpu.model, gpu.uuid, exc)  # noqa: TRY400
            raise _Lost from exc
        except nvml.NvmlNotSupportedError as exc:
            self._note_unsupported(gpu, what)
            raise _Skip from exc
        except NvmlError as exc:
            self._query_errors[(str(gpu.index), exc.name)] += 1
            raise _Skip from exc

    def _note_unsupported(self, gpu: _Gpu, what: str) -> None:
        if (gpu.index, what) not in self._unsupported:
            self._unsupported.add((gpu.index, what))
            self._new_unsupported.setdefault(what, []).append(gpu.index)

    def _log_new_unsupported(self) -> None:
        """One line per collection that found new unsupported queries, not one per GPU and field."""
        if not self._new_unsupported:
            return
        parts = [
            f"{what} (GPU {','.join(map(str, gpus))})" for what, gpus in sorted(self._new_unsupported.items())
        ]
        log.info("NVML queries not supported, skipped from now on: %s", "; ".join(parts))
        self._new_unsupported.clear()

    def _read_gpu(self, gpu: _Gpu, labels: dict[str, str]) -> list[Sample]:
        api = self._api
        assert api is not None
        h = gpu.handle
        out: list[Sample] = []

        def attempt(what: str, call: Callable[[], T], emit: Callable[[T], Iterable[Sample]]) -> None:
            try:
                value = self._query(gpu, what, call)
            except _Skip:
                return
            out.extend(emit(value))

        attempt(
            "utilization",
            lambda: api.device_get_utilization_rates(h),
            lambda u: [
                labelled(UTILIZATION, u.gpu / 100, labels),
                labelled(MEMORY_UTILIZATION, u.memory / 100, labels),
            ],
        )
        attempt(
            "memory info",
            lambda: api.device_get_memory_info(h),
            lambda m: [labelled(MEMORY_USED, m.used, labels), labelled(MEMORY_TOTAL, m.total, labels)],
        )
        attempt(
            "GPU temperature",
            lambda: api.device_get_temperature(h, nvml.TEMPERATURE_GPU),
            lambda t: [labelled(TEMPERATURE, t, labels, sensor="gpu")],
        )
        attempt(
            "power usage",
            lambda: api.device_get_power_usage(h),
            lambda p: [labelled(POWER, p / 1000, labels)],
        )
        attempt(
            "energy counter",
            lambda: api.device_get_total_energy_consumption(h),
            lambda e: [labelled(ENERGY, e / 1000, labels)],
        )
        attempt(
            "SM clock",
            lambda: api.device_get_clock_info(h, nvml.CLOCK_SM),
            lambda c: [labelled(CLOCK, c * 1e6, labels, clock="sm")],
        )
        attempt(
            "memory clock",
            lambda: api.device_get_clock_info(h, nvml.CLOCK_MEM),
            lambda c: [labelled(CLOCK, c * 1e6, labels, clock="memory")],
        )
        attempt(
            "clock event reasons",
            lambda: api.device_get_current_clocks_event_reasons(h),
            lambda mask: [
                labelled(CLOCK_EVENT, 1 if mask & bit else 0, labels, reason=reason)
                for bit, reason in nvml.CLOCK_EVENT_REASONS.items()
            ],
        )
        attempt(
            "remapped rows",
            lambda: api.device_get_remapped_rows(h),
            lambda r: [
                labelled(REMAPPED_ROWS, r.correctable, labels, cause="correctable"),
                labelled(REMAPPED_ROWS, r.uncorrectable, labels, cause="uncorrectable"),
                labelled(REMAP_PENDING, 1 if r.pending else 0, labels),
                labelled(REMAP_FAILURE, 1 if r.failure else 0, labels),
            ],
        )
        fields: dict[int, float] = {}
        attempt(
            "field values",
            lambda: api.device_get_field_values(h, FIELD_IDS),
            lambda v: self._fields(gpu, v, fields),
        )
        out.extend(self._field_samples(fields, labels))
        if not set(_PCIE_BYTE_FIELDS) <= fields.keys() and self._opts.pcie_throughput_fallback:
            attempt(
                "PCIe tx throughput",
                lambda: api.device_get_pcie_throughput(h, nvml.PCIE_UTIL_TX_BYTES),
                lambda kbps: [labelled(PCIE_THROUGHPUT, kbps * _KB, labels, direction="tx")],
            )
            attempt(
                "PCIe rx throughput",
                lambda: api.device_get_pcie_throughput(h, nvml.PCIE_UTIL_RX_BYTES),
                lambda kbps: [labelled(PCIE_THROUGHPUT, kbps * _KB, labels, direction="rx")],
            )
        if self._opts.process_memory:
            attempt(
                "compute processes",
                lambda: api.device_get_compute_running_processes(h),
                lambda procs: self._process_samples(procs, labels),
            )
        return out

    def _fields(self, gpu: _Gpu, values: list[nvml.FieldValue], into: dict[int, float]) -> list[Sample]:
        for item in values:
            if item.error is None and item.value is not None:
                into[item.field_id] = item.value
                continue
            what = _FIELD_NAMES.get(item.field_id, f"field {item.field_id}")
            if isinstance(item.error, nvml.LOST_ERRORS):
                self._query(gpu, what, _raiser(item.error))
            elif isinstance(item.error, nvml.NvmlNotSupportedError):
                self._note_unsupported(gpu, what)
            elif item.error is not None:
                self._query_errors[(str(gpu.index), item.error.name)] += 1
        return []

    @staticmethod
    def _field_samples(fields: Mapping[int, float], labels: dict[str, str]) -> list[Sample]:
        out: list[Sample] = []
        for fid, (spec, extra, as_flag) in _FIELD_SERIES.items():
            if fid in fields:
                value = fields[fid]
                out.append(labelled(spec, (1 if value else 0) if as_flag else value, labels, **extra))
        return out

    def _process_samples(self, procs: list[nvml.ProcessInfo], labels: dict[str, str]) -> list[Sample]:
        owners = self.context.pid_owners
        by_rank: dict[tuple[str, str], float] = {}
        unowned = 0.0
        for proc in procs:
            used = float(proc.used_gpu_memory or 0)
            owner = owners.get(proc.pid)
            if owner is None:
                unowned += used
            else:
                key = (owner.job, str(owner.rank))
                by_rank[key] = by_rank.get(key, 0.0) + used
        out = [labelled(PROCESSES, len(procs), labels), labelled(UNOWNED_MEMORY, unowned, labels)]
        out.extend(
            labelled(PROCESS_MEMORY, used, labels, job=job, rank=rank)
            for (job, rank), used in sorted(by_rank.items())
        )
        return out

    def status(self) -> Mapping[str, Any]:
        """GPUs, which are lost, what each does not support, and whether the event thread runs."""
        return {
            "fake_nvml": self._fake_source or None,
            "driver_version": self._driver,
            "gpus": [
                {
                    "index": g.index,
                    "uuid": g.uuid,
                    "model": g.model,
                    "pci_bus_id": g.pci_bus_id,
                    "lost": g.lost,
                }
                for g in self._gpus
            ],
            "unsupported": sorted(f"gpu {i}: {what}" for i, what in self._unsupported),
            "query_errors": {f"gpu {g}: {e}": n for (g, e), n in self._query_errors.items()},
            "event_watcher": {
                "running": self._watcher is not None and self._watcher.running,
                "registered": {
                    str(i): hex(m) for i, m in (self._watcher.registered if self._watcher else {}).items()
                },
                "types": sorted(EVENT_TYPES.values()),
            },
        }


def _raiser(error: NvmlError) -> Callable[[], Any]:
    def raise_it() -> Any:
        raise error

    return raise_it


COLLECTOR = GpuCollector

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
from trainwarden.collectors import gpu_metrics as series
from trainwarden.collectors.base import Collector, CollectorContext
from trainwarden.collectors.gpu_events import EVENT_TYPES, NvmlEventWatcher
from trainwarden.collectors.labelled import labelled
from trainwarden.config import CollectorOptions
from trainwarden.errors import CollectorUnavailableError, TrainwardenError
from trainwarden.fixture_switch import load_nvml
from trainwarden.model import Sample
from trainwarden.nvml import Nvml, NvmlError
from trainwarden.nvml_codes import FIELD_IDS, PCIE_BYTE_FIELDS

log = logging.getLogger(__name__)

T = TypeVar("T")

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
            api = self._api_given if self._api_given is not None else load_nvml()
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
            samples.append(series.QUERY_ERRORS.sample(count, gpu=gpu_label, error=error))
        if self._watcher is not None:
            for (gpu_label, kind), count in sorted(self._watcher.counts().items()):
                samples.append(series.EVENTS.sample(count, gpu=gpu_label, type=kind))
            samples.append(series.EVENT_WAIT_ERRORS.sample(self._watcher.errors))
        samples.append(
            series.EVENT_WATCHER_UP.sample(
                1.0 if self._watcher is not None and self._watcher.running else 0.0
            )
        )
        samples.append(series.NVML_FAKE.sample(1.0 if self._fake_source else 0.0))
        self._log_new_unsupported()
        return samples

    def sample_gpu(self, index: int) -> list[Sample]:
        """All series of one GPU (public so the benchmark can time one GPU)."""
        gpu = self._gpus[index]
        recovered = not gpu.lost or self._answers_again(gpu)
        labels = gpu.labels()
        info = labelled(series.INFO, 1, labels, pci_bus_id=gpu.pci_bus_id, driver_version=self._driver)
        if not recovered:
            return [info, labelled(series.UP, 0, labels)]
        try:
            body = self._read_gpu(gpu, labels)
        except _Lost:
            return [info, labelled(series.UP, 0, labels)]
        return [info, *body, labelled(series.UP, 1, labels)]

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
                labelled(series.UTILIZATION, u.gpu / 100, labels),
                labelled(series.MEMORY_UTILIZATION, u.memory / 100, labels),
            ],
        )
        attempt(
            "memory info",
            lambda: api.device_get_memory_info(h),
            lambda m: [
                labelled(series.MEMORY_USED, m.used, labels),
                labelled(series.MEMORY_TOTAL, m.total, labels),
            ],
        )
        attempt(
            "GPU temperature",
            lambda: api.device_get_temperature(h, nvml.TEMPERATURE_GPU),
            lambda t: [labelled(series.TEMPERATURE, t, labels, sensor="gpu")],
        )
        attempt(
            "power usage",
            lambda: api.device_get_power_usage(h),
            lambda p: [labelled(series.POWER, p / 1000, labels)],
        )
        attempt(
            "energy counter",
            lambda: api.device_get_total_energy_consumption(h),
            lambda e: [labelled(series.ENERGY, e / 1000, labels)],
        )
        attempt(
            "SM clock",
            lambda: api.device_get_clock_info(h, nvml.CLOCK_SM),
            lambda c: [labelled(series.CLOCK, c * 1e6, labels, clock="sm")],
        )
        attempt(
            "memory clock",
            lambda: api.device_get_clock_info(h, nvml.CLOCK_MEM),
            lambda c: [labelled(series.CLOCK, c * 1e6, labels, clock="memory")],
        )
        attempt(
            "clock event reasons",
            lambda: api.device_get_current_clocks_event_reasons(h),
            lambda mask: [
                labelled(series.CLOCK_EVENT, 1 if mask & bit else 0, labels, reason=reason)
                for bit, reason in nvml.CLOCK_EVENT_REASONS.items()
            ],
        )
        attempt(
            "remapped rows",
            lambda: api.device_get_remapped_rows(h),
            lambda r: [
                labelled(series.REMAPPED_ROWS, r.correctable, labels, cause="correctable"),
                labelled(series.REMAPPED_ROWS, r.uncorrectable, labels, cause="uncorrectable"),
                labelled(series.REMAP_PENDING, 1 if r.pending else 0, labels),
                labelled(series.REMAP_FAILURE, 1 if r.failure else 0, labels),
            ],
        )
        fields: dict[int, float] = {}
        attempt(
            "field values",
            lambda: api.device_get_field_values(h, FIELD_IDS),
            lambda v: self._fields(gpu, v, fields),
        )
        out.extend(self._field_samples(fields, labels))
        if not set(PCIE_BYTE_FIELDS) <= fields.keys() and self._opts.pcie_throughput_fallback:
            attempt(
                "PCIe tx throughput",
                lambda: api.device_get_pcie_throughput(h, nvml.PCIE_UTIL_TX_BYTES),
                lambda kbps: [labelled(series.PCIE_THROUGHPUT, kbps * _KB, labels, direction="tx")],
            )
            attempt(
                "PCIe rx throughput",
                lambda: api.device_get_pcie_throughput(h, nvml.PCIE_UTIL_RX_BYTES),
                lambda kbps: [labelled(series.PCIE_THROUGHPUT, kbps * _KB, labels, direction="rx")],
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
            what = series.FIELD_NAMES.get(item.field_id, f"field {item.field_id}")
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
        for fid, (spec, extra, as_flag) in series.FIELD_SERIES.items():
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
        out = [
            labelled(series.PROCESSES, len(procs), labels),
            labelled(series.UNOWNED_MEMORY, unowned, labels),
        ]
        out.extend(
            labelled(series.PROCESS_MEMORY, used, labels, job=job, rank=rank)
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

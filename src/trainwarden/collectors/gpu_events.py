"""The NVML event thread: XIDs, ECC and recovery-action events as they happen, not at the next poll.

`nvmlEventSetWait` blocks, so it runs on its own daemon thread with a short timeout (so `close()`
returns quickly). XIDs go to the shared `XidLedger` (deduplicated there against the kernel log);
every event is also counted by GPU and type for `trainwarden_gpu_events_total`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping

from trainwarden import nvml
from trainwarden.nvml import EventData, Nvml, NvmlError
from trainwarden.xid_ledger import XidLedger, XidReport, XidSource

log = logging.getLogger(__name__)

EVENT_TYPES: dict[int, str] = {
    nvml.EVENT_XID_CRITICAL: "xid",
    nvml.EVENT_SINGLE_BIT_ECC: "single_bit_ecc",
    nvml.EVENT_DOUBLE_BIT_ECC: "double_bit_ecc",
    nvml.EVENT_GPU_UNAVAILABLE: "gpu_unavailable",
    nvml.EVENT_GPU_RECOVERY_ACTION: "recovery_action",
}
"""The event types we register for (where the GPU supports them) → `type` label."""

WANTED_MASK = sum(EVENT_TYPES)
_ERROR_BACKOFF_SECONDS = 1.0


class NvmlEventWatcher:
    """Owns one NVML event set and the thread that waits on it."""

    def __init__(
        self,
        api: Nvml,
        handles: Mapping[int, object],
        ledger: XidLedger,
        clock: Callable[[], float],
        poll_ms: int = 500,
    ) -> None:
        self._api = api
        self._handles = dict(handles)
        self._index_by_key = {nvml.handle_key(h): i for i, h in handles.items()}
        self._ledger = ledger
        self._clock = clock
        self._poll_ms = poll_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._event_set: object | None = None
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._errors = 0
        self.registered: dict[int, int] = {}
        """GPU index → event mask actually registered (unsupported types left out)."""

    def start(self) -> None:
        """Create the event set, register each GPU for the supported subset, start the thread."""
        self._event_set = self._api.event_set_create()
        for index, handle in self._handles.items():
            try:
                mask = self._api.device_get_supported_event_types(handle) & WANTED_MASK
                if mask:
                    self._api.device_register_events(handle, mask, self._event_set)
                    self.registered[index] = mask
            except NvmlError as exc:
                # A lost GPU or a driver without events for it: the others are still watched.
                log.info(
                    "GPU %d: NVML events not registered (%s); the kernel log still reports its XIDs",
                    index,
                    exc,
                )
        if not self.registered:
            self._free()
            return
        self._thread = threading.Thread(target=self._loop, name="trainwarden-nvml-events", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """True while the thread is waiting for events."""
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._api.event_set_wait(self._event_set, self._poll_ms)
            except nvml.NvmlTimeoutError:
                continue
            except NvmlError as exc:
                with self._lock:
                    self._errors += 1
                    first = self._errors == 1
                if first:
                    log.warning(
                        "NVML event wait failed (%s); retrying every %gs", exc, _ERROR_BACKOFF_SECONDS
                    )
                self._stop.wait(_ERROR_BACKOFF_SECONDS)
                continue
            except Exception:
                log.exception("NVML event thread: unexpected error; retrying")
                self._stop.wait(_ERROR_BACKOFF_SECONDS)
                continue
            self.handle(event)

    def handle(self, event: EventData) -> None:
        """Count one event and hand XIDs to the ledger."""
        index = self._index_by_key.get(nvml.handle_key(event.device))
        gpu = str(index) if index is not None else "unknown"
        for bit, name in EVENT_TYPES.items():
            if event.event_type & bit:
                with self._lock:
                    self._counts[(gpu, name)] += 1
        if event.event_type & nvml.EVENT_XID_CRITICAL:
            self._ledger.record(
                XidReport(XidSource.NVML, int(event.event_data), self._clock(), gpu_index=index)
            )

    def counts(self) -> dict[tuple[str, str], int]:
        """Events seen so far by (gpu label, type)."""
        with self._lock:
            return dict(self._counts)

    @property
    def errors(self) -> int:
        """Failed waits so far (not timeouts)."""
        with self._lock:
            return self._errors

    def close(self) -> None:
        """Stop the thread (it wakes within `poll_ms`), then free the set it was waiting on."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._poll_ms / 1000 + 2.0)
        self._free()

    def _free(self) -> None:
        if self._event_set is not None:
            try:
                self._api.event_set_free(self._event_set)
            except NvmlError as exc:
                log.debug("nvmlEventSetFree: %s", exc)
            self._event_set = None

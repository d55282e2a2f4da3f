"""The demo's story: timeline events and the toy job's own events as readable lines, and a verdict.

Two sources feed it: the daemon's `TimelineEvent`s (findings, decisions, restarts; `on_event`)
and the toy job's JSON event lines (faults injected, resumes, skips, progress), tailed from its
`--events` file. Both are printed as they happen, with the time since the demo started, and kept
so the summary can say, per scripted fault, what detected it, how long that took, what healed it
and how many steps were lost.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from trainwarden.daemon.timeline import EventKind, TimelineEvent
from trainwarden.demo.scenario import ScriptedFault

PROGRESS_EVERY = 25
EXIT_RULE = "process_exit"  # what `trainwarden run` calls a job's own non-zero exit
_EVIDENCE_KEYS = (
    "elapsed_seconds",
    "timeout_seconds",
    "timeout_source",
    "z",
    "value",
    "baseline_median",
    "first_step",
    "last_step",
    "count",
    "exit_code",
)
_LABELS = {
    EventKind.CHILD_STARTED: "START",
    EventKind.CHILD_EXITED: "EXIT",
    EventKind.FINDING_FIRED: "DETECTED",
    EventKind.FINDING_RESOLVED: "resolved",
    EventKind.ACTION_DECIDED: "decided",
    EventKind.ACTION_APPLIED: "HEALED",
    EventKind.ACTION_FAILED: "FAILED",
    EventKind.GAVE_UP: "GAVE UP",
}


@dataclass
class FaultReport:
    """What happened to one scripted fault."""

    fault: ScriptedFault
    fired_at: float | None = None
    detected_at: float | None = None
    detected_by: str = ""
    healed_at: float | None = None
    healed_by: str = ""
    resumed_at: float | None = None
    resumed_step: int | None = None
    steps_lost: int = 0
    skipped: tuple[int, ...] = ()

    @property
    def healed(self) -> bool:
        """Injected, detected and healed (and, for a restart, training went on)."""
        done = self.fired_at is not None and self.detected_at is not None and self.healed_at is not None
        return done and (not self.fault.restarts or self.resumed_at is not None)

    @property
    def skipped_the_bad_batch(self) -> bool:
        """For a NaN burst: the resumed job skipped the poisoned batch itself, not some other one."""
        return self.fault.kind != "nan" or self.fault.step in self.skipped

    @property
    def ok(self) -> bool:
        """Healed, and a NaN's heal skipped the batch that carried it (skipping others is no heal)."""
        return self.healed and self.skipped_the_bad_batch

    @property
    def verdict(self) -> str:
        """One word or phrase for the summary table."""
        if self.fired_at is None:
            return "NOT INJECTED"
        if not self.healed:
            return "NOT HEALED"
        if not self.skipped_the_bad_batch:
            shown = ",".join(str(s) for s in self.skipped) or "none"
            return f"WRONG BATCHES SKIPPED ({shown}; poisoned: {self.fault.step})"
        return "ok"


@dataclass
class Narrator:
    """Prints the timeline as it happens and keeps what the summary needs. Thread-safe."""

    out: TextIO
    start: float
    steps: int
    events: list[TimelineEvent] = field(default_factory=list)
    job_events: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _offset: int = 0
    _partial: bytes = b""

    def say(self, when: float, label: str, text: str) -> None:
        """One timeline line: `+SECONDS  LABEL  text`."""
        with self._lock:
            self.out.write(f"  +{max(0.0, when - self.start):6.1f}s  {label:<9} {text}\n")
            self.out.flush()

    # --- the daemon's events ----------------------------------------------------------------

    def on_event(self, event: TimelineEvent) -> None:
        """`run_job`'s callback: keep the event and print it."""
        with self._lock:
            self.events.append(event)
        text = event.summary
        if event.kind is EventKind.FINDING_FIRED:
            evidence = _evidence(event.data)
            text = f"{event.rule}: {_after_colon(event.summary)}" + (f"  [{evidence}]" if evidence else "")
        elif event.kind is EventKind.CHILD_STARTED:
            restart = event.data.get("restart_count", 0)
            what = "job started" if not restart else f"job restarted (restart {restart})"
            text = f"{what}: torchrun, 2 ranks, pid {event.data.get('pid', '?')}"
        # Shown when it arrives: an action's own time is the start of its tick, before the healer ran.
        self.say(max(event.time, time.time()), _LABELS.get(event.kind, event.kind.value), text)

    # --- the toy job's events -----------------------------------------------------------------

    def poll_job_events(self, path: Path) -> None:
        """Read and print the toy's new event lines (call it every fraction of a second)."""
        try:
            with path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self._job_event(record)

    def _job_event(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.job_events.append(record)
        when, event, step = float(record.get("time", 0.0)), record.get("event"), record.get("step")
        if event == "fault":
            self.say(
                when, "FAULT", f"{record.get('kind')} injected on rank {record.get('rank')} at step {step}"
            )
        elif event == "start" and isinstance(step, int) and step > 0:
            self.say(
                when, "RESUMED", f"from the checkpoint of step {step - 1}: training goes on at step {step}"
            )
        elif event == "skip":
            self.say(when, "SKIP", f"batch of step {step} skipped (the daemon asked, around the NaN)")
        elif event == "step" and isinstance(step, int) and (step + 1) % PROGRESS_EVERY == 0:
            loss = record.get("loss")
            loss_text = f"{loss:.3f}" if isinstance(loss, float) and math.isfinite(loss) else str(loss)
            self.say(when, "progress", f"step {step + 1}/{self.steps}, loss {loss_text}")
        elif event == "done":
            self.say(when, "DONE", f"training finished all {step} steps")

    # --- the verdict --------------------------------------------------------------------------

    def reports(self, faults: Sequence[ScriptedFault]) -> list[FaultReport]:
        """Per fault: fired, first matching detection after it, first matching heal after that."""
        with self._lock:
            events = sorted(self.events, key=lambda e: e.time)
            job_events = list(self.job_events)
        reports = []
        for fault in faults:
            report = FaultReport(fault)
            fired = [
                e
                for e in job_events
                if e.get("event") == "fault" and e.get("kind") == fault.kind and e.get("step") == fault.step
            ]
            if fired:
                report.fired_at = float(fired[0]["time"])
                _match(report, events, job_events)
            reports.append(report)
        return reports

    def final_step(self) -> int | None:
        """The last step the job completed (rank 0), or None before the first."""
        with self._lock:
            steps = [int(e["step"]) for e in self.job_events if e.get("event") == "step"]
        return max(steps) if steps else None


def _match(
    report: FaultReport, events: Sequence[TimelineEvent], job_events: Sequence[dict[str, Any]]
) -> None:
    fault, fired = report.fault, report.fired_at
    assert fired is not None
    detection = next((e for e in events if e.time >= fired and _detects(e, fault)), None)
    if detection is None:
        return
    report.detected_at = detection.time
    report.detected_by = detection.rule or EXIT_RULE
    # The heal of this fault's own finding: an outcome is stamped with its tick's start, which can
    # be a moment before the finding's event, so match on the rule rather than on time order.
    heal = next(
        (
            e
            for e in events
            if e.kind is EventKind.ACTION_APPLIED
            and e.healer in fault.healers
            and e.rule in fault.rules
            and e.time >= fired
        ),
        None,
    )
    if heal is None:
        return
    report.healed_at, report.healed_by = heal.time, heal.healer
    if not fault.restarts:
        return
    resumed = next(
        (e for e in job_events if e.get("event") == "start" and float(e.get("time", 0.0)) >= heal.time), None
    )
    if resumed is None:
        return
    report.resumed_at, report.resumed_step = float(resumed["time"]), int(resumed.get("step", 0))
    report.skipped = tuple(
        sorted(
            {
                int(e["step"])
                for e in job_events
                if e.get("event") == "skip" and float(e.get("time", 0.0)) >= report.resumed_at
            }
        )
    )
    # Steps done by the generation the fault hit (since its start) that the resumed one repeats.
    began = max(
        (float(e.get("time", 0.0)) for e in job_events if e.get("event") == "start" and e["time"] <= fired),
        default=0.0,
    )
    done = [
        int(e["step"])
        for e in job_events
        if e.get("event") == "step" and began <= float(e.get("time", 0.0)) < report.resumed_at
    ]
    last_done = max(done) if done else report.resumed_step - 1
    report.steps_lost = max(0, last_done + 1 - report.resumed_step)


def _detects(event: TimelineEvent, fault: ScriptedFault) -> bool:
    """A finding of one of the fault's rules; a crash also by the job's non-zero exit itself."""
    if event.kind is EventKind.FINDING_FIRED:
        return event.rule in fault.rules
    exited = event.kind is EventKind.CHILD_EXITED and event.data.get("exit_code", 0) != 0
    return exited and EXIT_RULE in fault.rules


def _after_colon(summary: str) -> str:
    """The finding's own summary without the 'rule fired on subject:' prefix."""
    head, sep, tail = summary.partition(": ")
    return tail if sep and " fired on " in head else summary


def _evidence(data: Mapping[str, str | float | int | bool]) -> str:
    parts = []
    for key in _EVIDENCE_KEYS:
        value = data.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)

"""The node daemon: builds collectors from the config, schedules them, serves HTTP, obeys signals.

The main thread only waits for commands (stop, reload) that signal handlers enqueue; all work
happens on the scheduler's and the HTTP server's threads. A reload with an invalid config keeps
the running one, so a typo pushed by config management never takes monitoring down.
"""
# Over 450 lines (issue 15): the one class that knows the whole daemon (start, reload, stop); one
# place owns the daemon's lifecycle (next split: reload and /status apart from start/stop).

from __future__ import annotations

import dataclasses
import html
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from trainwarden import __version__
from trainwarden.collectors import collector_classes
from trainwarden.collectors.base import Collector, CollectorContext, PidOwners, RecordListener
from trainwarden.config import (
    CollectorOptions,
    Config,
    default_config,
    load_config,
    parse_listen,
    whole_config_problems,
)
from trainwarden.daemon.exporter import make_registry
from trainwarden.daemon.http import HttpServer, Request, Response, Routes, metrics_handler
from trainwarden.daemon.scheduler import CollectorScheduler, ExtraJob
from trainwarden.daemon.sdnotify import SdNotifier
from trainwarden.errors import CollectorUnavailableError, ConfigError, TrainwardenError
from trainwarden.model import MetricKind, MetricSpec
from trainwarden.plugins import plugin_groups
from trainwarden.store import Store

if TYPE_CHECKING:
    from trainwarden.daemon.healing import Healing

log = logging.getLogger(__name__)

SOURCE = "daemon"

READY = MetricSpec(
    "trainwarden_daemon_ready", "1 once the first full collection finished (what /healthz reports)."
)
RELOAD_OK = MetricSpec(
    "trainwarden_config_last_reload_successful", "1 if the last config (re)load succeeded, else 0."
)
RELOAD_TIME = MetricSpec(
    "trainwarden_config_last_reload_success_timestamp_seconds",
    "Unix time of the last successful config load.",
)
RELOADS = MetricSpec(
    "trainwarden_config_reloads_total",
    "Config reloads (SIGHUP) by result (success, failure).",
    MetricKind.COUNTER,
    ("result",),
)
# Settings a running daemon cannot change in place (sockets and directories are open already).
RESTART_ONLY = ("listen", "runtime_dir", "state_dir", "window_seconds", "node_name", "http")


@dataclasses.dataclass(frozen=True)
class Overrides:
    """Command-line values that win over the config file, on start and on every reload."""

    listen: str | None = None
    runtime_dir: Path | None = None
    state_dir: Path | None = None
    procfs: Path | None = None
    sysfs: Path | None = None

    def apply(self, config: Config) -> Config:
        """The config with these overrides applied."""
        daemon, paths = config.daemon, config.paths
        return dataclasses.replace(
            config,
            daemon=dataclasses.replace(
                daemon,
                listen=self.listen or daemon.listen,
                runtime_dir=self.runtime_dir or daemon.runtime_dir,
                state_dir=self.state_dir or daemon.state_dir,
            ),
            paths=dataclasses.replace(
                paths, procfs=self.procfs or paths.procfs, sysfs=self.sysfs or paths.sysfs
            ),
        )


def load(path: Path | None, overrides: Overrides = Overrides()) -> Config:
    """Read `path` (or the safe defaults when None) and apply the overrides; raises ConfigError."""
    groups = plugin_groups()
    config = overrides.apply(default_config(groups) if path is None else load_config(path, groups))
    problems = whole_config_problems(config, groups)
    if problems:
        raise ConfigError(problems, f"{config.source} with the command-line flags")
    return config


@dataclasses.dataclass(frozen=True)
class _Runtime:
    """What one configuration runs: its scheduler, started collectors and disabled names."""

    scheduler: CollectorScheduler | None = None
    collectors: tuple[Collector, ...] = ()
    disabled: tuple[str, ...] = ()


class Daemon:
    """One trainwarden daemon. `run()` blocks until SIGTERM/SIGINT; `start()`/`stop()` for embedding."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        overrides: Overrides = Overrides(),
        notifier: SdNotifier | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.notifier = notifier or SdNotifier()
        self.clock = clock
        self.store = Store(window_seconds=config.daemon.window_seconds)
        self.registry = make_registry(self.store)
        self.pid_owners = PidOwners()
        self.record_listeners: list[RecordListener] = []  # told of every client record (goodput)
        self.ready = threading.Event()
        self.started_at = clock()
        # Later features hook in here: a status section ("findings", "actions") and periodic jobs
        # (the rule engine's tick) without touching this class.
        self.status_sections: dict[str, Callable[[], Any]] = {}
        self.extra_jobs: list[ExtraJob] = []
        self.stop_hooks: list[Callable[[], None]] = []  # run once the collectors stopped (final saves)
        # Detect-and-heal (rules, policy, healers); built in start() unless a caller set one first.
        self.healing: Healing | None = None
        self.routes = Routes()
        self.routes.add("GET", "/metrics", metrics_handler(self.registry), inline=True, lane=True)
        self.routes.add("GET", "/healthz", self._healthz, inline=True)
        self.routes.add("GET", "/status", self._status)
        self.routes.add("GET", "/", self._landing)
        self._commands: queue.SimpleQueue[str] = queue.SimpleQueue()
        # Replaced as a whole on reload, so /status never sees a half-built set.
        self._runtime = _Runtime()
        self._http: HttpServer | None = None
        self._reload_lock = threading.Lock()
        self._reloads = {"success": 0, "failure": 0}
        self._last_reload: dict[str, Any] = {"at": self.started_at, "ok": True, "error": None}

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Listen, then start collecting; READY=1 goes to systemd after the first full round."""
        host, port = parse_listen(self.config.daemon.listen)
        try:
            self._http = HttpServer(host, port, self.routes, store=self.store, limits=self.config.daemon.http)
        except OSError as exc:
            raise TrainwardenError(
                f"cannot listen on {self.config.daemon.listen}: {exc.strerror or exc}"
            ) from exc
        self._http.start()
        bound_host, bound_port = self._http.address
        log.info(
            "trainwarden %s listening on http://%s:%d (config: %s)",
            __version__,
            f"[{bound_host}]" if ":" in bound_host else bound_host,
            bound_port,
            self.config.source,
        )
        _prepare_dirs(self.config)
        self._publish_daemon_series()
        self._install_healing()
        from trainwarden.daemon.goodput import install_goodput  # noqa: PLC0415 - keeps `import app` light

        install_goodput(self)  # after the healing (its outcomes), before the collectors (their records)
        self._start_collectors()

    def current_collectors(self) -> tuple[Collector, ...]:
        """The collectors of the configuration running now (a reload replaces them)."""
        return self._runtime.collectors

    def _install_healing(self) -> None:
        """Rules and policy on a scheduler job; a config error stops the start, a broken journal does not."""
        from trainwarden.daemon.healing import Healing  # noqa: PLC0415 - keeps `import app` light

        try:
            if self.healing is None:
                self.healing = Healing(self)
            self.healing.install(self)
            from trainwarden.daemon.webhook import install_webhook  # noqa: PLC0415 - needs the healing

            install_webhook(self, self.healing)  # POST /api/v1/alerts feeds the same policy
        except ConfigError:
            raise
        except (OSError, TrainwardenError) as exc:
            log.error("detect-and-heal disabled: %s", exc)  # noqa: TRY400 - a clear message, no traceback

    def run(self) -> int:
        """Start, then serve until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit status.

        Raises `TrainwardenError` when it cannot start (e.g. the port is taken), after undoing
        whatever had started; the previous signal handlers are restored either way.
        """
        wanted: dict[signal.Signals, Callable[[int, FrameType | None], None]] = {
            signal.SIGTERM: self._on_stop_signal,
            signal.SIGINT: self._on_stop_signal,
            signal.SIGHUP: self._on_hup,
        }
        previous = {signum: signal.signal(signum, handler) for signum, handler in wanted.items()}
        try:
            self.start()
            while True:
                try:
                    command = self._commands.get(timeout=1.0)
                except queue.Empty:
                    continue
                if command == "stop":
                    break
                if command == "reload":
                    self.reload()
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 0

    def request_stop(self) -> None:
        """Ask the main loop to stop (safe from signal handlers and other threads)."""
        self._commands.put("stop")

    def request_reload(self) -> None:
        """Ask the main loop to reload the config."""
        self._commands.put("reload")

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        self.request_stop()

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.request_reload()

    def stop(self) -> None:
        """Stop collecting and serving; collectors close their resources."""
        self.notifier.stopping()
        self._stop_collectors()
        for hook in self.stop_hooks:
            try:
                hook()
            except Exception:
                log.exception("a stop hook failed")
        if self._http is not None:
            self._http.stop()
            self._http = None
        self.notifier.close()
        log.info("stopped")

    @property
    def address(self) -> tuple[str, int]:
        """Where HTTP is served (the real port when 0 was configured)."""
        if self._http is None:
            raise TrainwardenError("the daemon is not serving")
        return self._http.address

    # --- collectors -------------------------------------------------------------------------

    def _start_collectors(self) -> None:
        config = self.config
        context = CollectorContext(
            paths=config.paths.host_paths(),
            runtime_dir=config.daemon.runtime_dir,
            state_dir=config.daemon.state_dir,
            clock=self.clock,
            pid_owners=self.pid_owners,
            record_listeners=tuple(self.record_listeners),
        )
        collectors: list[Collector] = []
        unavailable: dict[str, str] = {}
        disabled: list[str] = []
        for name, cls in collector_classes().items():
            options = config.plugin("collectors", name)
            assert isinstance(options, CollectorOptions)
            if not options.enabled:
                disabled.append(name)
                continue
            try:
                collector = cls(options, context)
                collector.start()
            except CollectorUnavailableError as exc:
                log.info("collector %s disabled: %s", name, exc)
                unavailable[name] = f"unavailable: {exc}"
                continue
            except Exception as exc:
                log.exception("collector %s failed to start; disabled", name)
                unavailable[name] = f"failed to start: {type(exc).__name__}: {exc}"
                continue
            collectors.append(collector)
        jobs = list(self.extra_jobs)
        interval = self.notifier.ping_interval()
        if interval is not None:
            jobs.append(ExtraJob("systemd-watchdog", self._watchdog_ping, interval))
        scheduler = CollectorScheduler(
            self.store,
            collectors,
            unavailable=unavailable,
            extra_jobs=jobs,
            clock=self.clock,
            on_first_round=self._on_first_round,
        )
        self._runtime = _Runtime(scheduler, tuple(collectors), tuple(disabled))
        scheduler.start()

    def _stop_collectors(self) -> None:
        """Stop the scheduler and close collectors; `_runtime` stays readable until replaced."""
        runtime = self._runtime
        if runtime.scheduler is not None:
            runtime.scheduler.stop()
        for collector in runtime.collectors:
            try:
                collector.close()
            except Exception:
                log.exception("collector %s failed to close", collector.name)

    def _on_first_round(self) -> None:
        if self.ready.is_set():
            return
        self.ready.set()
        self._publish_daemon_series()
        count = len(self.store.latest())
        log.info("first collection done: %d series; ready", count)
        self.notifier.ready(status=f"serving {count} series")

    def _watchdog_ping(self) -> None:
        """Runs as a scheduler job, so a wedged scheduler (or a dead HTTP thread) stops the pings.

        Nothing is sent before READY=1: systemd's watchdog only starts once startup is over.
        """
        if self.ready.is_set() and self._http is not None and self._http.alive:
            self.notifier.watchdog()

    # --- reload -----------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config file and apply every section of it, or none. True if applied.

        The new file goes through the same validation as start-up (`load`); then the rules, the
        policy and the healers it asks for are built before anything running is touched. Any
        failure keeps the running config whole, counts a failed reload and says why in the log.
        """
        with self._reload_lock:
            self.notifier.reloading()
            try:
                self._apply(load(self.config_path, self.overrides))
            except ConfigError as exc:
                return self._reject(str(exc))
            except Exception as exc:  # a part that cannot be built must not take monitoring down
                log.exception("config reload could not be applied")
                return self._reject(f"cannot apply: {type(exc).__name__}: {exc}")
            self._record_reload(ok=True, error=None)
            log.info(
                "config reloaded from %s: %d collector(s) running, actions %s",
                self.config.source,
                len(self._runtime.collectors),
                "enabled" if self.config.policy.actions_enabled else "disabled (dry run)",
            )
            self.notifier.ready(status="config reloaded")
            return True

    def _apply(self, new: Config) -> None:
        """Swap in `new`: collectors restarted, then rules, policy and healers; the old stays on failure."""
        for key in RESTART_ONLY:
            if getattr(new.daemon, key) != getattr(self.config.daemon, key):
                log.warning("daemon.%s changed; it takes effect only after a restart", key)
        if new.webhook != self.config.webhook:  # the receiver holds its token and limits from the start
            log.warning("[webhook] changed; it takes effect only after a restart")
        new = dataclasses.replace(
            new,
            daemon=dataclasses.replace(
                new.daemon, **{key: getattr(self.config.daemon, key) for key in RESTART_ONLY}
            ),
            webhook=self.config.webhook,
        )
        healing = self.healing
        parts = healing.prepare(new) if healing is not None else None
        old_parts = healing.parts() if healing is not None else None
        old, old_names = self.config, {c.name for c in self._runtime.collectors}
        self._stop_collectors()  # the detect-and-heal tick is a scheduler job: no new one starts now
        wanted = {name for name in collector_classes() if new.plugin("collectors", name).enabled}
        for name in old_names - wanted:  # before restarting, so no scrape sees them afterwards
            self.store.drop_source(name)
        self.config = new
        if healing is not None and parts is not None:
            healing.apply(parts)  # before the first tick of the new scheduler
        try:
            self._start_collectors()
        except Exception:
            self._stop_collectors()
            self.config = old
            if healing is not None and old_parts is not None:
                healing.apply(old_parts)
            self._start_collectors()
            raise
        logging.getLogger("trainwarden").setLevel(new.daemon.log_level.upper())

    def _reject(self, why: str) -> bool:
        log.error("config reload rejected, keeping the running config: %s", why)
        self._record_reload(ok=False, error=why)
        self.notifier.ready(status="config reload rejected; running the previous config")
        return False

    def _record_reload(self, *, ok: bool, error: str | None) -> None:
        self._reloads["success" if ok else "failure"] += 1
        self._last_reload = {"at": self.clock(), "ok": ok, "error": error}
        self._publish_daemon_series()

    def _publish_daemon_series(self) -> None:
        last_ok = self._last_reload["ok"]
        samples = [
            READY.sample(1.0 if self.ready.is_set() else 0.0),
            RELOAD_OK.sample(1.0 if last_ok else 0.0),
            *(RELOADS.sample(n, result=r) for r, n in self._reloads.items()),
        ]
        if last_ok:
            samples.append(RELOAD_TIME.sample(self._last_reload["at"]))
        else:
            prior = self.store.value(RELOAD_TIME.name)
            if prior is not None:
                samples.append(RELOAD_TIME.sample(prior))
        self.store.replace(SOURCE, samples, self.clock())

    # --- HTTP handlers ----------------------------------------------------------------------

    def _healthz(self, _request: Request) -> Response:
        if self.ready.is_set():
            return Response.text("ok\n")
        return Response.text("starting: first collection not finished\n", 503)

    def status(self) -> dict[str, Any]:
        """Everything `trainwarden status` shows, as JSON-able data."""
        now = self.clock()
        runtime = self._runtime
        collectors: dict[str, Any] = runtime.scheduler.status() if runtime.scheduler is not None else {}
        for collector in runtime.collectors:
            try:
                detail = dict(collector.status())
            except Exception as exc:
                detail = {"error": f"status() failed: {type(exc).__name__}: {exc}"}
            if detail:
                collectors.setdefault(collector.name, {})["detail"] = detail
        for name in runtime.disabled:
            collectors[name] = {"state": "disabled"}
        data: dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime_seconds": round(now - self.started_at, 3),
            "ready": self.ready.is_set(),
            "listen": self.config.daemon.listen,
            "config": {"source": self.config.source, "last_reload": dict(self._last_reload)},
            "paths": {
                "procfs": str(self.config.paths.procfs),
                "sysfs": str(self.config.paths.sysfs),
                "runtime_dir": str(self.config.daemon.runtime_dir),
                "state_dir": str(self.config.daemon.state_dir),
            },
            "series": len(self.store.latest()),
            "collectors": collectors,
        }
        for name, section in self.status_sections.items():
            try:
                data[name] = section()
            except Exception as exc:
                data[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return data

    def _status(self, _request: Request) -> Response:
        return Response.json(self.status())

    def _landing(self, _request: Request) -> Response:
        links = "".join(
            f'<li><a href="{html.escape(p)}">{html.escape(p)}</a></li>' for p in self.routes.paths()
        )
        page = (
            "<!doctype html><html><head><title>trainwarden</title></head><body>"
            f"<h1>trainwarden {html.escape(__version__)}</h1>"
            "<p>Monitoring and self-healing for PyTorch training jobs on this node.</p>"
            f"<ul>{links}</ul></body></html>\n"
        )
        return Response(200, page.encode(), "text/html; charset=utf-8")


def _prepare_dirs(config: Config) -> None:
    """Create the runtime and state directories; features that need them report their own errors."""
    for what, path in (("runtime_dir", config.daemon.runtime_dir), ("state_dir", config.daemon.state_dir)):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning(
                "daemon.%s %s is not usable (%s); pass --%s or set it in the config",
                what,
                path,
                exc.strerror or exc,
                what.replace("_", "-"),
            )

"""Per-step cost of the Lightning and Hugging Face callbacks, as a ratio of the same step without them.

One process on CPU, a ~250 k-parameter MLP (256 -> 512 -> 256 -> 16, batch 64), AdamW. The reporter
talks to a real Unix stream socket whose reader discards everything (a daemon that keeps up), and
the control file exists, so every step pays for what it would under `trainwarden run`: the step
record, the control-file stat, the boundary decision.

For each framework, runs alternate (so a change of the machine's load hits every variant alike):

- **bare**: the framework's own loop, its own clipping off;
- **callback, clip=False**: plus `TrainwardenCallback(clip=False)` (reporting, phases, requests);
- **bare + own clipping**: the framework clipping at 1.0 (`gradient_clip_val` / `max_grad_norm`);
- **callback, clip=True**: the callback's adaptive clipping instead of the framework's.

Three measures, because wall time on a shared, loaded machine carries more noise than 1 %:

- **wall**: the median interval between consecutive step-end hooks after a warm-up, per run;
- **CPU**: the process's CPU time per step after the warm-up (`time.process_time`, every thread:
  the reporter's sender thread is in it, as it should be), which another process's load barely
  moves; the ratio callback / bare is taken per round (runs side by side), then the median;
- **in the hooks**: each per-step hook of the callback instance wrapped in a timer, wall
  (`perf_counter`) and the main thread's CPU (`thread_time`: not inflated by preemption), net of
  the timer's own cost (timed on a no-op at start), shown as a share of the bare step's CPU time.

Each value is the median over rounds. Target (issue 13): <= 1 % of a bare step.

With ``--against REV`` the same variants run on the client code of commit REV too (``git archive``
of ``src/trainwarden``, first on a worker's ``PYTHONPATH``), side by side in the same rounds: two
worker processes, one per code (``--code REV`` or ``--code DIR`` for the new side, default the
working tree's ``src``), each run's callback compared with the bare run of its own worker. The
discarding socket reader then lives in the parent, so the workers' CPU time no longer includes it.
Run::

    .venv/bin/python bench/integrations_overhead.py                # prints a Markdown table
    .venv/bin/python bench/integrations_overhead.py --rounds 7 --steps 400
    .venv/bin/python bench/integrations_overhead.py --against HEAD~3 --frameworks lightning
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainwarden.control import ControlState, control_path, write_control

REPO = Path(__file__).resolve().parent.parent
WARMUP = 30
TIMER_FLOOR = (0.0, 0.0)
"""The hook timer's own cost per timed call (wall, CPU), measured once at start and subtracted."""
BATCH, IN, OUT = 64, 256, 16


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, OUT))


def make_data(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(steps, BATCH, IN, generator=generator), torch.randint(
        0, OUT, (steps, BATCH), generator=generator
    )


STEP_HOOKS = (
    "on_before_optimizer_step",  # Lightning
    "on_train_batch_end",
    "on_pre_optimizer_step",  # transformers
    "on_optimizer_step",
    "on_step_end",
    "on_log",
)


class HookTimer:
    """Wraps the per-step hooks of one callback instance; adds up their time once the warm-up is over."""

    def __init__(self, callback: Any) -> None:
        self.seconds = 0.0  # wall
        self.cpu = 0.0  # this thread's CPU time
        self.calls = 0
        self.armed = False  # set after WARMUP steps: set-up and first-call costs are not per-step costs
        for name in STEP_HOOKS:
            if hasattr(callback, name):
                setattr(callback, name, self._timed(getattr(callback, name)))

    @staticmethod
    def floor(calls: int = 2000) -> tuple[float, float]:
        """What the timer itself adds to one timed call (wall, CPU): a clock read costs microseconds
        on a VM (``thread_time`` is a system call), which would otherwise count as the callback's."""
        timer = HookTimer(None)
        timer.armed = True
        noop = timer._timed(lambda: None)
        for _ in range(calls):
            noop()
        return timer.seconds / calls, timer.cpu / calls

    def _timed(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return hook(*args, **kwargs)
            finally:
                if self.armed:
                    self.cpu += time.thread_time() - cpu
                    self.seconds += time.perf_counter() - started
                    self.calls += 1

        return timed


class Stamps:
    """Wall and process CPU time at each step end; a run's result once it is over."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.timer: HookTimer | None = None
        self.empty: HookTimer | None = None  # the same hooks of a callback that does nothing

    def stamp(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if len(self.wall) == WARMUP:
            for timer in (self.timer, self.empty):
                if timer is not None:
                    timer.armed = True

    def result(self) -> Result:
        deltas = [b - a for a, b in zip(self.wall[WARMUP:], self.wall[WARMUP + 1 :], strict=False)]
        steps = len(self.cpu) - WARMUP
        cpu = (self.cpu[-1] - self.cpu[WARMUP - 1]) / steps
        return Result(
            statistics.median(deltas), cpu, *_per_step(self.timer, steps), *_per_step(self.empty, steps)
        )


def _per_step(timer: HookTimer | None, steps: int) -> tuple[float, float]:
    """(wall, CPU) a step in the timed hooks, net of the timer's own cost measured at start."""
    if timer is None:
        return 0.0, 0.0
    wall, cpu = TIMER_FLOOR
    return (timer.seconds - timer.calls * wall) / steps, (timer.cpu - timer.calls * cpu) / steps


@dataclasses.dataclass(frozen=True)
class Result:
    """One run: median wall step, CPU per step, hook wall and CPU per step, and the empty hooks' (s)."""

    wall: float
    cpu: float
    hooks_wall: float
    hooks_cpu: float
    empty_wall: float = 0.0
    empty_cpu: float = 0.0


# --- a daemon that reads and discards -----------------------------------------------------------------


def start_sink(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.fspath(path))
    server.listen(8)

    def drain(conn: socket.socket) -> None:
        with conn:
            while conn.recv(65536):
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=drain, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


# --- Lightning ----------------------------------------------------------------------------------------


def lightning_run(steps: int, *, callback: bool, clip: bool) -> Result:
    import lightning.pytorch as pl  # noqa: PLC0415

    from trainwarden.integrations.lightning import TrainwardenCallback  # noqa: PLC0415

    x, y = make_data(steps)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def training_step(self, batch: Any, _batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    stamps = Stamps()

    class Stamp(pl.Callback):
        def on_train_batch_end(self, *_: Any) -> None:
            stamps.stamp()

    callbacks: list[pl.Callback] = [Stamp()]
    if callback:
        warden, empty = TrainwardenCallback(clip=clip), pl.Callback()
        stamps.timer, stamps.empty = HookTimer(warden), HookTimer(empty)
        callbacks[:0] = [warden, empty]  # the empty hooks right after ours: no colder than they are
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        gradient_clip_val=1.0 if clip and not callback else None,
        callbacks=callbacks,
    )

    class Batches:  # an iterable, not a list: Lightning reads a list as several loaders
        def __len__(self) -> int:
            return steps

        def __iter__(self) -> Any:
            return zip(x, y, strict=True)

    trainer.fit(Module(), Batches())
    return stamps.result()


# --- Hugging Face Trainer -----------------------------------------------------------------------------


def hf_run(steps: int, *, callback: bool, clip: bool) -> Result:
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: PLC0415

    from trainwarden.integrations.transformers import TrainwardenCallback  # noqa: PLC0415

    x, y = make_data(steps)

    class Samples(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return steps * BATCH

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": x.view(-1, IN)[i], "labels": y.view(-1)[i]}

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": nn.functional.cross_entropy(self.net(x), labels)}

    stamps = Stamps()

    class Stamp(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *_: Any, **__: Any) -> None:
            stamps.stamp()

    callbacks: list[Any] = [Stamp()]
    if callback:
        warden, empty = TrainwardenCallback(clip=clip), TrainerCallback()
        stamps.timer, stamps.empty = HookTimer(warden), HookTimer(empty)
        callbacks[:0] = [warden, empty]  # the empty hooks right after ours: no colder than they are
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=BATCH,
            max_grad_norm=1.0 if clip and not callback else 0.0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=Model(), args=args, train_dataset=Samples(), callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # prints every step's logs: noise in both variants
        trainer.train()
    return stamps.result()


BASE = {False: "bare", True: "bare + own clipping"}
"""What each variant is compared with: the framework without the callback, clipping alike."""

VARIANTS = [
    ("bare", False, False),
    ("callback, clip=False", True, False),
    ("bare + own clipping", False, True),
    ("callback, clip=True", True, True),
]


def measure(run: Callable[..., Result], steps: int, rounds: int) -> dict[str, dict[str, float]]:
    """variant -> medians over rounds of each `Result` field, and of the per-round CPU ratio to its base."""
    runs: dict[str, list[Result]] = {name: [] for name, _, _ in VARIANTS}
    for _ in range(rounds):
        for name, callback, clip in VARIANTS:
            runs[name].append(run(steps, callback=callback, clip=clip))
    return summarize(runs)


# --- old code side by side (--against) ----------------------------------------------------------


def code_of(rev: str, into: Path) -> Path:
    """The ``src`` directory of `rev`'s client code, extracted under `into` (for ``PYTHONPATH``)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, "src/trainwarden"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


class Worker:
    """A process running this script with ``--worker`` on the code under `src`: one run per request."""

    def __init__(self, src: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        hello = self._answer()
        self.source, self.floor = hello["source"], (hello["floor_wall"], hello["floor_cpu"])

    def run(self, framework: str, steps: int, *, callback: bool, clip: bool) -> Result:
        """One run of one variant in the worker."""
        assert self.process.stdin is not None
        request = {"framework": framework, "steps": steps, "callback": callback, "clip": clip}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return Result(**self._answer())

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        for line in self.process.stdout:  # the frameworks may print too: answers are marked
            if line.startswith("RESULT "):
                answer: dict[str, Any] = json.loads(line[len("RESULT ") :])
                return answer
        raise RuntimeError(f"worker exited with status {self.process.wait()}")

    def close(self) -> None:
        """End the worker (its stdin closed)."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


def worker() -> int:
    """``--worker``: set up as `main` does, then answer run requests on stdin until it closes."""
    import trainwarden  # noqa: PLC0415

    global TIMER_FLOOR  # noqa: PLW0603 - measured once, read by every run
    _quiet_frameworks()
    TIMER_FLOOR = HookTimer.floor()
    hello = {"source": str(Path(trainwarden.__file__).parent), "floor_wall": TIMER_FLOOR[0]}
    print("RESULT " + json.dumps({**hello, "floor_cpu": TIMER_FLOOR[1]}), flush=True)
    runs = {"lightning": lightning_run, "transformers": hf_run}
    for line in sys.stdin:
        request = json.loads(line)
        result = runs[request["framework"]](
            request["steps"], callback=request["callback"], clip=request["clip"]
        )
        print("RESULT " + json.dumps(dataclasses.asdict(result)), flush=True)
    return 0


def _quiet_frameworks() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging  # noqa: PLC0415

    logging.disable(logging.WARNING)  # the frameworks' banners; a failure still raises


def _print_header(codes: bool) -> None:
    code = " code |" if codes else ""
    print(
        f"| framework |{code} variant | wall step | CPU step | CPU ratio | wall ratio "
        "| in hooks (wall) | in hooks (CPU) | hooks CPU / bare CPU step "
        "| empty hooks (CPU) | net CPU / bare CPU step |"
    )
    print("| --- |" + (" --- |" if codes else "") + " --- |" + " ---: |" * 9)


def _print_rows(framework: str, result: dict[str, dict[str, float]], code: str | None = None) -> None:
    for name, callback, clip in VARIANTS:
        r = result[name]
        base = result[BASE[clip]]
        cells = ["", "", "", "", "", "", ""]
        if callback:
            cells = [
                f"{r['cpu_ratio']:.3f}",
                f"{r['wall_ratio']:.3f}",
                f"{r['hooks_wall'] * 1e6:.0f} µs",
                f"{r['hooks_cpu'] * 1e6:.0f} µs",
                f"{r['hooks_cpu'] / base['cpu']:.2%}",
                f"{r['empty_cpu'] * 1e6:.0f} µs",
                f"{r['net_cpu'] / base['cpu']:.2%}",
            ]
        column = "" if code is None else f" {code} |"
        print(
            f"| {framework} |{column} {name} | {r['wall'] * 1e3:.2f} ms | {r['cpu'] * 1e3:.2f} ms | "
            + " | ".join(cells)
            + " |"
        )


def summarize(runs: dict[str, list[Result]]) -> dict[str, dict[str, float]]:
    """variant -> medians over rounds of each `Result` field, and of the per-round ratios to its base."""
    out: dict[str, dict[str, float]] = {}
    for name, _callback, clip in VARIANTS:
        base = runs[BASE[clip]]
        out[name] = {
            field.name: statistics.median(getattr(r, field.name) for r in runs[name])
            for field in dataclasses.fields(Result)
        }
        out[name]["cpu_ratio"] = statistics.median(
            r.cpu / b.cpu for r, b in zip(runs[name], base, strict=True)
        )
        out[name]["wall_ratio"] = statistics.median(
            r.wall / b.wall for r, b in zip(runs[name], base, strict=True)
        )
        out[name]["net_cpu"] = statistics.median(r.hooks_cpu - r.empty_cpu for r in runs[name])
    return out


def against(args: argparse.Namespace) -> None:
    """Every variant on both codes, run by run alternating between the two workers."""
    with tempfile.TemporaryDirectory() as trees:
        new_src = REPO / "src"
        if args.code is not None:  # a commit, or a directory holding a `trainwarden` package
            new_src = Path(args.code) if Path(args.code).is_dir() else code_of(args.code, Path(trees) / "new")
        labels = ("working tree" if args.code is None else args.code, args.against)
        workers = [Worker(new_src), Worker(code_of(args.against, Path(trees) / "old"))]
        for label, each in zip(labels, workers, strict=True):
            wall, cpu = each.floor
            print(f"{label}: {each.source} (hook timer's own cost, subtracted: {wall * 1e6:.1f} µs wall, "
                  f"{cpu * 1e6:.1f} µs CPU a call)")  # fmt: skip
        print()
        _print_header(codes=True)
        summaries: list[tuple[str, dict[str, dict[str, float]], dict[str, dict[str, float]]]] = []
        try:
            for framework in args.frameworks.split(","):
                runs: list[dict[str, list[Result]]] = [{name: [] for name, _, _ in VARIANTS} for _ in workers]
                for _ in range(args.rounds):
                    for name, callback, clip in VARIANTS:
                        for each, into in zip(workers, runs, strict=True):
                            into[name].append(each.run(framework, args.steps, callback=callback, clip=clip))
                results = [summarize(r) for r in runs]
                for label, result in zip(labels, results, strict=True):
                    _print_rows(framework, result, label)
                summaries.append((framework, results[0], results[1]))
        finally:
            for each in workers:
                each.close()
    print()
    for framework, new, old in summaries:
        for name in ("callback, clip=False", "callback, clip=True"):
            n, o = new[name]["hooks_cpu"], old[name]["hooks_cpu"]
            nn, on = new[name]["net_cpu"], old[name]["net_cpu"]
            print(f"{framework}, {name}: in-hook CPU {o * 1e6:.0f} µs ({labels[1]}) -> {n * 1e6:.0f} µs "
                  f"({labels[0]}), {n / o:.2f}x; CPU ratio {old[name]['cpu_ratio']:.3f} -> "
                  f"{new[name]['cpu_ratio']:.3f}; net of the empty hooks "
                  f"{on * 1e6:.0f} -> {nn * 1e6:.0f} µs")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frameworks", default="lightning,transformers")
    parser.add_argument("--against", default=None, help="also run every variant on this commit's client code")
    parser.add_argument(
        "--code",
        default=None,
        help="with --against: the new side's commit or src directory (default: the working tree)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()
    _quiet_frameworks()

    global TIMER_FLOOR  # noqa: PLW0603 - measured once, read by every run
    TIMER_FLOOR = HookTimer.floor()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start_sink(root / "client.sock")
        os.environ.update(
            TRAINWARDEN_SOCKET=str(root / "client.sock"),
            TRAINWARDEN_CONTROL_DIR=str(root / "control"),
            TRAINWARDEN_JOB="bench",
        )
        (root / "control").mkdir()
        write_control(control_path(root / "control", "bench"), ControlState(job="bench"))
        print(f"{args.rounds} rounds x {args.steps} steps, medians after {WARMUP} warm-up steps")
        if args.against is not None:
            against(args)
            return 0
        runs = {"lightning": lightning_run, "transformers": hf_run}
        wall, cpu = TIMER_FLOOR
        print(f"hook timer's own cost, subtracted: {wall * 1e6:.1f} µs wall, {cpu * 1e6:.1f} µs CPU a call")
        print()
        _print_header(codes=False)
        for framework in args.frameworks.split(","):
            _print_rows(framework, measure(runs[framework], args.steps, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

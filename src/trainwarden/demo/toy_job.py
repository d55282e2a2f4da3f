r"""A tiny CPU training job that uses the whole trainwarden client: reporting, clipping, checkpoints.

It ships in the package so `trainwarden demo` works after a plain `pip install trainwarden[torch]`.
Run it under torchrun with two ranks (gloo, DDP)::

    python -m torch.distributed.run --nproc-per-node 2 --master-port 29611 \
        -m trainwarden.demo.toy_job --steps 60 --ckpt-dir /tmp/toy-ckpt --ckpt-every 10 --out /tmp/toy-out

Kill it at any moment and start the same command again: it resumes from the newest valid
checkpoint and ends with parameters bit-identical to an uninterrupted run (`--out` writes
`final.pt` and `final.sha256`). Send SIGUSR1 or SIGTERM to any rank (or write a stop request into
the control file) and it checkpoints at the next step boundary and exits with status 75.

The data is synthetic and deterministic: a fixed pool of samples, reshuffled each epoch from the
seed; each rank reads its own slice. The batch index is the step (batch = f(seed, epoch, index)),
as docs/CLIENT.md asks, so a checkpoint, a skip and a rollback all name batches by step. The batch
augmentation draws from Python's, NumPy's and torch's global generators (and the model uses
dropout) so an exact resume really depends on the RNG states being restored.

A checkpoint is written only while the parameters are finite, so after a NaN the newest valid
checkpoint is a healthy state. Batch ranges in the control file's `skip_batches` (read once at
start: the daemon writes them before it restarts the job, and every rank then skips the same
steps) are not trained on, as PaLM did around loss spikes.

With `--rollback-every N` the loop is the client's rollback loop (`Snapshotter`: a snapshot in
host memory every N steps, the reporter advertising the capability): a non-finite loss or
grad-norm on any rank, or the daemon's rollback request, rolls every rank back in place to the
last good snapshot and skips the first bad batch, without a restart (rank 0 prints ``ROLLBACK
<at> <to> <skipped>``). The skipped batches are saved with each checkpoint. Off by default.
`--spike-check` adds the Snapshotter's job-side loss-spike check (`SpikeCheck`, warm-up
`--spike-warmup` steps): a finite loss far above its trend is rolled back the same way.

Fault injection for end-to-end tests and the demo (all off by default): `--crash-at-step`,
`--hang-at-step`, `--nan-at-step`, `--spike-at-step` on `--fault-rank`, or any number of
`--fault KIND@STEP[:RANK]` (a spike scales the batch by `--spike-scale`, 1000; with `--clip none`
nothing absorbs it: AdamW's moments take the huge gradient and training slows for the rest of the
run); and `--ckpt-write-delay` (pause inside every checkpoint write, after the shards and before
the manifest, printing ``CKPT_WRITING <step>``). With `--fault-once DIR`
each fault fires at most once across restarts (a marker file per fault, written just before it
fires, holds when it fired), so a resumed job does not meet the same fault forever. `--events
FILE` appends one JSON line per step (rank 0), resume, skip and fault, with wall-clock times, for
the demo's summary and bench/healing.py.
"""
# Over 450 lines (issue 15): the demo's training script, meant to be read top to bottom as one file by a
# newcomer learning the client from it.

# The data augmentation draws from NumPy's legacy global generator on purpose: exact resume must restore it.
# Its augmentation is not crypto (S311).
# ruff: noqa: NPY002, S311

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._dynamo  # see IMPORTED_AT
import torch.distributed as dist
from torch import nn
from torch._C._distributed_c10d import PrefixStore, TCPStore

from trainwarden.client.checkpoint import CheckpointManager, ModelOptimizerState
from trainwarden.client.clipping import AdaptiveClipper
from trainwarden.client.identity import restart_count_from_env
from trainwarden.client.interrupt import PlannedInterrupt
from trainwarden.client.snapshot import Snapshotter
from trainwarden.client.spike_check import SpikeCheck
from trainwarden.control import ClipSettings, ControlState

log = logging.getLogger("train_toy")
# torch and the client imported: the first start-up stage a restart measures. torch._dynamo is
# imported with them: torch.optim's first optimizer imports it lazily (seconds, under load), which
# would otherwise count as checkpoint loading.
IMPORTED_AT = time.time()

IN_FEATURES = 16
CLASSES = 4
POOL = 512
FAULT_KINDS = ("crash", "hang", "nan", "spike")


@dataclass(frozen=True)
class Fault:
    """One scripted fault: what happens, at which step, on which rank."""

    kind: str
    step: int
    rank: int

    @property
    def marker(self) -> str:
        """File name of its fired-once marker."""
        return f"{self.kind}-{self.step}-r{self.rank}.fired"


def parse_fault(text: str) -> Fault:
    """`KIND@STEP[:RANK]`, e.g. `hang@40:1` (rank 0 when omitted)."""
    kind, sep, rest = text.partition("@")
    step_text, _, rank_text = rest.partition(":")
    if not sep or kind not in FAULT_KINDS or not step_text.isdigit() or not (rank_text or "0").isdigit():
        raise argparse.ArgumentTypeError(
            f"fault {text!r}: expected KIND@STEP[:RANK] with KIND one of {', '.join(FAULT_KINDS)}"
        )
    return Fault(kind, int(step_text), int(rank_text or "0"))


class Faults:
    """The faults of this rank, each firing at most once when a marker directory is given."""

    def __init__(self, faults: list[Fault], rank: int, once_dir: Path | None, events: EventLog) -> None:
        self.by_step: dict[tuple[str, int], Fault] = {(f.kind, f.step): f for f in faults if f.rank == rank}
        self.once_dir = once_dir
        self.events = events
        if once_dir is not None:
            once_dir.mkdir(parents=True, exist_ok=True)

    def fires(self, kind: str, step: int) -> bool:
        """True when `kind` is scripted here at `step` and has not fired before; marks it fired."""
        fault = self.by_step.get((kind, step))
        if fault is None:
            return False
        now = time.time()
        if self.once_dir is not None:
            marker = self.once_dir / fault.marker
            try:
                with marker.open("x", encoding="utf-8") as handle:
                    json.dump({"kind": kind, "step": step, "rank": fault.rank, "time": now}, handle)
            except FileExistsError:
                return False
        self.events.write("fault", step=step, kind=kind, rank=fault.rank, time=now)
        return True


class EventLog:
    """Appends JSON lines (one `write` each, O_APPEND, so ranks do not interleave within a line)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, event: str, **fields: Any) -> None:
        """One record, with the wall-clock time unless given."""
        if self.fd is None:
            return
        record = {"event": event, "time": time.time(), "pid": os.getpid(), **fields}
        os.write(self.fd, (json.dumps(record) + "\n").encode())


class SyntheticData:
    """Deterministic batches: a fixed pool, an epoch-seeded shuffle, one slice per rank.

    The batch of step s is a function of the seed and s alone (epoch s // per_epoch, index
    s % per_epoch): nothing to restore on resume or after a rollback but the step.
    """

    def __init__(self, seed: int, rank: int, world: int, batch: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(POOL, IN_FEATURES, generator=gen)
        weights = torch.randn(IN_FEATURES, CLASSES, generator=gen)
        self.y = (self.x @ weights).argmax(dim=1)
        self.seed, self.rank, self.world, self.batch_size = seed, rank, world, batch
        self.per_epoch = POOL // (batch * world)
        self._epoch = -1
        self._order = torch.arange(POOL)

    def _shuffled(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:  # one shuffle per epoch, not per batch
            self._epoch = epoch
            self._order = torch.randperm(
                POOL, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)
            )
        return self._order

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of `step` on this rank (augmented from the global generators)."""
        epoch, index = divmod(step, self.per_epoch)
        start = (index * self.world + self.rank) * self.batch_size
        ids = self._shuffled(epoch)[start : start + self.batch_size]
        x = self.x[ids].clone()
        # Augmentation from the three global generators, so resume must restore all of them.
        x += torch.randn_like(x) * 0.05
        x += torch.from_numpy(np.random.normal(0.0, 0.05, size=tuple(x.shape)).astype(np.float32))
        if random.random() < 0.5:
            x = x.flip(0)
            return x, self.y[ids].flip(0)
        return x, self.y[ids]

    def position(self, next_step: int) -> dict[str, int]:
        """The data position before `next_step`, saved with each checkpoint (for a reader's sake)."""
        epoch, index = divmod(next_step, self.per_epoch)
        return {"next_batch": next_step, "epoch": epoch, "index": index}


def build_model(seed: int) -> nn.Module:
    """A small MLP with dropout (so resume depends on the RNG state)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 64),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, CLASSES),
    )


def params_sha256(model: nn.Module) -> str:
    """Digest of every parameter and buffer, to compare runs bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def params_finite(model: nn.Module) -> bool:
    """True when no parameter holds NaN/Inf (identical on every DDP rank, so all ranks agree)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def make_reporter(job: str, capabilities: tuple[str, ...] = ()) -> Any:
    """The daemon's reporter when the client module is there; an absent daemon is fine."""
    try:
        from trainwarden.client.reporter import Reporter  # noqa: PLC0415

        return Reporter.from_env(job=job, capabilities=capabilities)
    except Exception as exc:  # training goes on without a daemon
        log.warning("reporting disabled: %s", exc)
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The job's flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="per-rank batch size")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--job", default=os.environ.get("TRAINWARDEN_JOB", "toy"), help="job name for the daemon")
    p.add_argument("--ckpt-dir", type=Path, default=None, help="checkpoint root (resume from it if present)")
    p.add_argument("--ckpt-every", type=int, default=10, help="save every N steps (0: only on request)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument(
        "--local-dir", type=Path, default=None, help="node-local checkpoint tier (e.g. under /dev/shm)"
    )
    p.add_argument("--local-every", type=int, default=1, help="save the local tier every N steps")
    p.add_argument("--async-ckpt", action="store_true", help="write checkpoints on a background thread")
    p.add_argument("--clip", choices=["reciprocal", "zscore", "fixed", "none"], default="reciprocal")
    p.add_argument("--out", type=Path, default=None, help="write final.pt and final.sha256 here")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep per step")
    p.add_argument("--fault-rank", type=int, default=0, help="rank the --*-at-step faults apply to")
    p.add_argument("--crash-at-step", type=int, default=None, help="exit with status 1 at this step")
    p.add_argument("--hang-at-step", type=int, default=None, help="stop making progress at this step")
    p.add_argument("--nan-at-step", type=int, default=None, help="make the loss NaN at this step")
    p.add_argument("--spike-at-step", type=int, default=None, help="scale the batch at this step")
    p.add_argument("--spike-scale", type=float, default=1000.0, help="what a spike fault scales its batch by")
    p.add_argument(
        "--fault",
        type=parse_fault,
        action="append",
        default=[],
        metavar="KIND@STEP[:RANK]",
        help=f"scripted fault, repeatable; KIND: {', '.join(FAULT_KINDS)}",
    )
    p.add_argument("--fault-once", type=Path, default=None, metavar="DIR", help="fire each fault once")
    p.add_argument("--events", type=Path, default=None, metavar="FILE", help="append JSON events here")
    p.add_argument(
        "--pg-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="timeout of the gloo process group's collectives (default: torch's, 30 min for gloo)",
    )
    p.add_argument("--ckpt-write-delay", type=float, default=0.0, help="pause inside each checkpoint write")
    p.add_argument(
        "--rollback-every",
        type=int,
        default=0,
        metavar="N",
        help="in-place rollback: a snapshot every N steps (0: off, a NaN takes a restart)",
    )
    p.add_argument(
        "--spike-check",
        action="store_true",
        help="with --rollback-every: roll back a loss spike too (the Snapshotter's SpikeCheck)",
    )
    p.add_argument(
        "--spike-warmup", type=int, default=50, metavar="STEPS", help="the spike check's warm-up, in steps"
    )
    args = p.parse_args(argv)
    if args.spike_check and not args.rollback_every:
        p.error("--spike-check needs --rollback-every")
    return args


def scripted_faults(args: argparse.Namespace) -> list[Fault]:
    """Faults from the single-step flags (on --fault-rank) and every --fault."""
    faults = list(args.fault)
    for kind in FAULT_KINDS:
        step = getattr(args, f"{kind}_at_step")
        if step is not None:
            faults.append(Fault(kind, step, args.fault_rank))
    return faults


def say(line: str) -> None:
    """Print one protocol line (tests and the demo parse them) in a single write.

    print() may issue the text and its newline as two writes; two ranks sharing torchrun's pipe
    then interleave as "STOPPED 11 ...STOPPED 11 ...".
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def restart_count() -> int:
    """How often this job was restarted: the most any launcher says (torchrun's agent, Slurm, trainwarden)."""
    return restart_count_from_env()


def attempt_store(timeout: dt.timedelta | None) -> Any:
    """Under torchrun's own restarts (`--max-restarts`), a store prefixed by the attempt; else None.

    torchrun's workers share the agent's TCPStore, and with the static rendezvous the same store
    serves every attempt, so restarted gloo ranks read the dead attempt's addresses and fail with
    "connectFullMesh ... Connection refused" (torch 2.13). A prefix per restart count keeps attempts apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout or dt.timedelta(minutes=30),
    )
    return PrefixStore(
        f"/trainwarden-toy/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client
    )


def main(argv: list[str] | None = None) -> int:  # noqa: C901, PLR0912, PLR0915 - a training loop, read top to bottom
    """Train, checkpoint, resume; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"
    )
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed:
        timeout = None if args.pg_timeout is None else dt.timedelta(seconds=args.pg_timeout)
        store = attempt_store(timeout)
        if store is None:
            dist.init_process_group("gloo", timeout=timeout)
        else:
            rank_env, world_env = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group("gloo", timeout=timeout, store=store, rank=rank_env, world_size=world_env)
    rendezvous_at = time.time()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    events = EventLog(args.events)
    faults = Faults(scripted_faults(args), rank, args.fault_once, events)

    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    model = build_model(args.seed)
    torch.manual_seed(args.seed + 17 * rank)  # per-rank dropout and augmentation streams
    ddp: nn.Module = nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    data = SyntheticData(args.seed, rank, world, args.batch_size)
    clipper = None
    if args.clip != "none":
        clipper = AdaptiveClipper(model.parameters(), ClipSettings(warmup_steps=10), mode=args.clip)
    reporter = make_reporter(args.job, Snapshotter.CAPABILITIES if args.rollback_every else ())
    if reporter is not None:
        reporter.startup("imported", IMPORTED_AT)
        reporter.startup("rendezvous", rendezvous_at)
    guard = PlannedInterrupt((signal.SIGTERM, signal.SIGUSR1), reporter=reporter).install()
    # Read once, before the first step: every rank sees the file the daemon wrote before the restart.
    control: ControlState | None = reporter.poll_control() if reporter is not None else None

    def write_pause(tmp: Path) -> None:
        say(f"CKPT_WRITING {tmp.name}")
        time.sleep(args.ckpt_write_delay)

    snap = None
    if args.rollback_every:
        rolled: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        if clipper is not None:
            rolled["clipper"] = clipper
        spike = SpikeCheck(min_baseline_points=args.spike_warmup) if args.spike_check else None
        snap = Snapshotter(rolled, every=args.rollback_every, reporter=reporter, spike=spike)

    manager = None
    state: dict[str, Any] = {"train": ModelOptimizerState(model, optimizer), "scheduler": scheduler}
    start = 0
    if args.ckpt_dir is not None:
        manager = CheckpointManager(
            args.ckpt_dir,
            keep_last=args.keep,
            keep_best=1,
            async_save=args.async_ckpt,
            reporter=reporter,
            on_written=write_pause if args.ckpt_write_delay > 0 else None,
            # with a local tier, save() runs every step and each tier writes when it is due
            # (--ckpt-every 0: the durable tier only on request, never every step)
            durable_every=(args.ckpt_every if args.ckpt_every > 0 else 10**10) if args.local_dir else 1,
            local_dir=args.local_dir,
            local_every=args.local_every,
        )
        resume = manager.load_latest(state)
        if resume is not None:
            start = resume.step + 1
            if clipper is not None and "clipper" in resume.local:
                clipper.load_state_dict(resume.local["clipper"])
            if snap is not None and "snapshot" in resume.local:
                snap.load_state_dict(resume.local["snapshot"])  # skip the batches rolled back past
            guard.load_state_dict(resume.local.get("interrupt", {}))
            say(f"RESUMED {resume.step}")
    if clipper is not None and control is not None and control.clip is not None:
        clipper.update(control.clip)  # the daemon's settings win over the saved ones
    if reporter is not None:
        reporter.startup("checkpoint_loaded")
    if rank == 0:
        events.write("start", step=start, restart=restart_count(), world=world)

    def save(step: int, loss: float, *, durable: bool = False) -> None:
        assert manager is not None
        local = {"interrupt": guard.state_dict()}
        if clipper is not None:
            local["clipper"] = clipper.state_dict()
        if snap is not None:
            local["snapshot"] = snap.state_dict()
        began = time.time()
        manager.save(
            step, state, data_position=data.position(step + 1), local=local, metric=loss, durable=durable
        )
        if rank == 0:  # the blocking part, as the job itself saw it (the goodput test's outside view)
            events.write("checkpoint", step=step, seconds=time.time() - began)

    loss_fn = nn.CrossEntropyLoss()
    # With rollback, the Snapshotter's steps: it jumps back after a rollback and leaves skipped batches out.
    steps = snap.steps(start, args.steps) if snap is not None else range(start, args.steps)
    for step in steps:
        began = time.time()
        if faults.fires("crash", step):
            say(f"CRASH {step}")
            os._exit(1)
        if faults.fires("hang", step):
            say(f"HANG {step}")
            while True:
                time.sleep(3600)
        if control is not None and control.should_skip(step):
            # Not trained on, identically on every rank (the batch index is the step: nothing to draw).
            if rank == 0:
                say(f"SKIP {step}")
                events.write("skip", step=step)
            continue
        x, y = data.batch(step)
        if faults.fires("spike", step):
            x = x * args.spike_scale
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(x), y)
        if faults.fires("nan", step):
            loss = loss * float("nan")
        loss.backward()
        grad_norm = clipper.clip() if clipper is not None else None
        optimizer.step()
        scheduler.step()
        if reporter is not None:
            reporter.step(
                step,
                loss=loss.detach(),
                grad_norm=grad_norm,
                lr=scheduler.get_last_lr()[0],
                samples=args.batch_size * world,
            )
        loss_value = float(loss.item())
        if rank == 0:
            say(f"STEP {step} loss={loss_value:.6f}")
        if snap is not None and snap.after_step(step, loss=loss.detach(), grad_norm=grad_norm):
            last = snap.rollbacks[-1]
            if rank == 0:
                say(f"ROLLBACK {last.at_step} {last.next_step} {last.skipped}")
                events.write("step", step=step, loss=loss_value, seconds=time.time() - began)
                events.write("rollback", step=last.at_step, to=last.next_step, skipped=last.skipped)
            continue  # the loop goes on from the snapshot: this step's state is gone, never checkpointed
        boundary = guard.at_boundary(step)
        if clipper is not None and boundary.clip is not None:
            clipper.update(boundary.clip)  # agreed by both ranks: they clip alike from the same step
        periodic = args.local_dir is not None or (args.ckpt_every > 0 and (step + 1) % args.ckpt_every == 0)
        if manager is not None and (periodic or boundary.checkpoint):
            if params_finite(model):
                # with a local tier, a requested checkpoint goes to the durable one
                durable = args.local_dir is not None and boundary.checkpoint
                save(step, loss_value if math.isfinite(loss_value) else float("inf"), durable=durable)
            elif rank == 0:
                say(f"CKPT_REFUSED {step} non-finite parameters")
        if boundary.stop:
            if manager is not None:
                manager.wait()
            say(f"STOPPED {step} {boundary.reason}")
            if reporter is not None:
                reporter.close()
            guard.exit()
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if rank == 0:
            events.write("step", step=step, loss=loss_value, seconds=time.time() - began)

    if manager is not None:
        manager.close()
    if rank == 0 and args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.out / "final.pt")
        digest = params_sha256(model)
        (args.out / "final.sha256").write_text(digest + "\n", encoding="utf-8")
        (args.out / "final.json").write_text(
            json.dumps({"steps": args.steps, "sha256": digest}), encoding="utf-8"
        )
        say(f"FINAL {digest}")
    if rank == 0:
        events.write("done", step=args.steps)
    if reporter is not None:
        reporter.close()
    if distributed:
        # Tear down together: a rank destroying its gloo pairs while a peer is still busy (rank 0
        # writing the final parameters) can abort in gloo's destructor ("terminate called without
        # an active exception"), turning a finished job into a failed one.
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

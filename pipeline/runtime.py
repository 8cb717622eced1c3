"""The thin shell every stage process runs in: config, sockets, logs, heartbeats, control.

A stage is ``python -m pipeline.stage KIND --run-dir DIR --replica I``; it loads the stack
(``stack.json``) and ``endpoints.json`` from the run dir, builds a ``StageContext`` and
awaits the stage's ``run(ctx)`` coroutine (``stages/<kind>/main.py``), which holds the pure
stage logic and moves messages between ``ctx`` channels.

Invariants and failure behaviour:
- The context owns every socket it hands out and closes them all on exit.
- Logs are structlog JSON lines in ``<run>/logs/<kind>-<replica>.jsonl`` (plus warnings on
  stderr); every line carries ``stage`` and ``replica``.
- A heartbeat goes to the supervisor every second with the context's counters; its state is
  ``starting`` until the stage opens its first channel (engine and model built).
- When the stage opens its first channel, everything its start allocated (modules, the
  model) is collected once and frozen (``freeze_startup_heap``): the cyclic collector's full
  passes then skip it. Objects allocated later are collected as before.
- A stage started with ``WORKER_NICE_VAR`` = N > 0 lowers its priority to niceness N
  (``lower_priority``) when it opens its first channel: its imports and model build run at
  the priority it was started with, its work after that yields the CPU to the learner.
- An event loop held for ``LOOP_STALL_DUMP_S`` (so no heartbeats) gets every thread's stack
  written to the replica's ``.out`` log, once per stall, by faulthandler's own C thread
  (it needs no GIL, so it fires even while the loop's thread is stuck in C code).
- ``Control(DRAIN)`` or SIGTERM: ``ctx.draining`` is set and every work puller stops
  asking for work; the stage finishes what it holds and ``run`` returns. ``SHUTDOWN``
  cancels ``run``. If the parent dies, the process exits (parent-death signal, plus a
  watchdog on ``getppid`` for platforms without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import msgspec
import structlog

import transport
from pipeline import endpoints as ep
from pipeline import malloc
from schemas.messages import Control, ControlCommand, Heartbeat, Message, Metrics
from schemas.stack import Stack
from transport.heartbeat import beat_forever
from transport.record import StreamRecorder
from transport.workqueue import WORKER_CREDIT, WorkPuller

STACK_FILE = "stack.json"
SUBSCRIBE_TIMEOUT_S = 180.0
"""Broadcast publishers (learner rank 0, publisher) may take a while to come up (model
build, checkpoint load); a subscriber waits this long for their handshake."""
PARENT_WATCH_S = 1.0
"""How often a stage checks that its supervisor still lives (backup to PR_SET_PDEATHSIG)."""


def configure_logging(log_path: Path, **bind: Any) -> structlog.BoundLogger:
    """JSON lines to ``log_path``; warnings and errors also to stderr."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler, err]
    root.setLevel(logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(**bind)
    return structlog.get_logger()


def write_stack(run_dir: Path, stack: Stack) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STACK_FILE).write_bytes(msgspec.json.encode(stack))


def read_stack(run_dir: Path) -> Stack:
    return msgspec.json.decode((run_dir / STACK_FILE).read_bytes(), type=Stack)


class StageContext:
    """What a stage's ``run(ctx)`` gets: config, addresses, channels, counters, events."""

    def __init__(self, kind: str, replica: int, run_dir: Path, stack: Stack,
                 endpoints: dict[str, str]) -> None:
        self.kind, self.replica = kind, replica
        self.name = f"{kind}/{replica}"
        self.run_dir = Path(run_dir)
        self.stack = stack
        self.endpoints = endpoints
        self.log = structlog.get_logger()
        self.draining = asyncio.Event()
        self.processed = 0
        self.in_flight = 0
        self.weight_version = -1
        self.started = False
        """Set when the body opens its first channel (engine and model built): until then
        heartbeats say ``starting`` and the supervisor tolerates longer silence."""
        self._channels: list[Any] = []
        self._pullers: list[WorkPuller] = []
        self._recorders: list[StreamRecorder] = []
        self._telemetry: Any = None
        self.control_handlers: dict[ControlCommand, Callable[[Control], None]] = {}
        """Stage-specific reactions to control commands other than DRAIN and SHUTDOWN."""

    # ------------------------------------------------------------------ channels
    def _keep(self, ch: Any, stream: str) -> Any:
        if not self.started:
            freeze_startup_heap()
            lower_priority(int(os.environ.get(WORKER_NICE_VAR, "0")))
        self.started = True
        self._channels.append(ch)
        if stream in self.stack.run.record and hasattr(ch, "taps"):
            rec = StreamRecorder(self.run_dir / "recordings" / f"{stream}-{self.kind}-{self.replica}.stream")
            ch.taps.append(rec)
            self._recorders.append(rec)
        return ch

    def work_in(self, stream: str, credit: int = WORKER_CREDIT) -> WorkPuller:
        """Credit-based receiver of a work stream (stops asking for work when draining);
        ``credit``: items this replica holds at most (its concurrency)."""
        ch = WorkPuller(self.endpoints[f"{stream}.back"], sender=self.name, name=stream, credit=credit)
        if self.draining.is_set():
            ch.drain()
        self._pullers.append(ch)
        return self._keep(ch, stream)

    def work_out(self, stream: str) -> transport.Sender:
        return self._keep(transport.push(self.endpoints[f"{stream}.front"], bind=False,
                                         sender=self.name, name=stream), stream)

    async def subscribe(self, topic: str, topics: tuple[str, ...] = ("",)) -> transport.Receiver:
        ch = transport.sub(self.endpoints[topic], self.endpoints[f"{topic}.sync"], sender=self.name,
                           name=topic, topics=topics)
        self._keep(ch, topic)
        await ch.ready(SUBSCRIBE_TIMEOUT_S)
        return ch

    def publisher(self, topic: str) -> transport.Sender:
        return self._keep(transport.pub(self.endpoints[topic], self.endpoints[f"{topic}.sync"],
                                        sender=self.name, name=topic), topic)

    async def consume(self, puller: WorkPuller) -> AsyncIterator[Message]:
        """Messages of a work stream until drained (then the loop simply ends)."""
        while True:
            try:
                msg = await puller.recv()
            except EOFError:
                return
            self.in_flight += 1
            try:
                yield msg
            finally:
                self.in_flight -= 1

    async def serve(self, puller: WorkPuller, kind: type | tuple[type, ...],
                    handle: Callable[[Any], Awaitable[None]]) -> None:
        """Run ``handle(msg)`` for every ``kind`` message (a type or a tuple of them) of a
        work stream, concurrently (at
        most the puller's credit at once); returns once drained and every handler finished.
        A handler that raises is logged and counted; the others go on."""
        tasks: set[asyncio.Task] = set()

        async def run_one(msg: Any) -> None:
            try:
                await handle(msg)
                self.processed += 1
            except Exception:
                self.log.exception("handler failed", tag=type(msg).__name__)
            finally:
                self.in_flight -= 1
                puller.release()

        while True:
            try:
                msg = await puller.recv_held()
            except EOFError:
                break
            if not isinstance(msg, kind):
                self.log.warning("unexpected message", tag=type(msg).__name__, expected=repr(kind))
                puller.release()
                continue
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(run_one(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    async def metrics(self, step: int, values: dict[str, float]) -> None:
        if self._telemetry is not None:
            await self._telemetry.send(Metrics(self.name, step, values))

    def drain(self) -> None:
        self.draining.set()
        for p in self._pullers:
            p.drain()
            if isinstance(p, WorkPuller):
                asyncio.get_running_loop().create_task(self._revoke_now(p))

    @staticmethod
    async def _revoke_now(p: WorkPuller) -> None:
        """Send the drained puller's credit revocation at once (``WorkPuller.revoke``).
        ``WorkPuller`` sends it from inside ``recv``, but a replica parked in ``recv``
        waiting for work that never comes (the source drained first, or is idle) would never
        get there and never exit; the broker's acknowledgement wakes it into EOFError."""
        with contextlib.suppress(Exception):
            await p.revoke()

    def heartbeat(self) -> Heartbeat:
        state = "draining" if self.draining.is_set() else "running" if self.started else "starting"
        return Heartbeat(self.kind, self.replica, os.getpid(), state, self.in_flight, self.processed,
                         self.weight_version)

    def close(self) -> None:
        for ch in self._channels:
            with contextlib.suppress(Exception):
                ch.close()
        for rec in self._recorders:
            rec.close()


SUPERVISOR_PID_VAR = "CONVEYOR_SUPERVISOR_PID"
"""Set by the supervisor for each child: the pid the child must outlive no longer than."""


WORKER_NICE_VAR = "CONVEYOR_WORKER_NICE"
"""Niceness a stage takes once started (set by the supervisor: ``supervisor.worker_nice``)."""
WORKER_POLICY = "SCHED_BATCH"
"""Scheduling policy (name in ``os``) of a stage that lowers its priority. On the 2-core VM,
two decode loops sharing a core spent 1.93 ms of CPU a call when preempted ~120 times a
second and 1.45 ms with a tenth of the preemptions (alone: 1.33-1.45): each switch between
these processes costs about a millisecond of cache refill. On the default stack, six
alternating bench pairs each (2026-12-03): async/sync 1.12-1.85, median 1.46, with it
against 1.15-1.45, median 1.30, without; async's CPU per step over sync's, median 0.995
against 1.12."""


def freeze_startup_heap() -> None:
    """Collect once, then move every object the start left alive into the collector's
    permanent generation (``gc.freeze``). A stage with torch and transformers loaded tracks
    ~380k objects, and each full collection walked all of them: on the default stack, in a
    600-step run after the start, 1-2 full collections per stage of 136-313 ms of CPU each
    (ad hoc, ``gc.callbacks``), during which that stage's loop served nothing; frozen, none
    outside the learner, whose three took 57-81 ms. Frozen objects are never collected,
    hence the collection first: cyclic garbage from the start is freed, not kept."""
    gc.collect()
    gc.freeze()


def lower_priority(nice: int) -> None:
    """Raise this process's niceness to ``nice``, and its session's where the kernel groups
    sessions for scheduling (autogroup): between sessions only the group's niceness counts,
    and every stage runs in a session of its own. Then put every thread of it under
    ``SCHED_BATCH`` (Linux), which keeps its niceness but never preempts a running thread when
    it wakes up: a reward or logprob stage woken by a message waits for the rollout running
    on that core to block or use up its slice, instead of cutting into a decode step, whose
    caches it would then refill (``WORKER_POLICY``). The learner stays a normal thread and
    still preempts these at once. Raising needs no privilege; failures leave the priority
    and policy as they were."""
    if nice <= 0:
        return
    with contextlib.suppress(OSError):
        os.nice(nice - os.nice(0))
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as f:
        f.write(str(nice))
    policy = getattr(os, WORKER_POLICY, None)
    if policy is None:
        return
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):  # threads started later inherit it
            with contextlib.suppress(OSError):
                os.sched_setscheduler(int(tid), policy, os.sched_param(0))


def set_parent_death_signal() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    with contextlib.suppress(Exception):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


async def _watch_parent(parent: int, on_orphan: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(PARENT_WATCH_S)
        if os.getppid() != parent:
            on_orphan()
            return


SPAWNED_AT_VAR = "CONVEYOR_SPAWNED_AT"
"""Set by the supervisor for each child: its ``time.time()`` when it spawned the process."""
ONE_SHOT_COMMANDS = (ControlCommand.DRAIN, ControlCommand.SHUTDOWN, ControlCommand.REISSUE)
"""Commands that are events, not states. The control PUB's last-value cache hands a new
subscriber the last Control sent; one of these sent before this process was spawned was
meant for its predecessor (e.g. ``DRAIN rollout/2`` of a scale-down, seen again by a later
``rollout/2`` of a scale-up) and is ignored. PAUSE/RESUME are states and still apply."""


async def _follow_control(ctx: StageContext, main_task: asyncio.Task, spawned_at: float) -> None:
    ch = await ctx.subscribe("control", topics=("control",))
    while True:
        env, msg = await ch.recv_envelope()
        if not isinstance(msg, Control):
            continue
        if msg.target not in ("*", ctx.kind, ctx.name):
            continue
        if msg.command in ONE_SHOT_COMMANDS and env.sent_at < spawned_at:
            ctx.log.info("control ignored: sent before this process started", command=msg.command.value,
                         target=msg.target)
            continue
        ctx.log.info("control", command=msg.command.value, reason=msg.reason)
        if msg.command is ControlCommand.DRAIN:
            ctx.drain()
        elif msg.command is ControlCommand.SHUTDOWN:
            main_task.cancel()
        elif msg.command in ctx.control_handlers:
            ctx.control_handlers[msg.command](msg)


LOOP_STALL_DUMP_S = 20.0
"""A loop silent this long is stuck, not busy (a learner step or a weight load yields within
seconds); two-thirds of the supervisor's 30 s heartbeat timeout, so the stacks are in the log
before a kill."""


async def dump_stacks_on_loop_stall(after: float = LOOP_STALL_DUMP_S, tick: float = 1.0) -> None:
    """Re-arm faulthandler's one-shot timer every ``tick``: it fires only if the loop stops
    ticking for ``after`` seconds. One such timer exists per process (this is its owner)."""
    try:
        while True:
            faulthandler.dump_traceback_later(after, repeat=False, file=sys.stderr)
            await asyncio.sleep(tick)
    finally:
        faulthandler.cancel_dump_traceback_later()


async def run_stage(kind: str, replica: int, run_dir: Path,
                    body: Callable[[StageContext], Awaitable[None]]) -> int:
    """Run one stage replica to completion; returns the process exit code."""
    set_parent_death_signal()
    spawned_at = float(os.environ.get(SPAWNED_AT_VAR, "0")) or time.time()
    parent = int(os.environ.get(SUPERVISOR_PID_VAR, os.getppid()))
    if os.getppid() != parent:  # the supervisor died while this process was starting
        return 1
    stack = read_stack(run_dir)
    endpoints = ep.load(run_dir)
    log = configure_logging(run_dir / "logs" / f"{kind}-{replica}.jsonl", stage=kind, replica=replica)
    ctx = StageContext(kind, replica, run_dir, stack, endpoints)
    ctx.log = log
    loop = asyncio.get_running_loop()
    ctx._telemetry = transport.push(endpoints["telemetry"], bind=False, sender=ctx.name, name="telemetry")
    ctx._channels.append(ctx._telemetry)
    main_task = asyncio.current_task()
    assert main_task is not None
    body_task = loop.create_task(body(ctx))
    loop.add_signal_handler(signal.SIGTERM, ctx.drain)
    loop.add_signal_handler(signal.SIGINT, ctx.drain)
    helpers = [
        loop.create_task(beat_forever(ctx._telemetry, ctx.heartbeat)),
        loop.create_task(dump_stacks_on_loop_stall()),
        loop.create_task(_follow_control(ctx, body_task, spawned_at)),
        loop.create_task(_watch_parent(parent, body_task.cancel)),
    ]
    log.info("stage started", pid=os.getpid(), started_at=time.time(),
             allocator=malloc.state)
    code = 0
    try:
        await body_task
    except asyncio.CancelledError:
        log.info("stage cancelled")
    except Exception:
        log.exception("stage failed")
        code = 1
    finally:
        for h in helpers:
            h.cancel()
        with contextlib.suppress(Exception):
            await ctx._telemetry.send(Heartbeat(kind, replica, os.getpid(), "stopped", 0, ctx.processed,
                                                ctx.weight_version))
        ctx.close()
    log.info("stage stopped", code=code)
    return code

"""The supervisor: runs every stage replica as its own OS process and keeps the stack alive.

It owns the run's shared sockets: one credit broker per work stream, the ``control`` PUB,
the ``telemetry`` PULL (heartbeats, metrics) and the ``supervisor`` ROUTER (status/scale).

Invariants and failure behaviour:
- Every child is tracked by pid, started with ``python -m pipeline.stage`` in its own
  process group, and dies with the supervisor (PR_SET_PDEATHSIG + parent watchdog in the
  stage runtime). Nothing is ever killed by name.
- A replica that exits non-zero (or is silent past the heartbeat timeout, then killed) is
  restarted after an exponential backoff; more than ``MAX_RESTARTS`` within
  ``RESTART_WINDOW_S`` fails the whole stack with a reason naming the replica. Learner ranks
  form one process group, so if one rank dies all ranks are restarted together (they resume
  from the last checkpoint). After a work-stage restart the source is told to reissue
  outstanding groups (``Control(REISSUE)``).
- A replica that exits 0 after being drained (scale down, shutdown) is not restarted.
- Shutdown (SIGINT/SIGTERM, ``max_steps`` reached, or failure) is bounded: DRAIN to all,
  wait, SHUTDOWN, SIGTERM, then SIGKILL, each by pid, within ``shutdown_timeout``.
- ``metrics.jsonl`` gets one line per learner step (the learner's Metrics values + time).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

import transport
from pipeline import endpoints as ep
from pipeline.runtime import SUPERVISOR_PID_VAR, configure_logging, set_parent_death_signal, write_stack
from schemas.messages import (
    Control, ControlCommand, Heartbeat, Metrics, ScaleRequest, StageStatus, StatusReply, StatusRequest,
)
from schemas.stack import Stack
from stages.publisher.shm import remove_run_slots, run_slot_id
from transport.heartbeat import HealthTracker
from transport.workqueue import WorkBroker
from transport.zmq_sockets import RouterChannel

log = structlog.get_logger("supervisor")

MAX_RESTARTS = 5
"""Restarts allowed per replica within the window before the stack gives up: enough to ride
out transient faults, few enough that a crash loop fails fast with its reason."""
RESTART_WINDOW_S = 300.0
BACKOFF_BASE_S = 0.5
"""First restart after 0.5 s, doubling per recent restart (0.5, 1, 2, 4, 8 s)."""
MONITOR_INTERVAL_S = 0.2
STARTUP_GRACE_S = 60.0
"""A replica is not declared silent before it had this long to start (imports, model build)."""
SCALABLE = ("rollout", "reward", "logprob")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Set for every child unless the user set them: torch's default of one thread per core in
each of a stack's ~7 processes oversubscribes the CPU many times over."""


@dataclass
class Replica:
    kind: str
    index: int
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: collections.deque = field(default_factory=collections.deque)
    retiring: bool = False
    """Drained on purpose (scale down): exit 0 is final."""

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.index}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class StackFailed(Exception):
    pass


def replica_counts(stack: Stack) -> dict[str, int]:
    return {"source": 1, "rollout": stack.rollout.replicas, "reward": stack.reward.replicas,
            "logprob": stack.logprob.replicas, "learner": stack.learner.world_size, "publisher": 1}


class Supervisor:
    def __init__(self, stack: Stack, run_dir: Path, *, targets: dict[str, str] | None = None,
                 max_steps: int | None = None, shutdown_timeout: float = 10.0,
                 heartbeat_timeout: float = 30.0, only: set[str] | None = None) -> None:
        self.stack = stack
        self.run_dir = Path(run_dir)
        self.targets = targets or {}
        self.max_steps = max_steps
        self.shutdown_timeout = shutdown_timeout
        counts = replica_counts(stack)
        self.desired = {k: n for k, n in counts.items() if only is None or k in only}
        self.replicas: dict[str, list[Replica]] = {k: [] for k in self.desired}
        self.health = HealthTracker(heartbeat_timeout)
        self.stop = asyncio.Event()
        self.failure: str | None = None
        self.step = 0
        self.last_metrics: dict[str, float] = {}
        self.brokers: dict[str, WorkBroker] = {}
        self.threads_per_process = max(1, (os.cpu_count() or 1) // max(1, sum(self.desired.values())))
        self.endpoints: dict[str, str] = {}

    # ------------------------------------------------------------------ processes
    def _spawn(self, r: Replica) -> None:
        target = self.targets.get(r.kind, r.kind)
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{r.kind}-{r.index}.out", "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for var in THREAD_VARS:  # many processes share the cores: one compute thread each
            env.setdefault(var, str(self.threads_per_process))
        env[SUPERVISOR_PID_VAR] = str(os.getpid())
        r.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.stage", target, "--run-dir", str(self.run_dir),
             "--replica", str(r.index), "--name", r.kind],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
            preexec_fn=set_parent_death_signal)  # armed before exec: no window during imports
        out.close()
        r.started_at = time.monotonic()
        self.health.forget(r.name)
        log.info("spawned", replica=r.name, pid=r.proc.pid)

    def pids(self) -> dict[str, int]:
        return {r.name: r.proc.pid for rs in self.replicas.values() for r in rs if r.alive}

    def _kill(self, r: Replica, sig: int = signal.SIGKILL) -> None:
        if r.alive:
            try:
                os.kill(r.proc.pid, sig)
            except ProcessLookupError:
                pass

    async def _monitor(self) -> None:
        while not self.stop.is_set():
            for kind, reps in self.replicas.items():
                for r in list(reps):
                    rc = r.proc.poll() if r.proc is not None else None
                    if r.proc is None or rc is None:
                        self._check_silent(r)
                        continue
                    if r.retiring or self.stop.is_set():
                        if r.retiring:
                            reps.remove(r)
                            log.info("retired", replica=r.name, code=rc)
                        continue
                    log.warning("replica exited", replica=r.name, code=rc)
                    await self._restart(kind, r)
            await asyncio.sleep(MONITOR_INTERVAL_S)

    def _check_silent(self, r: Replica) -> None:
        if r.proc is None or time.monotonic() - r.started_at < STARTUP_GRACE_S:
            return
        if r.name in self.health.silent():
            log.warning("replica silent, killing", replica=r.name, pid=r.proc.pid)
            self._kill(r)

    async def _restart(self, kind: str, r: Replica) -> None:
        now = time.monotonic()
        while r.restarts and now - r.restarts[0] > RESTART_WINDOW_S:
            r.restarts.popleft()
        if len(r.restarts) >= MAX_RESTARTS:
            self.failure = f"{r.name} crashed {len(r.restarts) + 1} times within {RESTART_WINDOW_S:.0f}s; see logs/{r.kind}-{r.index}.out"
            self.stop.set()
            return
        r.restarts.append(now)
        for b in self.brokers.values():
            b.forget(r.name)
        group = self.replicas[kind] if kind == "learner" else [r]
        if kind == "learner":  # one process group: all ranks go and come back together
            for other in group:
                self._kill(other)
            for other in group:
                if other.proc is not None:
                    await asyncio.to_thread(other.proc.wait)
        await asyncio.sleep(BACKOFF_BASE_S * 2 ** (len(r.restarts) - 1))
        for other in group:
            self._spawn(other)
        if kind in SCALABLE:
            await self.control.send(Control(ControlCommand.REISSUE, "source", f"{r.name} restarted"))

    # ------------------------------------------------------------------ operator
    async def scale(self, kind: str, n: int) -> str:
        if kind not in SCALABLE:
            return f"cannot scale {kind}: only {', '.join(SCALABLE)} scale"
        if n < 1:
            return f"cannot scale {kind} to {n}: at least 1 replica"
        reps = self.replicas[kind]
        live = [r for r in reps if not r.retiring]
        for i in range(len(live), n):  # up
            used = {r.index for r in reps}
            r = Replica(kind, min(set(range(len(reps) + 1)) - used))
            reps.append(r)
            self._spawn(r)
        for r in sorted(live, key=lambda r: r.index)[n:]:  # down: drain, then it exits 0
            r.retiring = True
            await self.control.send(Control(ControlCommand.DRAIN, r.name, "scale down"))
        self.desired[kind] = n
        return f"{kind}: {n} replica(s)"

    def status(self, ok: bool = True, detail: str = "") -> StatusReply:
        stages = []
        for kind, reps in self.replicas.items():
            hbs = [self.health.latest.get(r.name) for r in reps]
            stream = {"rollout": "prompts", "reward": "rollouts", "logprob": "scored", "learner": "train"}.get(kind)
            depth = self.brokers[stream].depth if stream in self.brokers else 0
            stages.append(StageStatus(kind, self.desired.get(kind, 0), sum(r.alive for r in reps),
                                      sum(len(r.restarts) for r in reps), depth,
                                      sum(h.processed for h in hbs if h is not None)))
        m = self.last_metrics
        return StatusReply(ok, detail, stages, self.step, int(m.get("weight_version", -1)),
                           m.get("reward_mean", 0.0), m.get("samples_per_s", 0.0), m.get("staleness_mean", 0.0))

    async def _serve_router(self, router: RouterChannel) -> None:
        while True:
            ident, _, msg = await router.recv_from()
            if isinstance(msg, StatusRequest):
                await router.send_to(ident, self.status())
            elif isinstance(msg, ScaleRequest):
                detail = await self.scale(msg.stage, msg.replicas)
                await router.send_to(ident, self.status(not detail.startswith("cannot"), detail))

    async def _telemetry(self, pull) -> None:
        metrics_path = self.run_dir / "metrics.jsonl"
        while True:
            msg = await pull.recv()
            if isinstance(msg, Heartbeat):
                self.health.observe(msg)
            elif isinstance(msg, Metrics) and msg.stage == "learner/0":
                self.step = msg.step
                self.last_metrics = msg.values
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": msg.step, "time": time.time(), **msg.values}) + "\n")
                if self.max_steps is not None and msg.step >= self.max_steps:
                    log.info("max steps reached", step=msg.step)
                    self.stop.set()

    # ------------------------------------------------------------------ lifecycle
    async def run(self, on_tick=None) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        configure_logging(self.run_dir / "logs" / "supervisor.jsonl", stage="supervisor")
        self.endpoints = ep.assign(self.stack)
        ep.save(self.run_dir, self.endpoints)
        write_stack(self.run_dir, self.stack)
        for s in ep.WORK_STREAMS:
            b = WorkBroker(s, self.endpoints[f"{s}.front"], self.endpoints[f"{s}.back"])
            b.start()
            self.brokers[s] = b
        self.control = transport.pub(self.endpoints["control"], self.endpoints["control.sync"], sender="supervisor")
        telemetry = transport.pull(self.endpoints["telemetry"], bind=True, sender="supervisor", hwm=10000)
        router = RouterChannel(self.endpoints["supervisor"], sender="supervisor")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        for kind, n in self.desired.items():
            for i in range(n):
                r = Replica(kind, i)
                self.replicas[kind].append(r)
                self._spawn(r)
        helpers = [loop.create_task(self._monitor()), loop.create_task(self._telemetry(telemetry)),
                   loop.create_task(self._serve_router(router))]
        tick = loop.create_task(on_tick(self)) if on_tick is not None else None
        if tick is not None:  # a failing observer stops the stack and re-raises below
            tick.add_done_callback(lambda t: t.cancelled() or t.exception() is None or self.stop.set())
        try:
            await self.stop.wait()
        finally:
            if tick is not None and not tick.done():
                tick.cancel()
            await self._shutdown()
            for h in helpers:
                h.cancel()
            for c in (telemetry, router, self.control, *self.brokers.values()):
                c.close()
            remove_run_slots(run_slot_id(self.stack.run.name, self.run_dir))
        if tick is not None and tick.done() and not tick.cancelled() and tick.exception() is not None:
            raise tick.exception()
        if self.failure:
            log.error("stack failed", reason=self.failure)
            return 1
        return 0

    async def _shutdown(self) -> None:
        everyone = [r for rs in self.replicas.values() for r in rs]
        deadline = time.monotonic() + self.shutdown_timeout
        try:
            await self.control.send(Control(ControlCommand.DRAIN, "*", "shutdown"))
        except Exception:
            pass
        drain_until = time.monotonic() + 0.7 * self.shutdown_timeout
        while time.monotonic() < drain_until and any(r.alive for r in everyone):
            await asyncio.sleep(0.1)
        try:
            await self.control.send(Control(ControlCommand.SHUTDOWN, "*", "shutdown"))
        except Exception:
            pass
        for r in everyone:
            self._kill(r, signal.SIGTERM)
        while time.monotonic() < deadline and any(r.alive for r in everyone):
            await asyncio.sleep(0.05)
        for r in everyone:
            self._kill(r, signal.SIGKILL)
        for r in everyone:
            if r.proc is not None:
                await asyncio.to_thread(r.proc.wait)

"""The supervisor: runs every stage replica as its own OS process and keeps the stack alive.

It owns the run's shared sockets: one credit broker per work stream, the ``control`` PUB,
the ``telemetry`` PULL (heartbeats, metrics) and the ``supervisor`` ROUTER (status/scale).

Invariants and failure behaviour:
- Every child is tracked by pid, started with ``python -m pipeline.stage`` in its own
  process group (session), and dies with the supervisor (PR_SET_PDEATHSIG armed before
  exec, plus the stage runtime's parent watchdog). Nothing is ever killed by name.
- Stages that can run ahead of the learner (rollout, reward, logprob) run at
  niceness ``worker_nice`` (19 by default when the learner trains on the CPU) once started
  (``pipeline.runtime.lower_priority``, which also puts them under ``SCHED_BATCH``: they do
  not preempt one another on waking): the learner, the async stack's critical path, is
  never preempted by work with slack, and no start is starved into a heartbeat timeout.
  The source keeps niceness 0: little CPU, and all generation waits on its issuing.
  The learner's processes are pinned to ``run.learner_cpus`` (by default one core when a
  one-thread learner trains on the CPU), set in the child before exec.
- A replica that exits without being asked to (any code), or is silent past the heartbeat
  timeout (``STARTING_TIMEOUT_S`` while its heartbeats say ``starting``; then SIGKILLed
  with its process group, so an engine core it started goes too), is restarted after an
  exponential backoff without blocking the monitoring of the others. More than
  ``RestartPolicy.max_restarts`` restarts of one replica within ``RestartPolicy.window_s``
  fails the whole stack: ``failure`` names the replica and its log, and ``run`` returns 1.
  Learner ranks form one process group, so if one rank dies all ranks are stopped and
  restarted together (they resume from the last checkpoint). Whenever a replica goes, its
  broker credit is dropped (``forget``); after a work-stage replica is lost the source is
  told to reissue outstanding groups (``Control(REISSUE)``).
- Scale down drains the highest-numbered replicas (``Control(DRAIN, "<kind>/<i>")``): they
  stop granting credit, finish what they hold and exit 0, which is final (not restarted).
  One that does not exit within ``RETIRE_TIMEOUT_S`` is killed and its groups reissued.
- Shutdown (SIGINT/SIGTERM, ``max_steps`` reached, failure) is bounded by
  ``shutdown_timeout``: DRAIN to all (the learner checkpoints), wait up to
  ``DRAIN_SHARE`` of it, SHUTDOWN, SIGTERM, then SIGKILL at the deadline, each by pid. A
  second SIGINT/SIGTERM skips the rest of the drain wait.
- ``metrics.jsonl`` gets one line per Metrics message from ``learner/0``: its values plus
  ``step`` and ``time``, plus the newest values any other stage sent (e.g. the publisher's
  ``canary_gap_max``, ``weights_publish_s``) where the learner has no value of that name.
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
from typing import Awaitable, Callable

import structlog

import transport
from pipeline import endpoints as ep
from pipeline.runtime import (
    SPAWNED_AT_VAR, SUPERVISOR_PID_VAR, WORKER_NICE_VAR, configure_logging, set_parent_death_signal, write_stack,
)
from schemas.messages import (
    Control, ControlCommand, Heartbeat, Metrics, ScaleRequest, StageStatus, StatusReply, StatusRequest,
)
from schemas.stack import Stack
from stages.publisher.shm import remove_run_slots, run_slot_id
from transport.heartbeat import HealthTracker
from transport.workqueue import WorkBroker
from transport.zmq_sockets import RouterChannel

log = structlog.get_logger("supervisor")

MONITOR_INTERVAL_S = 0.2
"""How often child exits and heartbeats are checked: a crash is noticed within 0.2 s."""
HEARTBEAT_TIMEOUT_S = 30.0
"""A replica silent this long is killed and restarted. Generous: a learner step or a model
load may hold a stage's event loop for several seconds (heartbeats come once a second)."""
STARTUP_GRACE_S = 60.0
"""A new replica may take this long (imports, model build) before its silence counts."""
RETIRE_TIMEOUT_S = 60.0
"""A replica drained by a scale-down must exit within this long, or it is killed."""
SCALE_REPLY_WAIT_S = 20.0
"""``scale`` waits this long for drained replicas to exit before answering."""
DRAIN_SHARE = 0.7
"""Share of the shutdown time given to the drain (learner checkpoint); the rest is for
SHUTDOWN, SIGTERM and SIGKILL."""
SCALABLE = ("rollout", "reward", "logprob")
"""Stateless work stages. source (owns the cursor), learner (one FSDP group of
``world_size``) and publisher (owns the weight versions) have a fixed count."""
INPUT_STREAM = {"rollout": "prompts", "reward": "rollouts", "logprob": "scored", "learner": "train"}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Set for every child unless the user set them: torch's default of one thread per core in
each of a stack's ~7 processes oversubscribes the CPU many times over."""


WORKER_STAGES = ("rollout", "reward", "logprob")
"""Stages that can run ahead of the learner; they yield the CPU to it (``worker_nice``). Not
the source: its CPU is small (~2 ms a default-stack step) and every group waits on it, since
it issues the next ones only once a ``Progress`` or ``WeightsReady`` frees credit; niced, it
waited for a core each time, and async's throughput on the 2-core default stack was 4-10 %
lower (six alternating pairs, 2026-12-03, fourth session)."""
WORKER_NICE_ON_CPU = 19
"""``run.worker_nice`` when the learner trains on the CPU: Linux gives a nice-0 task ~98 % of
a core against one nice-19 task, so no work that has slack preempts the learner's step,
while a core the learner leaves idle goes to the workers at once. On the 2-core default
stack async kept 1.8 of 2 cores busy with it and 1.5-1.6 without; async/sync over nine
pairs 1.15-1.57 (median 1.38) against 0.97-1.24 (median 1.17) over four without."""


def worker_nice(stack: Stack, kind: str) -> int:
    """The niceness ``kind``'s processes start with (0 for the source, the learner and the
    publisher: only ``WORKER_STAGES`` yield)."""
    if kind not in WORKER_STAGES:
        return 0
    if stack.run.worker_nice is not None:
        return stack.run.worker_nice
    return WORKER_NICE_ON_CPU if stack.learner.device == "cpu" else 0


def learner_cpus(stack: Stack, threads_per_process: str) -> list[int]:
    """CPUs the learner's processes are pinned to, [] for none (``run.learner_cpus``).
    ``threads_per_process``: the ``OMP_NUM_THREADS`` the learner gets. Raises ``ValueError``
    for configured CPUs this process may not use (a pinned child could not start)."""
    usable = usable_cpus()
    cpus = stack.run.learner_cpus
    if cpus is None:
        auto = (stack.learner.device == "cpu" and stack.learner.world_size == 1
                and threads_per_process == "1" and len(usable) > 1)
        return usable[:1] if auto else []
    if cpus and not set(cpus) <= set(usable):
        raise ValueError(f"run.learner_cpus {list(cpus)}: this process may only use CPUs {usable}")
    return list(cpus)


def usable_cpus() -> list[int]:
    """CPU ids this process may run on (its affinity mask: ``taskset``, cpusets), sorted;
    [] where the platform has no affinity mask (not Linux)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def usable_cores() -> int:
    """Cores this process may run on (``usable_cpus``), not the machine's count: pinned to 2
    of 16 cores, a share computed from 16 started 2 OpenMP threads per stage, whose
    spin-waits multiplied the rollout's CPU per step tenfold. The machine's count where
    there is no affinity mask."""
    return len(usable_cpus()) or os.cpu_count() or 1


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5
    """Restarts of one replica allowed within ``window_s``: enough to ride out transient
    faults, few enough that a crash loop fails fast with its reason."""
    window_s: float = 300.0
    backoff_base_s: float = 0.5
    """First restart after 0.5 s, doubling per recent restart (0.5, 1, 2, 4, 8 s)."""
    backoff_max_s: float = 30.0

    def backoff(self, recent: int) -> float:
        return min(self.backoff_max_s, self.backoff_base_s * 2 ** max(0, recent - 1))


@dataclass
class Replica:
    kind: str
    index: int
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: collections.deque = field(default_factory=collections.deque)
    """Monotonic times of recent restarts (within the policy window)."""
    total_restarts: int = 0
    retiring: bool = False
    """Drained on purpose (scale down): its exit is final."""
    retire_deadline: float = 0.0
    restarting: bool = False
    """Dead and waiting for its backoff: the monitor leaves it alone."""

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.index}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def replica_counts(stack: Stack) -> dict[str, int]:
    return {"source": 1, "rollout": stack.rollout.replicas, "reward": stack.reward.replicas,
            "logprob": stack.logprob.replicas, "learner": stack.learner.world_size, "publisher": 1}


class Supervisor:
    """Runs a stack: ``await Supervisor(stack, run_dir).run()`` returns the exit code.

    ``targets`` maps a stage kind to what ``pipeline.stage`` runs for it (default: the kind;
    tests pass ``module:function`` fakes). ``only`` restricts the stack to some kinds
    (``pipeline replay``)."""

    def __init__(self, stack: Stack, run_dir: Path, targets: dict[str, str] | None = None, *,
                 max_steps: int | None = None, shutdown_timeout: float = 10.0,
                 heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S, startup_grace: float = STARTUP_GRACE_S,
                 restart_policy: RestartPolicy = RestartPolicy(), only: set[str] | None = None) -> None:
        self.stack = stack
        self.run_dir = Path(run_dir)
        self.targets = targets or {}
        self.max_steps = max_steps
        self.shutdown_timeout = shutdown_timeout
        self.startup_grace = startup_grace
        self.policy = restart_policy
        counts = replica_counts(stack)
        self.desired = {k: n for k, n in counts.items() if only is None or k in only}
        self.replicas: dict[str, list[Replica]] = {k: [] for k in self.desired}
        self.health = HealthTracker(heartbeat_timeout)
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        """Set by a second SIGINT/SIGTERM: cut the drain short."""
        self.failure: str | None = None
        self.step = 0
        self.last_metrics: dict[str, float] = {}
        self.stage_metrics: dict[str, float] = {}
        """Newest value of every figure other stages sent (merged into ``metrics.jsonl`` rows)."""
        self.brokers: dict[str, WorkBroker] = {}
        self.endpoints: dict[str, str] = {}
        self.threads_per_process = max(1, usable_cores() // max(1, sum(self.desired.values())))
        self.learner_cpus = learner_cpus(stack, os.environ.get("OMP_NUM_THREADS", str(self.threads_per_process)))
        """Where learner ranks are pinned (the thread count ``_spawn`` gives them); bad CPUs fail here."""
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ processes
    def _spawn(self, r: Replica) -> None:
        """Start ``r`` (from the event loop's thread: PDEATHSIG follows the spawning thread)."""
        target = self.targets.get(r.kind, r.kind)
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for var in THREAD_VARS:  # many processes share the cores: a fair share of threads each
            env.setdefault(var, str(self.threads_per_process))
        env[SUPERVISOR_PID_VAR] = str(os.getpid())
        env[SPAWNED_AT_VAR] = repr(time.time())
        nice = worker_nice(self.stack, r.kind)
        env[WORKER_NICE_VAR] = str(nice)
        cpus = self.learner_cpus if r.kind == "learner" else []

        def before_exec() -> None:  # in the child: nothing of the stage runs before these
            set_parent_death_signal()
            if cpus:
                os.sched_setaffinity(0, cpus)

        with open(logs / f"{r.kind}-{r.index}.out", "ab") as out:
            r.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.stage", target, "--run-dir", str(self.run_dir),
                 "--replica", str(r.index), "--name", r.kind],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                preexec_fn=before_exec)  # armed before exec: no window during imports
        r.started_at = time.monotonic()
        self.health.forget(r.name)
        log.info("spawned", replica=r.name, pid=r.proc.pid, target=target, nice=nice, cpus=cpus or None)

    def pids(self) -> dict[str, int]:
        """``stage/replica`` → pid of every live child."""
        return {r.name: r.proc.pid for rs in self.replicas.values() for r in rs if r.alive}

    def _signal(self, r: Replica, sig: int) -> None:
        """SIGKILL goes to the replica's whole process group (it leads its own session): the
        children it started (vLLM's engine core, compile workers) would otherwise outlive it
        and keep their GPU memory, and the restarted replica's engine would not fit (seen on
        an H200: an orphaned engine core held 30 % of the GPU). Drain signals go to the
        replica alone, which stops its children in order."""
        if r.alive:
            try:
                if sig == signal.SIGKILL:
                    os.killpg(r.proc.pid, sig)
                else:
                    os.kill(r.proc.pid, sig)
            except ProcessLookupError:
                pass

    def _forget(self, r: Replica) -> None:
        """``r``'s process is gone: drop its credit everywhere and its last heartbeat."""
        for b in self.brokers.values():
            b.forget(r.name)
        self.health.forget(r.name)

    def _background(self, coro: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reissue(self, why: str) -> None:
        if "source" in self.replicas:
            await self.control.send(Control(ControlCommand.REISSUE, "source", why))

    async def _monitor(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            for kind, reps in self.replicas.items():
                for r in list(reps):
                    if r.restarting or r.proc is None:
                        continue
                    rc = r.proc.poll()
                    if rc is None:
                        if r.retiring and now > r.retire_deadline:
                            log.warning("drained replica did not exit, killing", replica=r.name, pid=r.proc.pid)
                            self._signal(r, signal.SIGKILL)
                        elif not r.retiring:
                            self._check_silent(r, now)
                        continue
                    self._forget(r)
                    if r.retiring:
                        reps.remove(r)
                        log.info("retired", replica=r.name, code=rc)
                        if rc != 0:  # it may have died holding credited work
                            await self._reissue(f"{r.name} exited {rc} while draining")
                        continue
                    log.warning("replica exited", replica=r.name, pid=r.proc.pid, code=rc)
                    self._schedule_restart(kind, r, rc)
            await asyncio.sleep(MONITOR_INTERVAL_S)

    def _check_silent(self, r: Replica, now: float) -> None:
        if now - r.started_at < self.startup_grace:
            return
        never_beat = r.name not in self.health.last_seen
        if never_beat or r.name in self.health.silent():
            log.warning("replica silent, killing", replica=r.name, pid=r.proc.pid, never_beat=never_beat)
            self._signal(r, signal.SIGKILL)  # the monitor sees the exit and restarts it

    def _schedule_restart(self, kind: str, r: Replica, code: int) -> None:
        now = time.monotonic()
        while r.restarts and now - r.restarts[0] > self.policy.window_s:
            r.restarts.popleft()
        if len(r.restarts) >= self.policy.max_restarts:
            self.failure = (f"{r.name} exited (code {code}) {len(r.restarts) + 1} times within "
                            f"{self.policy.window_s:.0f}s; giving up. See {self.run_dir / 'logs'}/"
                            f"{r.kind}-{r.index}.out and .jsonl")
            log.error("restart limit reached", replica=r.name, reason=self.failure)
            self.stop.set()
            return
        r.restarts.append(now)
        r.total_restarts += 1
        # Learner ranks are one process group: all go and come back together.
        group = [x for x in self.replicas[kind] if not x.retiring] if kind == "learner" else [r]
        for x in group:
            x.restarting = True
        self._background(self._restart(kind, r, group, self.policy.backoff(len(r.restarts))))

    async def _restart(self, kind: str, r: Replica, group: list[Replica], delay: float) -> None:
        for x in group:
            self._signal(x, signal.SIGKILL)
        for x in group:
            if x.proc is not None:
                await asyncio.to_thread(x.proc.wait)
            self._forget(x)
        if kind in SCALABLE:
            await self._reissue(f"{r.name} restarted")
        log.info("restarting", replica=r.name, group=[x.name for x in group], backoff_s=delay)
        await asyncio.sleep(delay)
        if self.stop.is_set():
            return
        for x in group:
            self._spawn(x)
            x.restarting = False

    # ------------------------------------------------------------------ operator
    async def scale(self, kind: str, n: int) -> str:
        """Run ``n`` replicas of ``kind``; scaling down drains and waits (bounded) for the
        drained replicas to exit. Returns a one-line outcome (``cannot ...`` on refusal)."""
        if kind not in SCALABLE:
            return f"cannot scale {kind}: only {', '.join(SCALABLE)} scale"
        if kind not in self.replicas:
            return f"cannot scale {kind}: not part of this stack"
        if n < 1:
            return f"cannot scale {kind} to {n}: at least 1 replica"
        reps = self.replicas[kind]
        live = sorted((r for r in reps if not r.retiring), key=lambda r: r.index)
        for _ in range(len(live), n):  # up: the lowest free index
            used = {r.index for r in reps}
            r = Replica(kind, min(set(range(len(reps) + 1)) - used))
            reps.append(r)
            self._spawn(r)
        leaving = live[n:]
        for r in leaving:  # down: drain; it stops asking for work, finishes, exits 0
            r.retiring = True
            r.retire_deadline = time.monotonic() + RETIRE_TIMEOUT_S
            await self.control.send(Control(ControlCommand.DRAIN, r.name, "scale down"))
        self.desired[kind] = n
        log.info("scaled", stage=kind, replicas=n, draining=[r.name for r in leaving])
        end = time.monotonic() + SCALE_REPLY_WAIT_S
        while any(r in reps for r in leaving) and time.monotonic() < end and not self.stop.is_set():
            await asyncio.sleep(MONITOR_INTERVAL_S)
        still = [r.name for r in leaving if r in reps]
        return f"{kind}: {n} replica(s)" + (f"; still draining: {', '.join(still)}" if still else "")

    def status(self, ok: bool = True, detail: str = "") -> StatusReply:
        stages = []
        for kind, reps in self.replicas.items():
            hbs = [self.health.latest.get(r.name) for r in reps]
            stream = INPUT_STREAM.get(kind)
            depth = self.brokers[stream].depth if stream in self.brokers else 0
            stages.append(StageStatus(kind, self.desired.get(kind, 0), sum(r.alive for r in reps),
                                      sum(r.total_restarts for r in reps), depth,
                                      sum(h.processed for h in hbs if h is not None),
                                      sum(1 for r, h in zip(reps, hbs) if r.alive and h is not None
                                          and h.state == "starting")))
        m = self.last_metrics
        return StatusReply(ok, detail, stages, self.step, int(m.get("weight_version", -1)),
                           m.get("reward_mean", 0.0), m.get("samples_per_s", 0.0), m.get("staleness_mean", 0.0))

    async def _answer(self, router: RouterChannel, ident: bytes, msg: object) -> None:
        if isinstance(msg, StatusRequest):
            await router.send_to(ident, self.status())
        elif isinstance(msg, ScaleRequest):
            detail = await self.scale(msg.stage, msg.replicas)
            await router.send_to(ident, self.status(not detail.startswith("cannot"), detail))
        else:
            await router.send_to(ident, self.status(False, f"unexpected request {type(msg).__name__}"))

    async def _serve_router(self, router: RouterChannel) -> None:
        while True:  # each request in its own task: a scale-down waiting on drains blocks nobody
            ident, _, msg = await router.recv_from()
            self._background(self._answer(router, ident, msg))

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
                    f.write(json.dumps({**self.stage_metrics, **msg.values, "step": msg.step,
                                        "time": time.time()}) + "\n")
                if self.max_steps is not None and msg.step >= self.max_steps and not self.stop.is_set():
                    log.info("max steps reached", step=msg.step)
                    self.stop.set()
            elif isinstance(msg, Metrics):
                self.stage_metrics.update(msg.values)

    def _on_signal(self, signame: str) -> None:
        if self.stop.is_set():
            log.warning("second signal: cutting the drain short", signal=signame)
            self.force.set()
        else:
            log.info("signal: shutting down", signal=signame)
        self.stop.set()

    # ------------------------------------------------------------------ lifecycle
    async def run(self, on_tick: Callable[["Supervisor"], Awaitable[None]] | None = None) -> int:
        """Start everything, run until stopped, shut down; 0 on a clean stop, 1 on failure.
        ``on_tick(self)`` runs beside the stack (live view, test scenarios); if it raises, the
        stack stops and the exception propagates after shutdown."""
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
            loop.add_signal_handler(sig, self._on_signal, sig.name)
        log.info("supervisor started", pid=os.getpid(), replicas=self.desired, run_dir=str(self.run_dir))
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
            helpers[0].cancel()  # no restarts from here on
            for t in list(self._tasks):
                t.cancel()
            await self._shutdown()
            for h in helpers:
                h.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            for c in (telemetry, router, self.control, *self.brokers.values()):
                c.close()
            remove_run_slots(run_slot_id(self.stack.run.name, self.run_dir))
        if tick is not None and tick.done() and not tick.cancelled() and tick.exception() is not None:
            raise tick.exception()
        if self.failure:
            log.error("stack failed", reason=self.failure)
            return 1
        log.info("supervisor stopped", step=self.step)
        return 0

    async def _shutdown(self) -> None:
        everyone = [r for rs in self.replicas.values() for r in rs]
        t0 = time.monotonic()
        deadline = t0 + self.shutdown_timeout
        log.info("shutdown: drain", alive=sorted(self.pids()))
        try:
            await self.control.send(Control(ControlCommand.DRAIN, "*", "shutdown"))
        except Exception:
            log.exception("drain not sent")
        drain_until = t0 + DRAIN_SHARE * self.shutdown_timeout
        while time.monotonic() < drain_until and not self.force.is_set() and any(r.alive for r in everyone):
            await asyncio.sleep(0.05)
        late = sorted(self.pids())
        if late:
            log.warning("shutdown: not drained in time, terminating", alive=late,
                        waited_s=round(time.monotonic() - t0, 2))
            try:
                await self.control.send(Control(ControlCommand.SHUTDOWN, "*", "shutdown"))
            except Exception:
                log.exception("shutdown not sent")
            for r in everyone:
                self._signal(r, signal.SIGTERM)
            while time.monotonic() < deadline and any(r.alive for r in everyone):
                await asyncio.sleep(0.05)
        for r in everyone:
            if r.alive:
                log.warning("shutdown: killing", replica=r.name, pid=r.proc.pid)
            self._signal(r, signal.SIGKILL)
        for r in everyone:
            if r.proc is not None:
                await asyncio.to_thread(r.proc.wait)
        log.info("shutdown: done", seconds=round(time.monotonic() - t0, 2))

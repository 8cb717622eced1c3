"""``RewardScorer``: the pure logic of the reward stage (no sockets; owns no event loop).

``await scorer.score(rollout)`` decodes each completion with the tokenizer (trailing EOS
removed, other special tokens kept as text: see ``completion_text``), picks the reward function for ``rollout.group.task`` and returns one
``ScoredGroup`` holding a reward for every sample: groups are emitted whole, in the sample
order of the rollout.

Reward function choice: ``config.rewards[task]`` when the task is listed there, else the task
string itself; either is a spec for ``stages.tasks.resolve_reward_fn`` (a built-in task name
or ``package.module:attr``).

Isolation (``config.isolation``):
- ``process`` (default): functions run in a pool of ``num_workers`` child interpreters
  (``stages.reward.worker.serve_fd`` in a fresh ``python -c``, inheriting ``sys.path`` as
  ``PYTHONPATH`` so user modules import as they do in the stage). A sample whose function has not replied within
  ``sample_timeout_s`` gets reward 0 and a ``timeout`` error; its worker is killed by pid
  (SIGKILL) and replaced by a fresh process, so a hang costs one time limit and never
  stalls the stage. A group goes to the workers as one request per worker (a contiguous
  slice of its samples); replies come back per sample, each timed on its own. Specs are imported in a worker before the timer starts (``load``), so
  import time never counts against a sample. Worker start and spec loading have their own
  limit (``WORKER_START_TIMEOUT_S``).
- ``inline``: functions run on the calling thread with no time limit; only for trusted,
  fast functions (tests, benchmarks).
- ``auto``: specs in ``stages.tasks.LINEAR_TIME_REWARDS`` (built-in string comparisons that
  cannot hang) run inline, every other spec in the worker pool, which starts only once a
  group needs it.

Failure behaviour: never raises for anything a rollout or a reward function does. A
function that raises, returns a non-finite or non-numeric value, hangs, or kills its
worker gives that sample reward 0.0 and an error text in ``ScoredGroup.reward_errors``
(entry ``""`` for samples scored fine), counted in ``counters`` by kind and logged (the
first ``LOG_FIRST_ERRORS`` errors, then every ``LOG_EVERY_NTH_ERROR``-th). A spec that
cannot be resolved gives every sample of its groups an error; the resolution failure is
cached so it is not retried per sample. Specs listed in ``config.tasks`` are resolved at
``start()``, which raises ``TaskSpecError`` for a bad one (a configuration error).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from typing import Any

import msgspec
import numpy as np
import structlog

from schemas.messages import Rollout, ScoredGroup
from stages.reward.worker import check_reward_value, describe_exception
from stages.tasks import LINEAR_TIME_REWARDS, RewardFn, TaskSpecError, resolve_reward_fn

WORKER_START_TIMEOUT_S = 60.0
"""Limit for a worker process to start and import a spec: spawn + imports (math_verify pulls
in sympy, ~2 s) on a loaded 2-core machine; separate from the per-sample limit."""

WORKER_JOIN_TIMEOUT_S = 2.0
"""Wait for a SIGKILLed worker to be reaped; the kernel frees it in milliseconds."""

LOG_FIRST_ERRORS = 20
"""Errors logged one by one before logging thins out (a broken function fails every sample)."""

LOG_EVERY_NTH_ERROR = 100
"""After the first ``LOG_FIRST_ERRORS``, one error in this many is logged (all are counted)."""

WORKER_COMMAND = "import sys; from stages.reward.worker import serve_fd; serve_fd(int(sys.argv[1]))"
"""Program of a worker interpreter (``-c``: no main module of the stage is re-imported)."""

log = structlog.get_logger("stages.reward")


ISOLATIONS = ("process", "inline", "auto")
"""Values of ``RewardConfig.isolation``."""


class RewardConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Configuration of the reward stage (the ``[reward]`` table of a stack file)."""

    rewards: dict[str, str] = {}
    """Task name → reward spec (built-in task name or ``package.module:attr``); tasks not
    listed use their own name as the spec."""
    tasks: list[str] = []
    """Task names expected in the stream: their specs are resolved at ``start()`` (bad spec →
    error at start) and imported in every worker before any sample is timed."""
    sample_timeout_s: float = 5.0
    """Per-sample limit on a reward function (process isolation only)."""
    num_workers: int = 2
    """Worker processes (samples of a group are scored in parallel across them)."""
    isolation: str = "process"
    """``process`` (killable worker interpreters, time limit), ``inline`` (no limit;
    trusted code only) or ``auto`` (inline for the built-in linear-time rewards, else
    process)."""


class _WorkerFailure(Exception):
    """A worker that could not start, load a spec or reply; the sample gets an error."""


class _UnresolvedSpec(Exception):
    """The worker could not resolve the reward spec (its error text is the message)."""


class _ProcessWorker:
    """One child interpreter running ``stages.reward.worker``; restarted after a kill or death."""

    def __init__(self, preload: list[str]) -> None:
        self._preload = preload
        self._process: subprocess.Popen | None = None
        self._conn: Any = None
        self._ready = False
        self._loaded: set[str] = set()
        self.restarts = 0

    def start(self) -> None:
        parent_conn, child_conn = multiprocessing.Pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)))
        self._process = subprocess.Popen(
            [sys.executable, "-c", WORKER_COMMAND, str(child_conn.fileno())],
            pass_fds=(child_conn.fileno(),), env=env, stdin=subprocess.DEVNULL)
        child_conn.close()
        self._conn, self._ready, self._loaded = parent_conn, False, set()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def kill(self) -> None:
        """SIGKILL this worker's process by pid and reap it."""
        if self._process is None:
            return
        if self._process.poll() is None:
            try:
                os.kill(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self._process.wait(WORKER_JOIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("reward_worker_not_reaped", pid=self._process.pid)
        self._conn.close()
        self._process = None

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            try:
                self._conn.send(None)
            except OSError:
                pass
        self.kill()

    async def _reply(self, timeout: float) -> tuple[str, Any]:
        """Next reply; ``TimeoutError`` after ``timeout``; ``_WorkerFailure`` if it died."""
        if not self._conn.poll(0):
            loop = asyncio.get_running_loop()
            readable = loop.create_future()
            fd = self._conn.fileno()
            loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
            try:
                await asyncio.wait_for(readable, timeout)
            finally:
                loop.remove_reader(fd)
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            try:
                code = self._process.wait(WORKER_JOIN_TIMEOUT_S) if self._process is not None else None
            except subprocess.TimeoutExpired:
                code = None
            self.restart()
            raise _WorkerFailure(f"worker died (exit code {code})") from exc

    async def _request(self, request: tuple, timeout: float, what: str) -> tuple[str, Any]:
        try:
            self._conn.send(request)
        except OSError as exc:
            self.restart()
            raise _WorkerFailure(f"worker died before {what}: {describe_exception(exc)}") from exc
        try:
            return await self._reply(timeout)
        except TimeoutError:
            self.restart()
            raise

    async def ensure_spec(self, spec: str) -> str | None:
        """Start (if needed) and load ``spec``; returns the resolution error text, if any."""
        try:
            if not self._ready:
                try:
                    status, _ = await self._reply(WORKER_START_TIMEOUT_S)
                except TimeoutError:
                    self.restart()
                    raise
                self._ready = status == "ready"
                for preload in self._preload:
                    await self._load(preload)
            if spec not in self._loaded:
                return await self._load(spec)
        except TimeoutError as exc:  # the worker was already replaced where the wait timed out
            raise _WorkerFailure(f"worker did not start or load {spec!r} within "
                                 f"{WORKER_START_TIMEOUT_S:g} s") from exc
        return None

    async def _load(self, spec: str) -> str | None:
        status, payload = await self._request(("load", spec), WORKER_START_TIMEOUT_S, f"loading {spec!r}")
        if status == "ok":
            self._loaded.add(spec)
            return None
        return str(payload)

    async def score_many(self, spec: str, texts: list[str], answer: str, timeout: float) -> list[tuple[float, str]]:
        """``(reward, error)`` per text, one request for all of them; each sample still has
        its own ``timeout`` (from the previous reply). A sample that times out or kills the
        worker gets its error; the worker is replaced and the rest are sent again."""
        results: list[tuple[float, str]] = []
        while len(results) < len(texts):
            pending = texts[len(results):]
            try:
                load_error = await self.ensure_spec(spec)
            except _WorkerFailure as exc:
                if not results:
                    raise
                return results + [(0.0, f"worker failure: {exc}")] * len(pending)
            if load_error is not None:
                raise _UnresolvedSpec(load_error)
            pid = self.pid
            try:
                self._conn.send(("score_many", spec, pending, answer))
            except OSError as exc:
                self.restart()
                raise _WorkerFailure(f"worker died before scoring: {describe_exception(exc)}") from exc
            for _ in pending:
                try:
                    status, payload = await self._reply(timeout)
                except TimeoutError:
                    self.restart()
                    results.append((0.0, f"timeout: reward {spec!r} gave no result within {timeout:g} s "
                                         f"(worker pid {pid} killed and replaced)"))
                    break
                except _WorkerFailure as exc:  # _reply replaced the dead worker
                    results.append((0.0, f"worker failure: {exc}"))
                    break
                results.append((float(payload), "") if status == "ok" else (0.0, str(payload)))
        return results

    async def score(self, spec: str, completion_text: str, answer: str, timeout: float) -> float:
        """Reward of one sample; raises ``TimeoutError``, ``_WorkerFailure`` or ``ValueError``
        (the function's own error text)."""
        pid = self.pid
        try:
            status, payload = await self._request(("score", spec, completion_text, answer), timeout, "scoring")
        except TimeoutError:
            raise TimeoutError(f"timeout: reward {spec!r} gave no result within {timeout:g} s "
                               f"(worker pid {pid} killed and replaced)") from None
        if status != "ok":
            raise ValueError(str(payload))
        return float(payload)


def completion_text(tokenizer: Any, token_ids: Any) -> str:
    """The text a reward function judges: one trailing EOS (the stop) removed, every other
    token rendered, special ones included (``<pad>``, ``<unk>``...). Skipping specials
    would let a policy pad a correct answer with invisible tokens and still score 1."""
    from stages.model import EOS_ID

    ids = np.asarray(token_ids).tolist()
    if ids and ids[-1] == EOS_ID:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


class RewardScorer:
    """Reward stage logic; see the module docstring for guarantees."""

    def __init__(self, config: RewardConfig | None = None, *, tokenizer: Any = None) -> None:
        self.config = config or RewardConfig()
        if self.config.isolation not in ISOLATIONS:
            raise ValueError(f"reward config: isolation must be one of {', '.join(ISOLATIONS)}, "
                             f"got {self.config.isolation!r}")
        if self.config.num_workers < 1 or self.config.sample_timeout_s <= 0:
            raise ValueError("reward config: num_workers ≥ 1 and sample_timeout_s > 0 required")
        if tokenizer is None:
            from stages.model import load_tokenizer

            tokenizer = load_tokenizer()
        self._tokenizer = tokenizer
        self._workers: list[_ProcessWorker] = []
        self._idle: asyncio.Queue[_ProcessWorker] | None = None
        self._inline_functions: dict[str, RewardFn] = {}
        self._preload: list[str] = []
        """Specs every worker imports before timing a sample (those not scored inline)."""
        self._bad_specs: dict[str, str] = {}
        self.counters: dict[str, int] = {
            "groups": 0, "samples": 0, "errors": 0, "exceptions": 0, "timeouts": 0,
            "worker_failures": 0, "unresolved_spec": 0,
        }
        self.reward_seconds = 0.0
        """Wall time spent inside ``score`` (sum over groups)."""

    def spec_for(self, task: str) -> str:
        """Reward spec used for samples of ``task``."""
        return self.config.rewards.get(task, task)

    async def start(self) -> None:
        """Resolve the configured task specs and start the workers (``score`` calls this
        lazily). Raises ``TaskSpecError`` for a configured spec that does not resolve."""
        if self._idle is not None:
            return
        preload = list(dict.fromkeys(self.spec_for(task) for task in self.config.tasks))
        for spec in preload:
            resolve_reward_fn(spec)  # fail fast, in the stage, on a configuration error
        self._preload = [spec for spec in preload if not self.runs_inline(spec)]
        self._idle = asyncio.Queue()
        if self.config.isolation == "process" or self._preload:
            self._start_workers()

    def runs_inline(self, spec: str) -> bool:
        """Whether samples of ``spec`` are scored on this thread (see ``isolation``)."""
        return self.config.isolation == "inline" or (
            self.config.isolation == "auto" and spec in LINEAR_TIME_REWARDS)

    def _start_workers(self) -> None:
        assert self._idle is not None
        for _ in range(self.config.num_workers):
            worker = _ProcessWorker(self._preload)
            worker.start()
            self._workers.append(worker)
            self._idle.put_nowait(worker)

    async def close(self) -> None:
        """Stop every worker process (idempotent)."""
        for worker in self._workers:
            worker.close()
        self._workers.clear()
        self._idle = None

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.pid is not None]

    @property
    def worker_restarts(self) -> int:
        return sum(w.restarts for w in self._workers)

    async def score(self, rollout: Rollout) -> ScoredGroup:
        """One ``ScoredGroup`` for ``rollout``, every sample scored or errored; never raises."""
        await self.start()
        started = time.perf_counter()
        spec = self.spec_for(rollout.group.task)
        answer = rollout.group.answer
        texts = [completion_text(self._tokenizer, s.token_ids) for s in rollout.samples]
        if self.runs_inline(spec) or spec in self._bad_specs or not texts:
            results = [await self._score_one(spec, text, answer) for text in texts]
        else:  # one request per worker: contiguous slices of the group, scored in parallel
            if not self._workers:  # auto isolation: the first spec that needs workers
                self._start_workers()
            n = min(self.config.num_workers, len(texts))
            bounds = [len(texts) * i // n for i in range(n + 1)]
            chunks = await asyncio.gather(*(self._score_chunk(spec, texts[a:b], answer)
                                            for a, b in zip(bounds, bounds[1:])))
            results = [r for chunk in chunks for r in chunk]
        rewards = np.asarray([reward for reward, _ in results], dtype=np.float32)
        errors = [error for _, error in results]
        self.counters["groups"] += 1
        self.counters["samples"] += len(texts)
        for index, error in enumerate(errors):
            if error:
                self._count_error(rollout.group.group_id, index, spec, error)
        self.reward_seconds += time.perf_counter() - started
        return ScoredGroup(rollout, rewards, errors)

    async def _score_one(self, spec: str, completion_text: str, answer: str) -> tuple[float, str]:
        if spec in self._bad_specs:
            return 0.0, self._bad_specs[spec]
        if self.runs_inline(spec):
            return self._score_inline(spec, completion_text, answer)
        assert self._idle is not None
        worker = await self._idle.get()
        try:
            load_error = await worker.ensure_spec(spec)
            if load_error is not None:
                self._bad_specs[spec] = f"unresolved reward spec: {load_error}"
                return 0.0, self._bad_specs[spec]
            return await worker.score(spec, completion_text, answer, self.config.sample_timeout_s), ""
        except TimeoutError as exc:
            return 0.0, str(exc)
        except (_WorkerFailure, ValueError) as exc:
            return 0.0, str(exc) if isinstance(exc, ValueError) else f"worker failure: {exc}"
        finally:
            if self._idle is not None:
                self._idle.put_nowait(worker)

    async def _score_chunk(self, spec: str, texts: list[str], answer: str) -> list[tuple[float, str]]:
        assert self._idle is not None
        worker = await self._idle.get()
        try:
            return await worker.score_many(spec, texts, answer, self.config.sample_timeout_s)
        except _UnresolvedSpec as exc:
            self._bad_specs[spec] = f"unresolved reward spec: {exc}"
            return [(0.0, self._bad_specs[spec])] * len(texts)
        except _WorkerFailure as exc:  # could not start, load or take the request
            return [(0.0, f"worker failure: {exc}")] * len(texts)
        finally:
            if self._idle is not None:
                self._idle.put_nowait(worker)

    def _score_inline(self, spec: str, completion_text: str, answer: str) -> tuple[float, str]:
        function = self._inline_functions.get(spec)
        if function is None:
            try:
                function = self._inline_functions[spec] = resolve_reward_fn(spec)
            except TaskSpecError as exc:
                self._bad_specs[spec] = f"unresolved reward spec: {exc}"
                return 0.0, self._bad_specs[spec]
        try:
            return check_reward_value(function(completion_text, answer)), ""
        except Exception as exc:  # user code: becomes the sample's error, never the stage's
            return 0.0, describe_exception(exc)

    def _count_error(self, group_id: str, index: int, spec: str, error: str) -> None:
        self.counters["errors"] += 1
        if error.startswith("timeout:"):
            self.counters["timeouts"] += 1
        elif error.startswith("worker failure:"):
            self.counters["worker_failures"] += 1
        elif error.startswith("unresolved reward spec:"):
            self.counters["unresolved_spec"] += 1
        else:
            self.counters["exceptions"] += 1
        count = self.counters["errors"]
        if count <= LOG_FIRST_ERRORS or count % LOG_EVERY_NTH_ERROR == 0:
            log.warning("reward_error", group_id=group_id, sample=index, reward=spec, error=error,
                        errors_so_far=count)

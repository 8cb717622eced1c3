"""Fakes and builders shared by every test (and by benchmarks); never imported by stages.

Engineers append builders here rather than copying them into test files.
"""

from __future__ import annotations

import numpy as np

from schemas.messages import PromptGroup, Rollout, Sample, ScoredGroup, TrainGroup


def make_prompt_group(group_id: str = "g0", prompt_len: int = 8, n_samples: int = 4, *,
                      answer: str = "", task: str = "repeat", version: int = 0, seed: int = 0) -> PromptGroup:
    rng = np.random.default_rng(seed)
    return PromptGroup(group_id, rng.integers(3, 95, prompt_len, dtype=np.int32), answer, task,
                       n_samples, version)


def make_sample(length: int = 16, *, version: int = 0, seed: int = 0, finish_reason: str = "stop") -> Sample:
    rng = np.random.default_rng(seed)
    return Sample(
        token_ids=rng.integers(3, 95, length, dtype=np.int32),
        logprobs=-rng.random(length, dtype=np.float32),
        version_spans=np.array([[0, version]], dtype=np.int32),
        finish_reason=finish_reason,
    )


def make_rollout(group_id: str = "g0", n_samples: int = 4, length: int = 16, *, version: int = 0,
                 seed: int = 0, prompt_len: int = 8, answer: str = "") -> Rollout:
    group = make_prompt_group(group_id, prompt_len, n_samples, answer=answer, version=version, seed=seed)
    samples = [make_sample(length, version=version, seed=seed * 1000 + i) for i in range(n_samples)]
    return Rollout(group, samples, "rollout/0")


def make_train_group(group_id: str = "g0", n_samples: int = 4, length: int = 16, *, version: int = 0,
                     seed: int = 0, rewards: np.ndarray | None = None, with_ref: bool = False) -> TrainGroup:
    rollout = make_rollout(group_id, n_samples, length, version=version, seed=seed)
    if rewards is None:
        rewards = np.random.default_rng(seed).random(n_samples, dtype=np.float32)
    ref = [s.logprobs.copy() for s in rollout.samples] if with_ref else None
    return TrainGroup(ScoredGroup(rollout, np.asarray(rewards, np.float32)), ref)


def messages_equal(a, b) -> bool:
    """Structural equality of messages, comparing arrays by dtype, shape and value."""
    import msgspec

    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())
    if isinstance(a, msgspec.Struct):
        return type(a) is type(b) and all(messages_equal(getattr(a, f), getattr(b, f)) for f in a.__struct_fields__)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(messages_equal(x, y) for x, y in zip(a, b))
    return a == b


class FakeClock:
    """Manually advanced clock for stages that take ``clock=`` (call it for the time)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _world_entry(rank, world, port, fn, args, q):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        q.put((rank, fn(*args)))
    except BaseException as e:  # report, don't hang the parent
        q.put((rank, e))
        raise
    finally:
        dist.destroy_process_group()


def run_world(fn, world: int, *args, timeout: float = 240.0) -> list:
    """Run ``fn(*args)`` on ``world`` spawned gloo ranks; returns results by rank.
    ``fn`` must be importable (module level) and return picklable values."""
    import torch.multiprocessing as mp

    from pipeline.endpoints import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_world_entry, args=(r, world, port, fn, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(q.get(timeout=timeout) for _ in range(world))
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    for r, v in results.items():
        if isinstance(v, BaseException):
            raise RuntimeError(f"rank {r} failed: {v!r}") from v
    return [results[r] for r in range(world)]


# --------------------------------------------------------------------------- fake stages
# Tiny stage bodies (``async run(ctx)``) for supervisor tests: ``pipeline.stage`` runs them
# as ``stages.testing:fake_source`` etc. Knobs come from the environment the supervisor
# passes on: FAKE_ITEMS (groups the source sends; 0 = endless), FAKE_WORK_S (per item).

FAKE_NEXT = {"rollout": ("prompts", "rollouts"), "reward": ("rollouts", "scored"), "logprob": ("scored", "train")}


async def fake_source(ctx) -> None:
    import asyncio
    import json
    import os

    n = int(os.environ.get("FAKE_ITEMS", "0"))
    out = ctx.work_out("prompts")
    i = 0
    with open(ctx.run_dir / "fake_sent.jsonl", "a") as log:
        while (n == 0 or i < n) and not ctx.draining.is_set():
            await out.send(make_prompt_group(f"f{i}", n_samples=1))
            log.write(json.dumps(f"f{i}") + "\n")
            log.flush()
            ctx.processed += 1
            i += 1
            if n == 0:
                await asyncio.sleep(0.01)
    await ctx.draining.wait()


async def fake_worker(ctx) -> None:
    """Passes work along its stream (by stage kind), wrapping it in the next message type."""
    import asyncio
    import os

    work_s = float(os.environ.get("FAKE_WORK_S", "0.005"))
    src, dst = FAKE_NEXT[ctx.kind]
    inbox, out = ctx.work_in(src), ctx.work_out(dst)
    async for msg in ctx.consume(inbox):
        await asyncio.sleep(work_s)
        if ctx.kind == "rollout":
            nxt = Rollout(msg, [], ctx.name)
        elif ctx.kind == "reward":
            nxt = ScoredGroup(msg, np.zeros(0, np.float32))
        else:
            nxt = TrainGroup(msg)
        await out.send(nxt)
        ctx.processed += 1


async def fake_sink(ctx) -> None:
    """Learner stand-in: records every group id it receives; Metrics every 5 groups."""
    import json

    inbox = ctx.work_in("train")
    n = 0
    with open(ctx.run_dir / "fake_received.jsonl", "a") as log:
        async for msg in ctx.consume(inbox):
            log.write(json.dumps(msg.scored.rollout.group.group_id) + "\n")
            log.flush()
            n += 1
            ctx.processed += 1
            if n % 5 == 0:
                await ctx.metrics(n // 5, {"reward_mean": 0.0, "samples_per_s": 0.0,
                                           "weight_version": float(n // 5), "staleness_mean": 0.0})


async def fake_idle(ctx) -> None:
    await ctx.draining.wait()


FAKE_TARGETS = {"source": "stages.testing:fake_source", "rollout": "stages.testing:fake_worker",
                "reward": "stages.testing:fake_worker", "logprob": "stages.testing:fake_worker",
                "learner": "stages.testing:fake_sink", "publisher": "stages.testing:fake_idle"}


async def wait_until(cond, timeout: float, what: str, poll_s: float = 0.1) -> None:
    """Poll ``cond()`` until true; AssertionError naming ``what`` after ``timeout`` seconds."""
    import asyncio
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        await asyncio.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


async def fake_crash(ctx) -> None:
    """Fails as soon as it starts (the process exits 1): a crash loop for the restart limit."""
    raise RuntimeError("fake crash")


async def fake_hang_once(ctx) -> None:
    """First incarnation (no ``fake_hung`` marker in the run dir): opens its work stream
    (so it is past starting), starts a child process (an engine core stand-in, pid in the
    marker), beats for a moment, then blocks its event loop so its heartbeats stop. Later
    incarnations are ``fake_worker``."""
    import asyncio
    import subprocess
    import sys
    import time

    marker = ctx.run_dir / f"fake_hung-{ctx.kind}-{ctx.replica}"
    if marker.exists():
        await fake_worker(ctx)
        return
    ctx.work_in(FAKE_NEXT[ctx.kind][0], credit=1)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    marker.write_text(str(child.pid))
    await asyncio.sleep(1.5)
    time.sleep(3600)  # blocks the loop: no heartbeat until the supervisor kills us


async def fake_slow_start(ctx) -> None:
    """Beats, then holds its event loop for ``FAKE_START_S`` seconds before opening any
    channel (an engine build that blocks), then works as ``fake_worker``."""
    import asyncio
    import os
    import time

    await asyncio.sleep(0.5)
    time.sleep(float(os.environ.get("FAKE_START_S", "8")))
    await fake_worker(ctx)


# --------------------------------------------------------------------------- weight transports
def weight_params(seed: int, name: str = "tiny") -> dict:
    """A model's parameters as the learner publishes them (detached, CPU)."""
    from stages.model import build_model

    return {n: p.detach() for n, p in build_model(name, seed=seed).named_parameters()}


def weight_engine_process(name: str, offers, acks, stall: tuple[int, float] | None = None,
                          device: str = "cpu") -> None:
    """An engine process for weight-transport tests (spawn target): a tiny ``TorchEngine``
    generating continuously while a ``WeightLoader`` applies each offer from ``offers`` (a
    queue; ``None`` ends it). Puts ``(name, "ready", None, None)`` on ``acks`` once generating,
    ``(name, ack, live_version, differing_names)`` after each offer, and finally ``(name, "spans", [version_spans of every completion])``.
    ``stall=(version, seconds)``: while loading that version, the second bucket's broadcast
    starts ``seconds`` late (an engine that stalls mid-update). ``device``: the engine's."""
    import asyncio

    import torch

    from stages.model import build_model
    from stages.publisher.collective import BroadcastGroup
    from stages.rollout.engines.base import SamplingParams
    from stages.rollout.engines.torch_engine import TorchEngine
    from stages.rollout.weights import WeightLoader

    torch.set_num_threads(1)
    original = BroadcastGroup.broadcast

    async def main() -> None:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        engine = TorchEngine(build_model("tiny", seed=0, device=device), device=device, max_batch=8)
        loader = WeightLoader(engine, name)
        spans: list = []
        stop = asyncio.Event()

        async def generate_forever() -> None:
            i = 0
            while not stop.is_set():
                [c] = await engine.generate(f"{name}-{i}", [1, 5, 6], SamplingParams(max_tokens=12, seed=i))
                spans.append(c.version_spans)
                i += 1

        gen = asyncio.get_running_loop().create_task(generate_forever())
        acks.put((name, "ready", None, None))
        while True:
            offer = await asyncio.to_thread(offers.get)
            if offer is None:
                break
            calls = [0]
            if stall is not None and offer.manifest.version == stall[0]:
                def stalling(self, t, src=0):
                    calls[0] += 1
                    if calls[0] == 2:
                        import time

                        time.sleep(stall[1])
                    return original(self, t, src)

                BroadcastGroup.broadcast = stalling
            try:
                ack = await loader.apply(offer)
            finally:
                BroadcastGroup.broadcast = original
            expected = weight_params(offer.manifest.version + 40)  # the tests publish seed = version + 40
            got = dict(engine.model.named_parameters())
            differing = [n for n in expected if not torch.equal(expected[n], got[n].cpu())]
            acks.put((name, ack, engine.weight_version, differing))
        stop.set()
        await gen
        loader.close()
        await engine.stop()
        acks.put((name, "spans", spans))

    asyncio.run(main())


class FakeAsyncLLM:
    """Stands in for vLLM's ``AsyncLLM`` in CPU tests of ``VllmEngine``'s lifecycle: answers
    the worker-extension RPCs the engine makes (``conveyor_*``) and records them, pauses and
    resumes like the engine core. ``fail_rpc`` names an RPC that raises."""

    built: list["FakeAsyncLLM"] = []
    next_fail_rpc: str | None = None
    """``fail_rpc`` of the next instance ``from_engine_args`` builds."""

    def __init__(self, fail_rpc: str | None = None) -> None:
        self.rpcs: list[str] = []
        self.paused = False
        self.shut_down = False
        self.fail_rpc = fail_rpc
        self.engine_core = self
        FakeAsyncLLM.built.append(self)

    @classmethod
    def from_engine_args(cls, args) -> "FakeAsyncLLM":
        return cls(fail_rpc=cls.next_fail_rpc)

    async def collective_rpc(self, method: str, args: tuple = ()) -> list:
        self.rpcs.append(method)
        if method == self.fail_rpc:
            raise RuntimeError(f"{method} failed (fake)")
        if method == "conveyor_describe":
            return [{"fast": False, "params": []}]
        if method == "conveyor_load_ipc":
            import msgspec

            from schemas.messages import WeightManifest

            manifest = msgspec.msgpack.decode(args[0], type=WeightManifest)
            return [[b.digest for b in manifest.buckets]]
        return [None]

    async def pause_scheduler_async(self, mode: str = "keep", clear_cache: bool = False) -> None:
        self.paused = True

    async def resume_scheduler_async(self) -> None:
        self.paused = False

    def shutdown(self) -> None:
        self.shut_down = True


class FakeCudaBuckets:
    """``CudaBuckets`` without CUDA: the manifest of the state, no handles."""

    def __init__(self, state) -> None:
        self.state = state

    def fill(self, state, version: int):
        from stages.publisher.manifest import plan

        return plan(state, version)

    def handles(self) -> list:
        return []


def install_fake_vllm(monkeypatch) -> None:
    """Make ``VllmEngine.start`` build ``FakeAsyncLLM`` and load seeded weights on the CPU."""
    import sys
    import types

    import stages.rollout.engines.vllm_engine as vllm_engine
    from stages.model import build_model

    for name in ("vllm", "vllm.engine", "vllm.v1", "vllm.v1.engine"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    arg_utils = types.ModuleType("vllm.engine.arg_utils")
    arg_utils.AsyncEngineArgs = lambda **kw: kw
    async_llm = types.ModuleType("vllm.v1.engine.async_llm")
    async_llm.AsyncLLM = FakeAsyncLLM
    monkeypatch.setitem(sys.modules, "vllm.engine.arg_utils", arg_utils)
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.async_llm", async_llm)
    monkeypatch.setattr(vllm_engine, "CudaBuckets", FakeCudaBuckets)
    monkeypatch.setattr(vllm_engine, "build_model", lambda name, dtype=None, device=None, seed=0: build_model(
        "tiny", seed=seed))
    monkeypatch.setattr(vllm_engine, "write_model_dir", lambda name, dtype: "/nonexistent")
    FakeAsyncLLM.built = []
    FakeAsyncLLM.next_fail_rpc = None


def load_bench(script: str):
    """``ops/bench/<script>`` imported as a module (the bench scripts are not a package), for
    tests of their pure helpers."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "ops" / "bench" / script
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(script: str, *args: str, timeout: float = 300.0) -> str:
    """Output (stdout + stderr) of ``python ops/bench/<script> *args`` run from the repo
    root; fails the calling test with the output's tail when it exits non-zero."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "ops" / "bench" / script), *args],
                       capture_output=True, text=True, timeout=timeout, cwd=root)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    return out

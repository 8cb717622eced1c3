"""Weight publishing under faults, with the real publisher and rollout stage processes.

The test process plays the supervisor's part (work broker, control, telemetry sink) and
learner rank 0 (``ShmSender`` → ``WeightsOffer`` on ``publish``); ``pipeline.stage publisher``
and ``pipeline.stage rollout`` run as child processes, found and killed by pid.
"""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import transport
from pipeline import endpoints as ep
from pipeline.runtime import SPAWNED_AT_VAR, SUPERVISOR_PID_VAR, write_stack
from schemas.messages import Rollout, RolloutBatch, WeightsReady
from schemas.stack import load_stack
from stages.publisher.senders import ShmSender
from stages.publisher.shm import ShmWeightReader, TornRead, remove_run_slots, run_slot_id
from stages.testing import make_prompt_group, wait_until, weight_params
from transport.workqueue import WorkBroker

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

KILLED_WRITER = """
import sys, time
from stages.publisher.shm import ShmWeightWriter
w = ShmWeightWriter(sys.argv[1])
with w.slot(3, 1 << 20) as dst:
    dst[: 1 << 19] = 7
    print(w.path_of(3), flush=True)
    time.sleep(120)  # killed here, mid-write
"""


def spawn(kind: str, run_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env[SUPERVISOR_PID_VAR] = str(os.getpid())
    env[SPAWNED_AT_VAR] = repr(time.time())
    log = open(run_dir / f"{kind}-{time.time():.0f}.out", "w")
    return subprocess.Popen([sys.executable, "-m", "pipeline.stage", kind, "--run-dir", str(run_dir)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


async def test_publisher_killed_mid_update_and_writer_killed_mid_write_engine_keeps_serving(tmp_path):
    run_dir = tmp_path / "run"
    stack = load_stack(ROOT / "ops" / "stack.toml")
    stack.run.dir = str(run_dir)
    stack.rollout.replicas = 1
    stack.publisher.deadline_s = 5.0
    endpoints = ep.assign(stack)
    ep.save(run_dir, endpoints)
    write_stack(run_dir, stack)
    run_id = run_slot_id(stack.run.name, run_dir)

    broker = WorkBroker("prompts", endpoints["prompts.front"], endpoints["prompts.back"])
    broker.start()
    prompts = transport.push(endpoints["prompts.front"], bind=False, sender="source/0")
    rollouts_in = transport.pull(endpoints["rollouts.front"], bind=True, sender="reward/0")
    telemetry = transport.pull(endpoints["telemetry"], bind=True, sender="supervisor")
    control = transport.pub(endpoints["control"], endpoints["control.sync"], sender="supervisor")
    offers = transport.push(endpoints["publish"], bind=False, sender="learner/0")
    received: list[tuple[float, list[int]]] = []  # (arrival, versions of the rollout's tokens)
    ready: list[int] = []
    procs: list[subprocess.Popen] = []
    tasks: list[asyncio.Task] = []

    async def feed() -> None:
        i = 0
        while True:
            while i - len(received) < 8:
                await prompts.send(make_prompt_group(f"p{i}", prompt_len=3, n_samples=4, seed=i))
                i += 1
            await asyncio.sleep(0.01)

    async def collect() -> None:
        async for msg in rollouts_in:  # the groups one engine step finished come as one RolloutBatch
            for r in msg.rollouts if isinstance(msg, RolloutBatch) else [msg] if isinstance(msg, Rollout) else []:
                assert all(s.finish_reason in ("stop", "length") for s in r.samples)
                received.append((time.monotonic(), sorted({int(v) for s in r.samples for v in s.version_spans[:, 1]})))

    async def drain_telemetry() -> None:
        async for _ in telemetry:
            pass

    async def follow_ready(sub) -> None:
        async for msg in sub:
            if isinstance(msg, WeightsReady):
                ready.append(msg.version)

    def versions_since(t: float) -> set[int]:
        return {v for at, vs in received if at >= t for v in vs}

    async def publish(sender: ShmSender, version: int) -> None:
        await offers.send(sender.stage(weight_params(version + 40), version))

    first = ShmSender(run_id, deadline_s=stack.publisher.deadline_s)
    restarted: ShmSender | None = None
    loop = asyncio.get_running_loop()
    try:
        tasks += [loop.create_task(feed()), loop.create_task(collect()), loop.create_task(drain_telemetry())]
        publisher = spawn("publisher", run_dir)
        procs.append(publisher)
        sub = transport.sub(endpoints["weights"], endpoints["weights.sync"], sender="observer",
                            topics=("weights_ready",))
        await sub.ready(120)
        tasks.append(loop.create_task(follow_ready(sub)))
        procs.append(spawn("rollout", run_dir))
        await wait_until(lambda: len(received) >= 5, 180, "first rollouts")

        await publish(first, 1)
        await wait_until(lambda: 1 in ready, 60, "version 1 ready")
        t1 = time.monotonic()
        await wait_until(lambda: 1 in versions_since(t1), 60, "rollouts on version 1")

        # The publisher dies holding offer 2: stopped, offer sent, killed by pid.
        os.kill(publisher.pid, signal.SIGSTOP)
        await publish(first, 2)
        await asyncio.sleep(0.5)
        os.kill(publisher.pid, signal.SIGKILL)
        assert publisher.wait(10) == -signal.SIGKILL
        t_dead = time.monotonic()
        n_dead = len(received)
        await wait_until(lambda: len(received) >= n_dead + 10, 60, "rollouts while the publisher is dead")

        # A learner process dies in the middle of writing version 3 into its slot.
        child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, run_id], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        torn_path = await asyncio.to_thread(child.stdout.readline)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        with pytest.raises(TornRead, match="seq"):
            ShmWeightReader().read(torn_path.strip(), 3)
        await asyncio.sleep(1.0)
        assert max(versions_since(t_dead)) == 1, "generation moved off version 1 without a publisher"

        # Restarted publisher and restarted learner (a new writer instance): the next version applies.
        publisher = spawn("publisher", run_dir)
        procs.append(publisher)
        restarted = ShmSender(run_id, deadline_s=stack.publisher.deadline_s)
        await asyncio.sleep(3.0)  # the new PUB is bound and the engine's SUB reconnected
        for _ in range(3):  # a reconnecting SUB may miss the very first broadcast
            await publish(restarted, 4)
            try:
                await wait_until(lambda: 4 in ready, 20, "version 4 ready from the restarted publisher")
                break
            except AssertionError:
                continue
        assert 4 in ready
        t4 = time.monotonic()
        await wait_until(lambda: 4 in versions_since(t4), 60, "rollouts on version 4")
        assert not Path(torn_path.strip()).exists()  # the restarted writer removed older instances' files
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        for t in tasks:
            t.cancel()
        for ch in (prompts, rollouts_in, telemetry, control, offers):
            ch.close()
        broker.close()
        first.close()
        if restarted is not None:
            restarted.close()
        remove_run_slots(run_id)
    seen = {v for _, vs in received for v in vs}
    assert 2 not in seen and 3 not in seen and {1, 4} <= seen

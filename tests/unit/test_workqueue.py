"""Credit-based work queue: load balancing, back-pressure, drain without loss."""

import asyncio

import numpy as np
import pytest

import transport
from schemas import messages as m
from transport.workqueue import WORKER_CREDIT, WorkBroker, WorkPuller


async def _broker(hwm=64):
    b = WorkBroker("t", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", hwm=hwm)
    b.start()
    return b


async def test_items_spread_over_workers_and_none_lost():
    broker = await _broker()
    push = transport.push(broker.front_address, bind=False, sender="src/0")
    workers = [WorkPuller(broker.back_address, sender=f"w/{i}") for i in range(3)]
    got: dict[int, list[int]] = {i: [] for i in range(3)}

    async def work(i):
        while True:
            msg = await workers[i].recv()
            got[i].append(msg.step)
            await asyncio.sleep(0.001)

    tasks = [asyncio.create_task(work(i)) for i in range(3)]
    for s in range(90):
        await push.send(m.Progress(s, 0, []))
    for _ in range(200):
        if sum(map(len, got.values())) == 90:
            break
        await asyncio.sleep(0.02)
    for t in tasks:
        t.cancel()
    for w in workers:
        w.close()
    push.close()
    broker.close()
    assert sorted(x for v in got.values() for x in v) == list(range(90))
    assert all(len(v) >= 10 for v in got.values()), {k: len(v) for k, v in got.items()}
    for v in got.values():
        assert v == sorted(v)  # each worker sees the stream in order


async def test_drain_finishes_held_items_and_loses_nothing():
    broker = await _broker()
    push = transport.push(broker.front_address, bind=False, sender="src/0")
    a = WorkPuller(broker.back_address, sender="w/a")
    b = WorkPuller(broker.back_address, sender="w/b")
    for s in range(40):
        await push.send(m.Progress(s, 0, []))
    seen = [(await a.recv()).step for _ in range(5)]
    a.drain()
    while True:  # a finishes what it was granted, then reports drained
        try:
            seen.append((await asyncio.wait_for(a.recv(), 5)).step)
        except EOFError:
            break
    assert a.outstanding == 0
    rest = [(await asyncio.wait_for(b.recv(), 5)).step for _ in range(40 - len(seen))]
    for c in (a, b, push):
        c.close()
    broker.close()
    assert sorted(seen + rest) == list(range(40))


async def test_a_worker_holds_at_most_its_credit_and_queue_is_bounded():
    broker = await _broker(hwm=8)
    push = transport.push(broker.front_address, bind=False, sender="src/0", hwm=4)
    w = WorkPuller(broker.back_address, sender="w/0")
    sent = 0

    async def produce():
        nonlocal sent
        for s in range(200):  # 256 KiB items: far more than socket buffers hold
            await push.send(m.PromptGroup(str(s), np.zeros(1 << 16, np.int32), "", "t", 1, 0))
            sent += 1

    task = asyncio.create_task(produce())
    first = await asyncio.wait_for(w.recv(), 5)
    await asyncio.sleep(0.3)
    assert w.outstanding <= WORKER_CREDIT
    assert broker.depth <= 8
    assert sent < 200  # the producer is held back, not buffering everything
    got = [int(first.group_id)] + [int((await asyncio.wait_for(w.recv(), 5)).group_id) for _ in range(199)]
    await task
    for c in (w, push):
        c.close()
    broker.close()
    assert got == list(range(200))


async def test_drain_ends_even_when_no_more_work_arrives():
    broker = await _broker()
    push = transport.push(broker.front_address, bind=False, sender="src/0")
    w = WorkPuller(broker.back_address, sender="w/0", credit=8)
    await push.send(m.Progress(0, 0, []))
    assert (await asyncio.wait_for(w.recv(), 5)).step == 0
    w.drain()  # 8 credits granted, 1 used, and the queue is empty
    with pytest.raises(EOFError):
        await asyncio.wait_for(w.recv(), 5)
    await push.send(m.Progress(1, 0, []))  # goes to nobody: the credit was revoked
    other = WorkPuller(broker.back_address, sender="w/1")
    assert (await asyncio.wait_for(other.recv(), 5)).step == 1
    for c in (w, other, push):
        c.close()
    broker.close()


async def test_a_relay_passes_items_on_unread_and_still_drains():
    """``recv_frames`` + ``send_frames``: items reach the consumer behind the relay byte for
    byte (envelope and sender included), garbage too; the broker's revocation
    acknowledgement is taken as credit, not passed on, so the relay's drain ends."""
    broker = await _broker()
    push = transport.push(broker.front_address, bind=False, sender="src/0")
    relay_in = WorkPuller(broker.back_address, sender="relay/0", credit=4)
    sink = transport.pull("tcp://127.0.0.1:*", bind=True, sender="sink/0")
    relay_out = transport.push(sink.address, bind=False, sender="relay/0")
    for s in range(6):
        await push.send(m.Progress(s, 0, []))
    await push._send_frames([b"garbage"])
    for _ in range(7):
        await relay_out.send_frames(await asyncio.wait_for(relay_in.recv_frames(), 5))
    got = [await asyncio.wait_for(sink.recv_envelope(), 5) for _ in range(6)]
    assert [msg.step for _, msg in got] == list(range(6))
    assert {env.sender for env, _ in got} == {"src/0"}
    with pytest.raises(asyncio.TimeoutError):  # the garbage is skipped there
        await asyncio.wait_for(sink.recv(), 0.3)
    assert sink.stats.rejected["malformed"] == 1  # judged behind the relay, not by it
    relay_in.drain()
    with pytest.raises(EOFError):
        await asyncio.wait_for(relay_in.recv_frames(), 5)
    for c in (push, relay_in, relay_out, sink):
        c.close()
    broker.close()


async def test_two_receivers_on_one_puller_get_each_item_once_within_credit():
    # One receiver finds items ready (the non-blocking path) while the other is parked in
    # the channel's wait: no item is lost or taken twice, and grants never pile up past
    # the credit. (Which receiver resumes first is the event loop's business, so the
    # order of processing across two receivers is not a property of the channel.)
    broker = await _broker()
    push = transport.push(broker.front_address, bind=False, sender="src/0")
    w = WorkPuller(broker.back_address, sender="w/0", credit=4)
    got: list[int] = []
    most_outstanding = 0

    async def receive():
        nonlocal most_outstanding
        while True:
            msg = await w.recv()
            got.append(msg.step)
            most_outstanding = max(most_outstanding, w.outstanding)
            if msg.step % 7 == 0:
                await asyncio.sleep(0.002)  # the other receiver waits in the asyncio path meanwhile

    tasks = [asyncio.create_task(receive()) for _ in range(2)]
    for s in range(120):
        await push.send(m.Progress(s, 0, []))
        if s % 30 == 0:
            await asyncio.sleep(0.05)  # batches that queue up, then gaps that park both receivers
    for _ in range(250):
        if len(got) == 120:
            break
        await asyncio.sleep(0.02)
    for t in tasks:
        t.cancel()
    w.close()
    push.close()
    broker.close()
    assert sorted(got) == list(range(120))
    assert most_outstanding <= 4


async def test_a_worker_working_on_several_items_holds_no_more_than_its_credit():
    """A consumer that starts items concurrently (``StageContext.serve``) reports each one
    finished; until then the items count against its credit, so a worker of credit 3 never
    holds more than 3 (a kill loses at most that) and the rest wait in the broker for
    whichever replica has room."""
    broker = await _broker()
    push = transport.push(broker.front_address, bind=False, sender="src/0")
    w = WorkPuller(broker.back_address, sender="w/0", credit=3)
    for s in range(20):
        await push.send(m.Progress(s, 0, []))
    held = [(await asyncio.wait_for(w.recv_held(), 5)).step for _ in range(3)]
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(w.recv_held(), 0.3)
    assert broker.depth == 17
    w.release()
    held.append((await asyncio.wait_for(w.recv_held(), 5)).step)
    assert held == [0, 1, 2, 3]
    await asyncio.sleep(0.1)
    assert broker.depth == 16 and w.held == 3
    w.close()
    push.close()
    broker.close()


async def test_serve_ends_on_drain_while_its_items_use_all_its_credit(tmp_path, monkeypatch):
    """``StageContext.serve`` holding as many items as its credit has none outstanding, and
    its loop is parked in ``recv`` for work the broker cannot send. Drain must still end
    it once the held items finish (a revocation of nothing, which the broker acknowledges,
    wakes the parked receive); otherwise the replica never exits and is killed at the
    shutdown deadline."""
    from pathlib import Path

    from pipeline import runtime
    from schemas.stack import load_stack

    monkeypatch.setattr(runtime, "freeze_startup_heap", lambda: None)
    broker = await _broker()
    push = transport.push(broker.front_address, bind=False, sender="src/0")
    stack = load_stack(Path(__file__).resolve().parents[2] / "ops" / "stack.toml")
    ctx = runtime.StageContext("reward", 0, tmp_path, stack, {"t.back": broker.back_address})
    puller = ctx.work_in("t", credit=2)
    for s in range(2):
        await push.send(m.Progress(s, 0, []))
    go, done = asyncio.Event(), []

    async def handle(msg):
        await go.wait()
        done.append(msg.step)

    serving = asyncio.create_task(ctx.serve(puller, m.Progress, handle))
    for _ in range(100):
        if puller.held == 2:
            break
        await asyncio.sleep(0.01)
    assert puller.held == 2 and puller.outstanding == 0
    ctx.drain()
    await asyncio.sleep(0.05)
    go.set()
    await asyncio.wait_for(serving, 5)
    assert sorted(done) == [0, 1]
    puller.close()
    push.close()
    broker.close()

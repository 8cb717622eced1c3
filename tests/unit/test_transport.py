"""Channels over ZeroMQ (tcp loopback) and the in-process twin behave the same."""

import asyncio
import time

import msgspec
import numpy as np
import pytest
import zmq

import transport
from schemas import messages as m
from stages.testing import messages_equal
from transport.zmq_sockets import DealerChannel, RouterChannel, context

ADDRS = {"tcp": "tcp://127.0.0.1:*", "mem": "mem://work"}


def open_pair(kind, **kw):
    pull = transport.pull(ADDRS[kind], bind=True, sender="consumer/0", **kw)
    push = transport.push(pull.address, bind=False, sender="producer/0", **kw)
    return push, pull


@pytest.mark.parametrize("kind", ["tcp", "mem"])
async def test_push_pull_in_order(kind):
    push, pull = open_pair(kind)
    with push, pull:
        for i in range(50):
            await push.send(m.Progress(i, i, [f"g{i}"]))
        got = [await asyncio.wait_for(pull.recv(), 5) for _ in range(50)]
    assert [g.step for g in got] == list(range(50))


@pytest.mark.parametrize("kind", ["tcp", "mem"])
async def test_slow_consumer_back_pressures_producer_without_loss(kind):
    hwm, n, payload = 4, 120, 256 * 1024
    push, pull = open_pair(kind, hwm=hwm)
    if kind == "tcp":  # keep kernel buffers small so the bound below is about us, not the OS
        for s in (push.sock, pull.sock):
            s.setsockopt(zmq.SNDBUF, 64 * 1024)
            s.setsockopt(zmq.RCVBUF, 64 * 1024)
    max_ahead = 0

    async def produce():
        for i in range(n):
            await push.send(m.TrainGroup(m.ScoredGroup(
                m.Rollout(m.PromptGroup(f"g{i}", np.full(payload // 4, i, np.int32), "", "t", 1, 0), [], "p"),
                np.zeros(1, np.float32))))

    with push, pull:
        producer = asyncio.create_task(produce())
        got = []
        for _ in range(n):
            await asyncio.sleep(0.002)  # the slow consumer
            msg = await asyncio.wait_for(pull.recv(), 10)
            got.append(msg.scored.rollout.group.group_id)
            max_ahead = max(max_ahead, push.stats.sent - pull.stats.received)
        await asyncio.wait_for(producer, 10)
    assert got == [f"g{i}" for i in range(n)]  # nothing lost, nothing reordered
    # Queued messages stay within a small multiple of the HWM (ZeroMQ's HWM is approximate:
    # its pipes admit a few batches past it, plus small kernel buffers), far below n:
    # memory is bounded by hwm, not by how far ahead the producer could run.
    assert max_ahead <= 8 * hwm, max_ahead


async def test_pooled_arrays_arrive_intact_while_the_sender_runs_ahead():
    """The sender reuses pool buffers once zmq is done with them: a queued message is never
    overwritten by a later one, whether sent at once or after waiting on a full queue."""
    push, pull = open_pair("tcp", hwm=2)
    for s in (push.sock, pull.sock):
        s.setsockopt(zmq.SNDBUF, 64 * 1024)
        s.setsockopt(zmq.RCVBUF, 64 * 1024)
    n, length = 60, 4096

    def rollout(i):
        samples = [m.Sample(np.full(length, i * 8 + k, np.int32), np.full(length, -i - k / 8, np.float32),
                            np.array([[0, i]], np.int32), "stop") for k in range(4)]
        return m.Rollout(m.PromptGroup(f"g{i}", np.arange(300, dtype=np.int32) + i, "", "t", 4, 0), samples, "e")

    async def produce():
        for i in range(n):
            await push.send(rollout(i))

    with push, pull:
        producer = asyncio.create_task(produce())
        got = []
        for i in range(n):
            if i % 10 == 0:
                await asyncio.sleep(0.05)  # let the producer fill every queue on the way
            got.append(await asyncio.wait_for(pull.recv(), 10))
        await asyncio.wait_for(producer, 10)
    assert all(messages_equal(g, rollout(i)) for i, g in enumerate(got))


async def test_garbage_and_schema_skew_are_survived_and_counted():
    pull = transport.pull(ADDRS["tcp"], bind=True, sender="consumer/0", max_message_bytes=1 << 20)
    raw = context().socket(zmq.PUSH)
    raw.connect(pull.address)
    env = lambda ver, tag: msgspec.msgpack.encode(m.Envelope(ver, 1, "evil/7", 0.0, tag))  # noqa: E731
    good = transport.codec.Codec("good/0")
    try:
        await raw.send_multipart([b"\x00\x01garbage"])
        await raw.send_multipart([env(1, "hello"), b"\xc1\xc1"])
        await raw.send_multipart([env(1, "from_the_future"), b"\x90"])
        await raw.send_multipart([env(m.SCHEMA_VERSION + 1, "hello"), b"\x90"])
        await raw.send_multipart([env(1, "hello"), b"\x90", b"x" * (1 << 19), b"x" * (1 << 19)])
        await raw.send_multipart(good.encode(m.Hello("still-alive")))
        msg = await asyncio.wait_for(pull.recv(), 5)
    finally:
        raw.close(0)
        pull.close()
    assert msg == m.Hello("still-alive")
    assert pull.stats.rejected == {"malformed": 2, "unknown_tag": 1, "newer_schema": 1, "oversize": 1}
    assert pull.stats.received == 1


@pytest.mark.parametrize("kind", ["tcp", "mem"])
async def test_late_subscriber_gets_last_values_then_a_gapless_stream(kind):
    addr = {"tcp": ("tcp://127.0.0.1:*", "tcp://127.0.0.1:*"), "mem": ("mem://bcast", "")}[kind]
    pub = transport.pub(*addr, sender="learner/0")
    await pub.send(m.WeightsReady(7))
    stop = asyncio.Event()

    async def publish_progress():
        i = 0
        while not stop.is_set():
            i += 1
            await pub.send(m.Progress(i, i, []))
            await asyncio.sleep(0.0005)

    task = asyncio.create_task(publish_progress())
    await asyncio.sleep(0.05)
    sub = transport.sub(pub.address, pub.sync_address, sender="source/0")
    try:
        await sub.ready(5)
        got = [await asyncio.wait_for(sub.recv(), 5) for _ in range(40)]
    finally:
        stop.set()
        await task
        sub.close()
        pub.close()
    assert any(isinstance(g, m.WeightsReady) and g.version == 7 for g in got[:2])  # late joiner sees it
    steps = [g.step for g in got if isinstance(g, m.Progress)]
    assert steps == list(range(steps[0], steps[0] + len(steps)))  # no gap, no duplicate


async def test_subscriber_topic_filter():
    pub = transport.pub("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", sender="p/0")
    sub = transport.sub(pub.address, pub.sync_address, sender="s/0", topics=["weights_ready"])
    try:
        await sub.ready(5)
        await pub.send(m.Progress(1, 1, []))
        await pub.send(m.WeightsReady(2))
        got = await asyncio.wait_for(sub.recv(), 5)
    finally:
        sub.close()
        pub.close()
    assert got == m.WeightsReady(2)


async def test_handshake_times_out_naming_addresses():
    sub = transport.sub("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", sender="s/0")
    with sub, pytest.raises(TimeoutError, match="127.0.0.1:1"):
        await sub.ready(0.3)


async def test_router_dealer_request_reply():
    router = RouterChannel("tcp://127.0.0.1:*", sender="logprob/0")
    dealer = DealerChannel(router.address, sender="gateway/0")
    with router, dealer:
        await dealer.send(m.Hello("ping"))
        ident, env, msg = await asyncio.wait_for(router.recv_from(), 5)
        assert env.sender == "gateway/0" and msg == m.Hello("ping")
        await router.send_to(ident, m.Hello("pong"))
        assert await asyncio.wait_for(dealer.recv(), 5) == m.Hello("pong")


async def test_subscriber_keeps_receiving_from_a_restarted_publisher():
    pub = transport.pub("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", sender="learner/0")
    addr, sync = pub.address, pub.sync_address
    for i in range(5):
        await pub.send(m.Progress(i, i, []))
    sub = transport.sub(addr, sync, sender="source/0", topics=["progress"])
    await sub.ready(5)
    assert (await asyncio.wait_for(sub.recv(), 5)).step == 4  # last value
    pub.close()
    await asyncio.sleep(0.2)
    pub = transport.pub(addr, sync, sender="learner/0")  # restarted: sequence starts again at 1
    got = None
    try:
        for _ in range(100):  # until the SUB socket has reconnected
            await pub.send(m.Progress(1, 1, ["after-restart"]))
            try:
                got = await asyncio.wait_for(sub.recv(), 0.05)
                break
            except asyncio.TimeoutError:
                pass
    finally:
        sub.close()
        pub.close()
    assert got is not None and got.consumed_ids == ["after-restart"]


# ---------------------------------------------------------------- waiting on the socket's fd
# A channel parks waiting coroutines on its own reader of the socket's ZMQ_FD, which is
# edge-style: any operation on the socket can consume the signal. These cases are where a
# wake-up would be lost if the channel did not pass readiness on itself.


async def test_receiver_parked_on_a_dealer_wakes_when_a_send_on_the_same_socket_took_the_signal():
    """The WorkPuller pattern: one coroutine waits for a reply while another sends on the
    same DEALER. A reply lands while the loop is busy; the next send processes the socket's
    commands (libzmq does so on a send once ~1 ms passed since it last did), which empties
    the fd before the loop ever sees it readable. The parked receiver must still get it."""
    router = RouterChannel("tcp://127.0.0.1:*", sender="server")
    dealer = DealerChannel(router.address, sender="client")
    with router, dealer:
        await dealer.send(m.Hello("first"))
        ident, _, _ = await asyncio.wait_for(router.recv_from(), 5)
        waiting = asyncio.create_task(dealer.recv())
        await asyncio.sleep(0.05)  # parked
        await router.send_to(ident, m.Hello("reply"))
        time.sleep(0.05)  # the loop busy: the reply reaches the dealer, its fd turns readable
        await dealer.send(m.Hello("second"))  # consumes that signal
        got = await asyncio.wait_for(waiting, 5)
    assert got.nonce == "reply"


async def test_waiting_receivers_are_served_in_arrival_order_from_a_burst():
    """Several coroutines wait on one PULL; a burst arrives with one fd signal. Each waiter
    gets one message, in the order they started waiting, and none is left parked."""
    push, pull = open_pair("tcp")
    with push, pull:
        waiters = [asyncio.create_task(pull.recv()) for _ in range(5)]
        await asyncio.sleep(0.05)  # all parked
        for i in range(5):
            await push.send(m.Progress(i, i, []))
        got = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert [g.step for g in got] == list(range(5))


async def test_a_cancelled_waiter_passes_its_wake_up_on():
    """A waiter cancelled after being woken (its wake-up not used) must not strand the next
    waiter: the message is still there, and the next one gets it."""
    push, pull = open_pair("tcp")
    with push, pull:
        first = asyncio.create_task(pull.recv())
        second = asyncio.create_task(pull.recv())
        await asyncio.sleep(0.05)
        await push.send(m.Progress(1, 1, []))
        # Block (no yield) until the message is in the socket, wake the first waiter as the
        # fd's reader would, and cancel it in the same breath, before it can run.
        assert pull._now.poll(5000, zmq.POLLIN)
        pull._kick()
        assert pull._recv_waiters[0].done()
        first.cancel()
        got = await asyncio.wait_for(second, 5)
    assert got.step == 1
    assert first.cancelled()


async def test_a_sender_blocked_on_a_full_queue_resumes_when_the_peer_reads():
    push, pull = open_pair("tcp", hwm=1)
    for s in (push.sock, pull.sock):
        s.setsockopt(zmq.SNDBUF, 16 * 1024)
        s.setsockopt(zmq.RCVBUF, 16 * 1024)
    n = 100  # far past what the pipes and kernel buffers of HWM 1 admit
    big = m.PromptGroup("g", np.zeros(64 * 1024, np.int32), "", "t", 1, 0)
    with push, pull:
        sent = 0

        async def produce():
            nonlocal sent
            for _ in range(n):
                await push.send(big)
                sent += 1

        producer = asyncio.create_task(produce())
        await asyncio.sleep(0.2)
        assert sent < n and push._send_waiters  # parked on the full queue
        for _ in range(n):
            await asyncio.wait_for(pull.recv(), 5)
        await asyncio.wait_for(producer, 5)
    assert sent == n


async def test_close_cancels_parked_coroutines():
    push, pull = open_pair("tcp")
    waiter = asyncio.create_task(pull.recv())
    await asyncio.sleep(0.05)
    pull.close()
    push.close()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, 5)

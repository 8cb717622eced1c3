"""TurnCoalescer: what one event-loop turn submits leaves as one send, in order."""

import asyncio

import pytest

from transport.coalesce import TurnCoalescer


class Sink:
    def __init__(self, fail: bool = False, gate: asyncio.Event | None = None) -> None:
        self.sent: list = []
        self.fail, self.gate = fail, gate

    async def send(self, what) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("socket gone")
        self.sent.append(what)


async def test_one_turn_is_one_send_and_a_lone_item_goes_alone():
    sink = Sink()
    c = TurnCoalescer(sink.send, list)
    wake = asyncio.get_running_loop().create_future()

    async def finish(i: int) -> None:  # tasks woken together, like groups one engine step finishes
        await wake
        await c.submit(i)

    tasks = [asyncio.ensure_future(finish(i)) for i in range(5)]
    await asyncio.sleep(0)
    wake.set_result(None)
    await asyncio.gather(*tasks)
    await c.submit("late")
    assert sink.sent == [[0, 1, 2, 3, 4], "late"]
    assert (c.submitted, c.sends) == (6, 2)


async def test_submitters_wait_for_their_send_and_order_holds_across_turns():
    gate = asyncio.Event()
    sink = Sink(gate=gate)
    c = TurnCoalescer(sink.send, list)
    first = [asyncio.ensure_future(c.submit(i)) for i in range(3)]
    await asyncio.sleep(0.01)  # the first flush is waiting on the gate (back-pressure)
    second = [asyncio.ensure_future(c.submit(i)) for i in range(3, 5)]
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in first + second) and sink.sent == []
    gate.set()
    await asyncio.gather(*first, *second)
    assert sink.sent == [[0, 1, 2], [3, 4]]


async def test_a_failed_send_fails_every_submitter_of_its_batch_only():
    sink = Sink(fail=True)
    c = TurnCoalescer(sink.send, list)
    results = await asyncio.gather(*(c.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    sink.fail = False
    await c.submit(9)
    assert sink.sent == [9]


async def test_a_cancelled_submitter_does_not_cancel_the_others_send():
    gate = asyncio.Event()
    sink = Sink(gate=gate)
    c = TurnCoalescer(sink.send, list)
    a, b = asyncio.ensure_future(c.submit("a")), asyncio.ensure_future(c.submit("b"))
    await asyncio.sleep(0.01)
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a
    gate.set()
    await b
    assert sink.sent == [["a", "b"]]

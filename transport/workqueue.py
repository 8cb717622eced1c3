"""Credit-based work queue: producers PUSH, a broker hands items to workers that asked.

    producers (PUSH, connect) ──▶ broker front (PULL, bind)
    broker back (ROUTER, bind) ◀── Credit(n) ── workers (DEALER, connect)
                              ──── item ──────▶

Why a broker rather than PUSH straight into PULL: ZeroMQ PULL sockets prefetch, so a
replica that is scaled down or restarted would take queued items with it. Here a worker
holds at most the credit it granted (``WORKER_CREDIT``); draining is "stop granting,
finish what you hold", and the broker's own queue (bounded by ``hwm``) is where work waits.
Adding replicas needs no reconnection anywhere: they just connect and grant credit.

Invariants and failure behaviour:
- Items are forwarded as raw frames, never decoded by the broker (cheap, version-agnostic).
- FIFO per producer; items go to workers in the order they granted credit.
- When the broker's queue holds ``hwm`` items it stops reading the front socket, so
  producers block on their own HWM: back-pressure reaches the source.
- A worker that dies loses only what it held (at most its credit); the source's lease
  reissues those groups (at-least-once). ``forget(worker)`` drops a dead worker's credit.
- Bad credit messages are logged and counted like any other bad input.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import zmq
import zmq.asyncio

from schemas.messages import Credit, Envelope, Message
from transport.base import DEFAULT_HWM, DEFAULT_LINGER_MS, DEFAULT_MAX_MESSAGE_BYTES, Receiver
from transport.zmq_sockets import PullChannel, RouterChannel, _ZmqChannel

WORKER_CREDIT = 2
"""Items a worker holds at most: one being processed and one ready, so it never idles
waiting on a round trip, and a kill loses at most two items."""


class WorkBroker:
    """Runs inside the supervisor, one per work stream."""

    def __init__(self, name: str, front: str, back: str, *, hwm: int = DEFAULT_HWM,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.name = name
        self.front = PullChannel(front, bind=True, sender=f"broker/{name}", name=f"{name}.front",
                                 hwm=hwm, max_message_bytes=max_message_bytes)
        self.back = RouterChannel(back, sender=f"broker/{name}", name=f"{name}.back",
                                  hwm=hwm, max_message_bytes=max_message_bytes)
        self.back.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable → error, not silent drop
        # Plain (non-asyncio) views of the same sockets for the non-blocking calls made once
        # the poller said they are ready: pyzmq's asyncio wrappers cost a future and event
        # bookkeeping per call, a large share of the broker's CPU at thousands of items/s.
        self._back_now = zmq.Socket.shadow(self.back.sock.underlying)
        self._front_now = zmq.Socket.shadow(self.front.sock.underlying)
        self.front_address, self.back_address = self.front.address, self.back.address
        self.hwm = hwm
        self.queue: collections.deque[list[Any]] = collections.deque()
        self.credit: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.names: dict[bytes, str] = {}
        self.forwarded = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def depth(self) -> int:
        return len(self.queue)

    def forget(self, worker: str) -> None:
        for ident, name in list(self.names.items()):
            if name == worker:
                self.credit.pop(ident, None)
                self.names.pop(ident, None)

    async def _run(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self.back.sock, zmq.POLLIN)
        front_registered = False
        while True:
            want_front = len(self.queue) < self.hwm
            if want_front and not front_registered:
                poller.register(self.front.sock, zmq.POLLIN)
                front_registered = True
            elif not want_front and front_registered:
                poller.unregister(self.front.sock)
                front_registered = False
            events = dict(await poller.poll())
            if self.back.sock in events:
                while True:
                    try:
                        ident, *frames = self._back_now.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    got = self.back._accept(frames)
                    if got is not None and isinstance(got[1], Credit):
                        key = ident.bytes
                        if got[1].n >= 0:
                            self.credit[key] = self.credit.get(key, 0) + got[1].n
                            self.names[key] = got[1].worker
                        else:  # revoke unused credit; tell the worker how much was revoked
                            revoked = min(-got[1].n, self.credit.pop(key, 0))
                            await self.back.sock.send_multipart(
                                [ident, *self.back.codec.encode(Credit(revoked, self.name))])
            if front_registered and self.front.sock in events:
                while len(self.queue) < self.hwm:
                    try:
                        self.queue.append(self._front_now.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
            await self._dispatch()

    async def _dispatch(self) -> None:
        while self.queue and self.credit:
            ident, n = next(iter(self.credit.items()))
            frames = self.queue.popleft()
            try:
                try:  # a worker with credit has room in its queue: this almost never waits
                    self._back_now.send_multipart([ident, *frames], zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    await self.back.sock.send_multipart([ident, *frames], copy=False)
            except zmq.ZMQError:  # the worker is gone: keep the item, drop its credit
                self.queue.appendleft(frames)
                self.credit.pop(ident, None)
                self.names.pop(ident, None)
                continue
            self.forwarded += 1
            if n <= 1:
                del self.credit[ident]
            else:
                self.credit[ident] = n - 1
                self.credit.move_to_end(ident)  # round-robin over workers with credit

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.front.close()
        self.back.close()


class WorkPuller(_ZmqChannel, Receiver):
    """Worker end: grants credit, receives items, and can drain."""

    def __init__(self, back: str, *, sender: str, name: str = "work", credit: int = WORKER_CREDIT,
                 linger_ms: int = DEFAULT_LINGER_MS, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        Receiver.__init__(self, name, sender, max_message_bytes)
        self._open(zmq.DEALER, back, False, DEFAULT_HWM, linger_ms, max_message_bytes)
        self.max_credit = credit
        self.outstanding = 0
        self.draining = False
        self._revoke_sent = False

    async def _grant(self) -> None:
        n = self.max_credit - self.outstanding
        if n > 0 and not self.draining:
            await self.sock.send_multipart(self.codec.encode(Credit(n, self.codec.sender)))
            self.outstanding += n

    async def recv_envelope(self) -> tuple[Envelope, Message]:
        while True:
            await self._grant()
            if self.draining and not self._revoke_sent and self.outstanding > 0:
                await self.sock.send_multipart(self.codec.encode(Credit(-self.outstanding, self.codec.sender)))
                self._revoke_sent = True
            if self.draining and self.outstanding == 0:
                raise EOFError(f"{self.name}: drained")
            frames = await self.sock.recv_multipart(copy=False)
            got = self._accept(frames)
            if got is not None and isinstance(got[1], Credit):  # revocation acknowledged
                self.outstanding -= got[1].n
                continue
            self.outstanding -= 1
            if got is not None:
                return got

    def drain(self) -> None:
        """Stop asking for work. ``recv`` returns the items already on their way, then
        raises EOFError; credit the broker has not used yet is revoked (the broker
        acknowledges how much), so draining ends even when no more work arrives."""
        self.draining = True

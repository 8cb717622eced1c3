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
  What a worker holds counts items on their way and items it works on: a plain ``recv``
  caller finishes one before asking for the next; one that works on several at once takes
  them with ``recv_held`` and says when each is done (``release``), and they count against
  its credit until then.
- Bad credit messages are logged and counted like any other bad input.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import zmq

from schemas.messages import Credit, Envelope, Message
from transport.base import DEFAULT_HWM, DEFAULT_LINGER_MS, DEFAULT_MAX_MESSAGE_BYTES, Receiver
from transport.codec import DecodeError
from transport.zmq_sockets import _EVENTS, _POLLIN, PullChannel, RouterChannel, _recv_now, _send_now, _ZmqChannel

SEND_RETRY_S = 0.001
"""Retry interval of a send to a worker whose pipe is full: short (the worker is reading),
and the case is rare enough that polling costs nothing."""
CREDIT_TAG = Credit.__struct_config__.tag
"""Envelope tag of the broker's credit messages (``WorkPuller.recv_frames`` reads only it)."""
WORKER_CREDIT = 2
"""Items a worker holds at most: one being processed and one ready, so it never idles
waiting on a round trip, and a kill loses at most two items."""
GRANT_LOW_WATER = 0.5
"""A worker grants credit again once what it has left is at most this fraction of its
credit, and then all that is missing at once: a worker of credit 32 (the default stack's
learner) sends one Credit per ~16 items instead of one per item. Each Credit costs an
encode, a send that wakes the worker's ZeroMQ IO thread (~18 µs of CPU alone on the 2-core
VM, ad hoc), the broker's receive and decode; half the credit still in flight keeps the
worker fed as before. Workers of credit 1 or 2 grant per item as they did."""


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
        # Every call the broker makes goes through the channels' plain (non-asyncio) socket
        # views, ``_now``, and is non-blocking (see ``_run``); pyzmq's asyncio wrappers cost a
        # future and event bookkeeping per call, a large share of the broker's CPU at
        # thousands of items/s. Receives and sends use the channels' ``_recv_now`` and
        # ``_send_now``, not pyzmq's ``recv_multipart``/``send_multipart``, whose flag-enum
        # arithmetic and per-part option reads cost ~6 µs per forwarded item (send + receive
        # of a 3-part message: 8.2-10.6 µs against 3.1-3.2 µs, ad hoc, inproc).
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
        # No zmq.asyncio Poller: its poll() builds futures, registers readers and converts
        # flag enums on every call, and raising zmq.Again to end each drain costs an
        # exception object (and an import inside pyzmq's error class). The sockets'
        # notification fds wake one event instead; each wake-up drains every socket while
        # ZMQ_EVENTS says it has input, and the loop sleeps only once both say no more (the
        # fds are edge-style: input that arrived before the check is seen by the check,
        # input after it signals the fd). The front's reader is removed while the queue is
        # full, so a readable front cannot spin the loop. ``python ops/bench/broker.py``,
        # three interleaved pairs on the 2-core machine: broker CPU per item 87-96 µs
        # against 115-140 µs with the Poller; 6.5-7.1k items/s against 5.7-6.4k.
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        back_fd, front_fd = self.back._now.getsockopt(zmq.FD), self.front._now.getsockopt(zmq.FD)
        loop.add_reader(back_fd, wake.set)
        front_watched = False
        try:
            while True:
                want_front = len(self.queue) < self.hwm
                if want_front != front_watched:
                    if want_front:
                        loop.add_reader(front_fd, wake.set)
                    else:
                        loop.remove_reader(front_fd)
                    front_watched = want_front
                wake.clear()
                await self._drain_back()
                front = self.front._now
                while len(self.queue) < self.hwm and front.getsockopt(_EVENTS) & _POLLIN:
                    self.queue.append(_recv_now(front))
                await self._dispatch()
                if (self.back._now.getsockopt(_EVENTS) & _POLLIN
                        or len(self.queue) < self.hwm and front.getsockopt(_EVENTS) & _POLLIN):
                    continue
                await wake.wait()
        finally:
            loop.remove_reader(back_fd)
            if front_watched:
                loop.remove_reader(front_fd)

    async def _drain_back(self) -> None:
        """Every credit message waiting on the back socket: grants and revocations."""
        back = self.back._now
        while back.getsockopt(_EVENTS) & _POLLIN:
            ident, *frames = _recv_now(back)
            got = self.back._accept(frames)
            if got is not None and isinstance(got[1], Credit):
                key = ident.bytes
                if got[1].n >= 0:
                    self.credit[key] = self.credit.get(key, 0) + got[1].n
                    self.names[key] = got[1].worker
                else:
                    revoked = min(-got[1].n, self.credit.pop(key, 0))
                    try:
                        await self._send_back([ident, *self.back.codec.encode(Credit(revoked, self.name))])
                    except zmq.ZMQError:  # the worker is gone; nothing to acknowledge
                        pass

    async def _send_back(self, frames: list[Any]) -> None:
        """Send on the back socket through its plain view; while the worker's pipe is full
        (rare: a worker with credit has room) retry every ``SEND_RETRY_S``. The channel's
        own waiting send (``_send_frames``) is never used: it would register the channel's
        reader on the fd ``_run`` watches, and asyncio keeps one reader per fd.
        ``zmq.ZMQError`` (other than Again): the worker is gone."""
        while True:
            try:
                _send_now(self.back._now, frames)
                return
            except zmq.Again:
                await asyncio.sleep(SEND_RETRY_S)

    async def _dispatch(self) -> None:
        while self.queue and self.credit:
            ident, n = next(iter(self.credit.items()))
            frames = self.queue.popleft()
            try:  # a worker with credit has room in its queue: this almost never waits
                await self._send_back([ident, *frames])
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
    """Worker end: grants credit, receives items, and can drain.

    Like every channel (``zmq_sockets``), a credit grant and a receive are non-blocking
    calls on a plain view of the socket, parking on the channel's own fd reader only when
    they would block or another coroutine already waits (so order is kept)."""

    def __init__(self, back: str, *, sender: str, name: str = "work", credit: int = WORKER_CREDIT,
                 linger_ms: int = DEFAULT_LINGER_MS, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        Receiver.__init__(self, name, sender, max_message_bytes)
        self._open(zmq.DEALER, back, False, DEFAULT_HWM, linger_ms, max_message_bytes)
        self.max_credit = credit
        self.outstanding = 0
        """Credit granted that the broker has not used yet (items it may still send)."""
        self.held = 0
        """Items handed out by ``recv_held`` and not yet ``release``d: a consumer that works
        on several at once says when each is finished, and its credit counts them as held."""
        self.draining = False
        self._revoke_sent = False
        self._grant_soon: asyncio.Task | None = None
        """The grant for released items, scheduled by the first ``release`` of a turn."""

    async def _grant(self) -> None:
        """Top the credit back up, so that unused credit plus held items reach
        ``max_credit``, once at most half of the credit is left unused
        (``GRANT_LOW_WATER``), in one message."""
        n = self.max_credit - self.outstanding - self.held
        if n > 0 and not self.draining and self.outstanding <= self.max_credit * GRANT_LOW_WATER:
            self.outstanding += n  # before the await: a second receiver must not grant it again
            try:
                await self._send_frames(self.codec.encode(Credit(n, self.codec.sender)))
            except BaseException:
                self.outstanding -= n
                raise

    async def _next_frames(self) -> list[Any]:
        """The next message from the broker (a work item or a revocation's acknowledgement),
        granting credit first; EOFError once drained and nothing more is on its way."""
        await self._grant()
        if self.draining and self.outstanding > 0:
            await self.revoke()
        if self.draining and self.outstanding == 0:
            raise EOFError(f"{self.name}: drained")
        return await self._recv_frames()

    async def recv_envelope(self) -> tuple[Envelope, Message]:
        while True:
            got = self._accept(await self._next_frames())
            if got is not None and isinstance(got[1], Credit):  # revocation acknowledged
                self.outstanding -= got[1].n
                continue
            self.outstanding -= 1
            if got is not None:
                return got

    async def recv_frames(self) -> list[Any]:
        """The next work item's frames as received, not decoded: for a relay that passes items
        on unread (``PushChannel.send_frames``), leaving decoding, validation and the count of
        bad input to the consumer behind it. Taps (recordings) see the frames; only the
        envelope is read, to tell the broker's revocation acknowledgements from work."""
        while True:
            frames = await self._next_frames()
            try:
                credit = self.codec.decode_envelope(frames).tag == CREDIT_TAG
            except DecodeError:
                credit = False  # not for us to judge: the consumer behind the relay counts it
            if credit:
                got = self._accept(frames)
                if got is not None and isinstance(got[1], Credit):
                    self.outstanding -= got[1].n
                    continue
            self.outstanding -= 1
            for tap in self.taps:
                tap(self.name, frames)
            self.stats.received += 1
            return frames

    async def recv_held(self) -> Message:
        """``recv`` for a consumer that works on several items at once: the item counts
        against this worker's credit until ``release``, so it never holds more than
        ``max_credit`` however many it has started (a plain ``recv`` caller finishes one
        item before asking for the next, and the same bound holds without this)."""
        msg = await self.recv()
        self.held += 1
        return msg

    def release(self) -> None:
        """One item from ``recv_held`` is finished: its credit is granted again, in one
        Credit message with that of every item released in the same turn of the event loop
        (a rollout's groups admitted together finish in the same decode step)."""
        self.held -= 1
        if not self._grant_soon and not self._closed:
            self._grant_soon = asyncio.get_running_loop().create_task(self._grant_released())

    async def _grant_released(self) -> None:
        try:
            await self._grant()
        except zmq.ZMQError:  # closed meanwhile: nothing to grant to
            pass
        finally:
            self._grant_soon = None

    async def revoke(self) -> None:
        """Once, while draining: ask the broker to take back the credit it has not used; its
        acknowledgement says how much it took and wakes a ``recv`` parked for work. With no
        credit outstanding (a ``recv_held`` consumer whose items use all of it) it still
        asks for one: the acknowledgement of 0 is then what wakes that ``recv``."""
        if self._closed or self._revoke_sent:
            return
        self._revoke_sent = True
        await self._send_frames(self.codec.encode(Credit(-max(1, self.outstanding), self.codec.sender)))

    def drain(self) -> None:
        """Stop asking for work. ``recv`` returns the items already on their way, then
        raises EOFError; credit the broker has not used yet is revoked (the broker
        acknowledges how much), so draining ends even when no more work arrives."""
        self.draining = True

"""ZeroMQ channels on asyncio: PUSH/PULL, PUB/SUB with a ready handshake, ROUTER/DEALER.

Invariants:
- Every socket sets bounded HWMs, a linger and a per-frame max size (``MAXMSGSIZE``) at
  creation; the codec additionally refuses messages whose frames sum past the limit.
- Work goes PUSH → PULL only: a full PULL queue blocks the pusher (back-pressure), nothing
  is dropped. PUB is for broadcasts only; it drops for slow subscribers by ZeroMQ design,
  so broadcasts carry state (latest version, progress), never work.
- PUB/SUB ready handshake: a subscriber connects SUB, then says ``Hello(nonce)`` on the
  publisher's sync ROUTER until it sees ``Welcome(nonce)`` on SUB (its subscription is
  live), then asks for a ``Snapshot`` (last message of each topic plus the sequence number
  it reflects). PUB frames carry (publisher epoch, sequence number); anything at or below
  the snapshot's in the same epoch is discarded; a restarted publisher has a new epoch. A late joiner therefore misses nothing it needs and sees nothing twice.
- ``close()`` is idempotent and closes the zmq socket with the configured linger.
- Every send and receive is a non-blocking call on a plain (non-asyncio) view of the
  socket, ``_now``. When it would block, the coroutine parks on a future of its own and the
  channel's one reader on the socket's ``ZMQ_FD`` (registered on first wait) wakes it:
  that callback reads ``ZMQ_EVENTS`` (which also empties the fd) and wakes the first waiter
  of each direction that is ready. pyzmq's asyncio wrapper is never used on a channel's
  socket (asyncio keeps one reader per fd; it would replace ours); it costs a future, flag
  enum arithmetic and poller updates per call, ~30 µs of CPU per awaited message on the
  2-core VM (ad hoc: 105 against 75 µs per message received with a wait). A ready message
  is taken without yielding to the event loop (as pyzmq does).
- ``ZMQ_FD`` is edge-style: an operation that processes the socket's commands (any send,
  receive or ``ZMQ_EVENTS`` read) consumes the signal. So waiters queue per direction in
  arrival order (a newcomer parks behind them, keeping order), and after every operation
  while someone waits the channel reads ``ZMQ_EVENTS`` itself (``_kick``) and passes the
  readiness on; a woken waiter that finds nothing after all parks again at the front.

Failure behaviour: a handshake that gets no Welcome within ``timeout`` raises
``TimeoutError`` naming both addresses; bad input is skipped and counted (``base``).
"""

from __future__ import annotations

import asyncio
import collections
import os
import struct
import uuid
from typing import Any, Sequence

import zmq
import zmq.asyncio
from zmq.backend import Socket as _BackendSocket

from schemas.messages import Envelope, Hello, Message, Snapshot, SnapshotRequest, Welcome
from transport.base import (
    DEFAULT_HWM,
    DEFAULT_LINGER_MS,
    DEFAULT_MAX_MESSAGE_BYTES,
    Receiver,
    Sender,
)

HANDSHAKE_RETRY_S = 0.1
"""How often a subscriber repeats Hello while its subscription propagates (usually < 10 ms
on loopback; a retry costs one tiny message)."""
_SEQ = struct.Struct(">QQ")  # (publisher epoch, sequence number)
_NOW_MORE = zmq.NOBLOCK | zmq.SNDMORE
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)
"""Plain ints: pyzmq's flag enums cost an Enum construction per use on the hot path."""
_send_part = _BackendSocket.send
"""pyzmq's compiled send, without the Python wrapper (routing_id/group handling we never use)
that costs ~0.5 µs a part."""


def context() -> zmq.asyncio.Context:
    return zmq.asyncio.Context.instance()


def _make_socket(kind: int, hwm: int, linger_ms: int, max_message_bytes: int) -> zmq.asyncio.Socket:
    sock = context().socket(kind)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    return sock


def _attach(sock: zmq.asyncio.Socket, address: str, bind: bool) -> str:
    """Bind or connect; returns the concrete address (``tcp://127.0.0.1:*`` gets its port)."""
    if bind:
        sock.bind(address)
        return sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    sock.connect(address)
    return address


class _ZmqChannel:
    """Owns one zmq socket; mixed into Sender/Receiver classes below."""

    sock: zmq.asyncio.Socket

    def _open(self, kind: int, address: str, bind: bool, hwm: int, linger_ms: int, max_bytes: int) -> None:
        self.sock = _make_socket(kind, hwm, linger_ms, max_bytes)
        self.address = _attach(self.sock, address, bind)
        self._closed = False
        self._now = zmq.Socket.shadow(self.sock.underlying)  # plain view: every call goes here
        self._fd = self._now.getsockopt(zmq.FD)
        self._loop: asyncio.AbstractEventLoop | None = None  # where our fd reader is registered
        self._recv_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._send_waiters: collections.deque[asyncio.Future] = collections.deque()

    async def _send_frames(self, frames: Sequence[Any]) -> None:
        """Send one message: at once when it fits (and nobody waits to send before it), else
        once the socket can take it."""
        if not self._send_waiters:
            try:
                _send_now(self._now, frames)
            except zmq.Again:
                pass
            else:
                if self._recv_waiters:
                    self._kick()
                return
        await self._park(self._send_waiters, _send_now, frames)

    async def _recv_frames(self) -> list[Any]:
        """The next message's frames: at once when one is there (and nobody waits before
        us), else once one arrives."""
        if not self._recv_waiters:
            try:
                frames = _recv_now(self._now)
            except zmq.Again:
                pass
            else:
                if self._send_waiters:
                    self._kick()
                return frames
        return await self._park(self._recv_waiters, _recv_now)

    async def _park(self, waiters: "collections.deque[asyncio.Future]", op: Any, *args: Any) -> Any:
        """Queue behind ``waiters``; once woken at the front, try ``op`` again (parking at
        the front again if the socket is still not ready)."""
        loop = self._watch()
        fut = loop.create_future()
        waiters.append(fut)
        try:
            while True:
                await fut
                try:
                    return op(self._now, *args)
                except zmq.Again:  # the readiness went to nothing after all: wait in place
                    old, fut = fut, loop.create_future()
                    waiters[waiters.index(old)] = fut
        finally:
            try:
                waiters.remove(fut)
            except ValueError:  # close() emptied the queue
                pass
            if not self._closed and (self._recv_waiters or self._send_waiters):
                self._kick()  # our operation (or a wake-up we did not use) may be the signal the next one needs

    def _watch(self) -> asyncio.AbstractEventLoop:
        """The running loop, with our reader on the socket's fd registered there."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            loop.add_reader(self._fd, self._kick)
            self._loop = loop
        return loop

    def _kick(self) -> None:
        """Read ``ZMQ_EVENTS`` (processing the socket's commands, which empties its fd) and
        wake the first waiter of each direction that can go now."""
        if self._closed:
            return
        events = self._now.getsockopt(_EVENTS)
        if events & _POLLIN and self._recv_waiters and not (f := self._recv_waiters[0]).done():
            f.set_result(None)
        if events & _POLLOUT and self._send_waiters and not (f := self._send_waiters[0]).done():
            f.set_result(None)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            for f in (*self._recv_waiters, *self._send_waiters):
                f.cancel()
            self._recv_waiters.clear()
            self._send_waiters.clear()
            self.sock.close()


def _send_now(sock: zmq.Socket, frames: Sequence[Any]) -> None:
    """Send a whole multipart message without blocking, or raise ``zmq.Again`` having sent
    nothing: ZeroMQ checks the HWM on the first part only and queues a message atomically.
    Small ``bytes`` parts are copied (cheaper than a zero-copy Frame, which pyzmq would copy
    anyway under its ``copy_threshold``); others go zero-copy (above the threshold)."""
    last = len(frames) - 1
    for i in range(last + 1):
        f = frames[i]
        _send_part(sock, f, _NOW_MORE if i < last else zmq.NOBLOCK,
                   copy=type(f) is bytes and len(f) < zmq.COPY_THRESHOLD)


def _recv_now(sock: zmq.Socket) -> list[Any]:
    """One whole multipart message without blocking, or ``zmq.Again`` (a message's parts
    arrive together, so once the first is there the rest are too)."""
    recv = sock.recv
    frame = recv(zmq.NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:
        frame = recv(zmq.NOBLOCK, copy=False)
        frames.append(frame)
    return frames


class PushChannel(_ZmqChannel, Sender):
    """Work producer end: load-balances over connected PULL peers; blocks when all are full."""

    def __init__(self, address: str, *, bind: bool, sender: str, name: str = "push",
                 hwm: int = DEFAULT_HWM, linger_ms: int = DEFAULT_LINGER_MS,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        Sender.__init__(self, name, sender, max_message_bytes)
        self._open(zmq.PUSH, address, bind, hwm, linger_ms, max_message_bytes)

    async def send(self, msg: Message) -> None:
        await self._send_frames(self.codec.encode(msg))
        self.stats.sent += 1

    async def send_frames(self, frames: Sequence[Any]) -> None:
        """Send a message encoded elsewhere, e.g. frames a relay received and passes on
        unread (``WorkPuller.recv_frames``); its envelope still names the original sender."""
        await self._send_frames(frames)
        self.stats.sent += 1


class PullChannel(_ZmqChannel, Receiver):
    """Work consumer end."""

    def __init__(self, address: str, *, bind: bool, sender: str, name: str = "pull",
                 hwm: int = DEFAULT_HWM, linger_ms: int = DEFAULT_LINGER_MS,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        Receiver.__init__(self, name, sender, max_message_bytes)
        self._open(zmq.PULL, address, bind, hwm, linger_ms, max_message_bytes)

    async def recv_envelope(self) -> tuple[Envelope, Message]:
        while True:
            got = self._accept(await self._recv_frames())
            if got is not None:
                return got


class PubChannel(_ZmqChannel, Sender):
    """Broadcast end with a last-value cache per topic (the message tag) and a sync ROUTER.

    Must be created inside a running event loop: it serves handshakes in a background task.
    """

    def __init__(self, address: str, sync_address: str, *, sender: str, name: str = "pub",
                 hwm: int = 1000, linger_ms: int = DEFAULT_LINGER_MS,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        Sender.__init__(self, name, sender, max_message_bytes)
        self._open(zmq.PUB, address, True, hwm, linger_ms, max_message_bytes)
        self.sync = _make_socket(zmq.ROUTER, hwm, linger_ms, max_message_bytes)
        self.sync_address = _attach(self.sync, sync_address, True)
        self.seq = 0
        self.epoch = int.from_bytes(os.urandom(8), "big")
        """Random per publisher instance: a restarted publisher starts a new sequence, and
        subscribers must not discard its messages as already seen."""
        self.last: dict[str, list[bytes]] = {}
        self._server = asyncio.get_running_loop().create_task(self._serve_sync())

    async def send(self, msg: Message) -> None:
        frames = self.codec.encode(msg)
        tag = type(msg).__struct_config__.tag
        self.seq += 1
        if tag != "welcome":
            self.last[tag] = [bytes(memoryview(f).cast("B")) for f in frames]
        await self._send_frames([tag.encode(), _SEQ.pack(self.epoch, self.seq), *frames])
        self.stats.sent += 1

    async def _serve_sync(self) -> None:
        while True:
            ident, *frames = await self.sync.recv_multipart(copy=False)
            got = self._accept(frames)
            if got is None:
                continue
            _, msg = got
            if isinstance(msg, Hello):
                await self.send(Welcome(msg.nonce, self.seq + 1))
            elif isinstance(msg, SnapshotRequest):
                snap = Snapshot(self.seq, list(self.last.values()), self.epoch)
                await self.sync.send_multipart([ident, *self.codec.encode(snap)])

    def close(self) -> None:
        if not self._closed:
            self._server.cancel()
            self.sync.close()
        super().close()


class SubChannel(_ZmqChannel, Receiver):
    """Broadcast receiver; call ``await ready()`` (the handshake) before relying on it."""

    def __init__(self, address: str, sync_address: str, *, sender: str, name: str = "sub",
                 topics: Sequence[str] = ("",), hwm: int = 1000, linger_ms: int = DEFAULT_LINGER_MS,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        Receiver.__init__(self, name, sender, max_message_bytes)
        self._open(zmq.SUB, address, False, hwm, linger_ms, max_message_bytes)
        for t in {*topics, "welcome"} if "" not in topics else {""}:
            self.sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        self.topics = tuple(topics)
        self.sync = _make_socket(zmq.DEALER, hwm, 0, max_message_bytes)
        self.sync.connect(sync_address)
        self.sync_address = sync_address
        self.snapshot_seq = 0
        self.snapshot_epoch = -1
        self._pending: list[tuple[Envelope, Message]] = []
        self._early: list[tuple[int, Sequence[Any]]] = []

    async def ready(self, timeout: float = 10.0) -> None:
        """Handshake: returns once every later broadcast will reach this subscriber."""
        nonce = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if loop.time() > deadline:
                raise TimeoutError(f"no Welcome from {self.address} (sync {self.sync_address}) in {timeout}s")
            await self.sync.send_multipart(self.codec.encode(Hello(nonce)))
            if await self._await_welcome(nonce, loop.time() + HANDSHAKE_RETRY_S):
                break
        await self.sync.send_multipart(self.codec.encode(SnapshotRequest(nonce)))
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0 or not await self.sync.poll(remaining * 1000):
                raise TimeoutError(f"no Snapshot from {self.sync_address} in {timeout}s")
            got = self._accept(await self.sync.recv_multipart(copy=False))
            if got is not None and isinstance(got[1], Snapshot):
                break
        snap: Snapshot = got[1]
        self.snapshot_seq, self.snapshot_epoch = snap.seq, snap.epoch
        for frames in snap.messages:
            m = self._accept(frames)
            if m is not None and self._wanted(m[0].tag):
                self._pending.append(m)
        # Messages that arrived on SUB during the handshake, newer than the snapshot.
        for (epoch, seq), frames in self._early:
            if self._fresh(epoch, seq):
                m = self._accept(frames)
                if m is not None and not isinstance(m[1], Welcome):
                    self._pending.append(m)
        self._early.clear()

    def _wanted(self, tag: str) -> bool:
        return any(tag.startswith(t) for t in self.topics)

    def _fresh(self, epoch: int, seq: int) -> bool:
        """Not already reflected in the snapshot (a new publisher epoch is always fresh)."""
        return epoch != self.snapshot_epoch or seq > self.snapshot_seq

    async def _await_welcome(self, nonce: str, until: float) -> bool:
        loop = asyncio.get_running_loop()
        while (remaining := until - loop.time()) > 0:
            try:
                _, seq_b, *frames = await asyncio.wait_for(self._recv_frames(), remaining)
            except asyncio.TimeoutError:
                return False
            seq = _SEQ.unpack(seq_b.bytes)
            try:
                env = self.codec.decode_envelope(frames)
            except Exception:
                self._early.append((seq, frames))
                continue
            if env.tag == "welcome":
                _, msg = self.codec.decode(frames)
                if msg.nonce == nonce:
                    return True
                continue
            self._early.append((seq, frames))
        return False

    async def recv_envelope(self) -> tuple[Envelope, Message]:
        if self._pending:
            return self._pending.pop(0)
        while True:
            _, seq_b, *frames = await self._recv_frames()
            if not self._fresh(*_SEQ.unpack(seq_b.bytes)):
                continue
            got = self._accept(frames)
            if got is not None and not isinstance(got[1], Welcome):
                return got

    def close(self) -> None:
        if not self._closed:
            self.sync.close()
        super().close()


class RouterChannel(_ZmqChannel, Receiver):
    """Request/reply server end: ``recv_from`` gives the peer identity to ``send_to``."""

    def __init__(self, address: str, *, sender: str, name: str = "router", bind: bool = True,
                 hwm: int = DEFAULT_HWM, linger_ms: int = DEFAULT_LINGER_MS,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        Receiver.__init__(self, name, sender, max_message_bytes)
        self._open(zmq.ROUTER, address, bind, hwm, linger_ms, max_message_bytes)

    async def recv_from(self) -> tuple[bytes, Envelope, Message]:
        while True:
            ident, *frames = await self._recv_frames()
            got = self._accept(frames)
            if got is not None:
                return ident.bytes, got[0], got[1]

    async def recv_envelope(self) -> tuple[Envelope, Message]:
        _, env, msg = await self.recv_from()
        return env, msg

    async def send_to(self, ident: bytes, msg: Message) -> None:
        await self._send_frames([ident, *self.codec.encode(msg)])
        self.stats.sent += 1


class DealerChannel(_ZmqChannel, Sender, Receiver):
    """Request/reply client end."""

    def __init__(self, address: str, *, sender: str, name: str = "dealer", bind: bool = False,
                 hwm: int = DEFAULT_HWM, linger_ms: int = DEFAULT_LINGER_MS,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        Receiver.__init__(self, name, sender, max_message_bytes)
        self._open(zmq.DEALER, address, bind, hwm, linger_ms, max_message_bytes)

    async def send(self, msg: Message) -> None:
        await self._send_frames(self.codec.encode(msg))
        self.stats.sent += 1

    async def recv_envelope(self) -> tuple[Envelope, Message]:
        while True:
            got = self._accept(await self._recv_frames())
            if got is not None:
                return got


__all__ = [
    "PushChannel", "PullChannel", "PubChannel", "SubChannel", "RouterChannel", "DealerChannel",
    "context",
]

"""In-process twin of the ZeroMQ channels, for tests: same classes' interface, no sockets.

Addresses look like ``mem://name``. Messages still go through the codec (encoded to
frames, frames copied to ``bytes``, decoded on receipt), so a test on the twin exercises
the same serialisation and bad-input handling as the real bus.

Invariants (mirroring ``zmq_sockets``):
- PUSH → PULL: a bounded queue per address (``hwm``); ``send`` waits while it is full;
  several pullers on one address share the queue (load balancing), order is FIFO.
- PUB → SUB: every subscriber has its own queue; ``ready()`` delivers the publisher's
  last-value cache first, so late joiners miss nothing they need. A full subscriber queue
  drops the message, as PUB does.
- A hub lives per event loop; channels must be created inside a running loop.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, Sequence

from schemas.messages import Envelope, Message
from transport.base import DEFAULT_HWM, DEFAULT_MAX_MESSAGE_BYTES, Receiver, Sender

_HUBS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Hub]" = weakref.WeakKeyDictionary()


class _Hub:
    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue] = {}
        self.publishers: dict[str, "InprocPub"] = {}

    def queue(self, address: str, hwm: int) -> asyncio.Queue:
        if address not in self.queues:
            self.queues[address] = asyncio.Queue(maxsize=hwm)
        return self.queues[address]


def _hub() -> _Hub:
    loop = asyncio.get_running_loop()
    if loop not in _HUBS:
        _HUBS[loop] = _Hub()
    return _HUBS[loop]


def _wire(frames: Sequence[Any]) -> list[bytes]:
    return [bytes(memoryview(f).cast("B")) for f in frames]


class InprocPush(Sender):
    def __init__(self, address: str, *, sender: str, name: str = "push", hwm: int = DEFAULT_HWM,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, **_: Any) -> None:
        super().__init__(name, sender, max_message_bytes)
        self.address = address
        self._queue = _hub().queue(address, hwm)

    async def send(self, msg: Message) -> None:
        await self._queue.put(_wire(self.codec.encode(msg)))
        self.stats.sent += 1

    async def send_frames(self, frames: Sequence[Any]) -> None:
        """Put raw frames on the queue (tests use this to inject garbage)."""
        await self._queue.put(list(frames))

    def close(self) -> None:
        pass


class _QueueReceiver(Receiver):
    """Receives encoded frames from ``self._queue``; bad input is skipped (``base``)."""

    _queue: asyncio.Queue

    async def recv_envelope(self) -> tuple[Envelope, Message]:
        while True:
            got = self._accept(await self._queue.get())
            if got is not None:
                return got


class InprocPull(_QueueReceiver):
    def __init__(self, address: str, *, sender: str, name: str = "pull", hwm: int = DEFAULT_HWM,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, **_: Any) -> None:
        super().__init__(name, sender, max_message_bytes)
        self.address = address
        self._queue = _hub().queue(address, hwm)

    def close(self) -> None:
        pass


class InprocPub(Sender):
    def __init__(self, address: str, sync_address: str = "", *, sender: str, name: str = "pub",
                 hwm: int = 1000, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, **_: Any) -> None:
        super().__init__(name, sender, max_message_bytes)
        self.address = address
        self.sync_address = sync_address or address + "/sync"
        self.hwm = hwm
        self.last: dict[str, list[bytes]] = {}
        self.subscribers: list[InprocSub] = []
        _hub().publishers[address] = self

    async def send(self, msg: Message) -> None:
        frames = _wire(self.codec.encode(msg))
        tag = type(msg).__struct_config__.tag
        self.last[tag] = frames
        for sub in list(self.subscribers):
            if sub._wanted(tag) and not sub._queue.full():
                sub._queue.put_nowait(frames)
        self.stats.sent += 1

    def close(self) -> None:
        _hub().publishers.pop(self.address, None)


class InprocSub(_QueueReceiver):
    def __init__(self, address: str, sync_address: str = "", *, sender: str, name: str = "sub",
                 topics: Sequence[str] = ("",), hwm: int = 1000,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, **_: Any) -> None:
        super().__init__(name, sender, max_message_bytes)
        self.address = address
        self.topics = tuple(topics)
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=hwm)

    def _wanted(self, tag: str) -> bool:
        return any(tag.startswith(t) for t in self.topics)

    async def ready(self, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (pub := _hub().publishers.get(self.address)) is None:
            if loop.time() > deadline:
                raise TimeoutError(f"no publisher at {self.address} in {timeout}s")
            await asyncio.sleep(0.01)
        for tag, frames in pub.last.items():
            if self._wanted(tag):
                self._queue.put_nowait(frames)
        pub.subscribers.append(self)

    def close(self) -> None:
        pub = _hub().publishers.get(self.address)
        if pub is not None and self in pub.subscribers:
            pub.subscribers.remove(self)

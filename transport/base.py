"""The small interface every transport implements, and what they share.

A *channel* is one end of one socket pattern: it sends and/or receives typed ``Message``
values. Two implementations sit behind it: ZeroMQ (``transport.zmq_sockets``) and an
in-process twin (``transport.inproc``) with identical semantics for tests.

Failure behaviour shared by all receivers: a message that cannot be decoded (malformed,
unknown tag, newer schema, oversize) is logged with its sender and reason, counted in
``stats.rejected[reason]``, and skipped; the receiver keeps serving. Nothing is raised to
the caller for bad input.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import structlog

from schemas.messages import Envelope, Message
from transport.codec import REJECT_REASONS, Codec, DecodeError

log = structlog.get_logger("transport")

DEFAULT_HWM = 64
"""Messages queued per socket direction before senders block. Rollouts are ~256 KiB, so
64 bounds a queue to tens of MiB while keeping every consumer busy."""
DEFAULT_LINGER_MS = 2000
"""How long close() waits to flush queued messages; bounded so shutdown stays bounded."""
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
"""Largest accepted message (all frames). Weights never travel on the bus, so 1 GiB only
guards against garbage lengths."""


@dataclass
class SocketStats:
    """Counters of one channel; exported in heartbeats/metrics."""

    sent: int = 0
    received: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REJECT_REASONS})


FrameTap = Callable[[str, Sequence[Any]], None]
"""Called with (socket name, raw frames) for every received message; used to record."""


class Channel(abc.ABC):
    """One end of a socket. ``name`` identifies it in logs, stats and recordings."""

    def __init__(self, name: str, sender: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.name = name
        self.codec = Codec(sender, max_message_bytes)
        self.stats = SocketStats()
        self.taps: list[FrameTap] = []

    def _accept(self, frames: Sequence[Any]) -> tuple[Envelope, Message] | None:
        """Decode received frames; on bad input log, count and return None."""
        for tap in self.taps:
            tap(self.name, frames)
        try:
            env, msg = self.codec.decode(frames)
        except DecodeError as e:
            self.stats.rejected[e.reason] += 1
            log.warning("message rejected", socket=self.name, sender=e.sender, reason=e.reason, detail=e.detail)
            return None
        self.stats.received += 1
        return env, msg

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Sender(Channel):
    @abc.abstractmethod
    async def send(self, msg: Message) -> None:
        """Send one message; waits (back-pressure) while the peer's queue is full."""


class Receiver(Channel):
    @abc.abstractmethod
    async def recv_envelope(self) -> tuple[Envelope, Message]:
        """Next accepted message with its envelope; bad input is skipped, never raised."""

    async def recv(self) -> Message:
        return (await self.recv_envelope())[1]

    def __aiter__(self):
        return self

    async def __anext__(self) -> Message:
        return await self.recv()

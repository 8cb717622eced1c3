"""Record and replay of received message streams (format: docs/stream-format.md).

A ``StreamRecorder`` is a frame tap: attach it to any receiving channel
(``channel.taps.append(recorder)``) and every received message's raw frames are appended,
as received, before decoding — so rejected garbage is recorded too and can be replayed.

Invariants:
- Append-only; each record is written with one ``write`` call and flushed, so a crash
  leaves at most a truncated last record, which the reader reports and stops at.
- ``read_stream`` yields records in file order; ``read_messages`` decodes them with a
  ``Codec`` and skips (and counts) records that do not decode, like a live receiver.
- The replayer sends frames as recorded (no re-encoding), at recorded pace or at full speed.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from schemas.messages import Envelope, Message
from transport.codec import Codec, DecodeError

MAGIC = b"CVYSTRM1"
_HEAD = struct.Struct("<IdHI")  # record_len, recv_time, name_len, n_frames
_FLEN = struct.Struct("<I")


@dataclass(frozen=True)
class StreamRecord:
    recv_time: float
    socket: str
    frames: list[bytes]


class StreamRecorder:
    """Appends received frames to a stream file; callable as a channel tap."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._f = open(self.path, "ab", buffering=0)
        if new:
            self._f.write(MAGIC)
        self.records = 0

    def __call__(self, socket: str, frames: Sequence[Any]) -> None:
        name = socket.encode()
        views = [memoryview(getattr(f, "buffer", f)).cast("B") for f in frames]
        body_len = _HEAD.size - 4 + len(name) + sum(_FLEN.size + len(v) for v in views)
        parts = [_HEAD.pack(body_len, time.time(), len(name), len(views)), name]
        for v in views:
            parts += [_FLEN.pack(len(v)), v]
        self._f.write(b"".join(parts))
        self.records += 1

    def close(self) -> None:
        self._f.close()


class TruncatedStream(Exception):
    pass


def read_stream(path: str | Path) -> Iterator[StreamRecord]:
    """Records of a stream file, in order. A truncated final record ends the iteration."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path}: not a stream file (magic {data[:8]!r})")
    pos = len(MAGIC)
    while pos < len(data):
        if pos + _HEAD.size > len(data):
            return
        body_len, t, name_len, n = _HEAD.unpack_from(data, pos)
        end = pos + 4 + body_len
        if end > len(data):
            return
        p = pos + _HEAD.size
        name = data[p : p + name_len].decode()
        p += name_len
        frames = []
        for _ in range(n):
            (flen,) = _FLEN.unpack_from(data, p)
            p += _FLEN.size
            frames.append(data[p : p + flen])
            p += flen
        yield StreamRecord(t, name, frames)
        pos = end


def read_messages(path: str | Path, codec: Codec | None = None) -> Iterator[tuple[StreamRecord, Envelope, Message]]:
    """Typed messages of a stream file; records that fail to decode are skipped."""
    codec = codec or Codec("replay")
    for rec in read_stream(path):
        try:
            env, msg = codec.decode(rec.frames)
        except DecodeError:
            continue
        yield rec, env, msg


async def replay_into(path: str | Path, send_frames: Any, *, speed: float | None = None) -> int:
    """Feed a recording's frames to ``send_frames(frames)`` (an async callable, e.g. a zmq
    socket's ``send_multipart`` or ``InprocPush.send_frames``). ``speed=None`` is as fast as
    the receiver takes them; ``speed=1.0`` reproduces the recorded gaps. Returns the count."""
    n = 0
    first_t = start = None
    for rec in read_stream(path):
        if speed:
            if first_t is None:
                first_t, start = rec.recv_time, time.monotonic()
            delay = (rec.recv_time - first_t) / speed - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
        await send_frames(rec.frames)
        n += 1
    return n

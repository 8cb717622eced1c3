"""Codec: typed messages ⇄ ZeroMQ multipart frames.

Frame layout of one message::

    frame 0   Envelope (msgpack, array_like)          schema version, msg id, sender, time, tag
    frame 1   body (msgpack, tagged union ``Message``) arrays appear as [dtype, shape, ref]
    frame 2   pool: mid-sized arrays packed back to back (16-byte aligned); absent when the
              message has no arrays above the inline size
    frame 3.. large arrays, one frame each, sent from the array's own memory

An array field is encoded as ``[dtype_str, shape, ref]`` where ``ref`` is the raw bytes
inline (arrays under ``INLINE_MAX_BYTES``), ``[offset]`` into the pool frame (up to
``OWN_FRAME_MIN_BYTES``), or an int: the index of its own frame counted from frame 3.

Invariants and failure behaviour:
- No pickle: msgpack and raw buffers only.
- ``decode`` never raises anything but ``DecodeError``; its ``reason`` is one of
  ``REJECT_REASONS`` so receivers can count rejections by kind. The sender named in the
  error is whatever the envelope said, or ``?`` when even that was unreadable.
- Decoded arrays are read-only views of the received frames (zero-copy), whether the
  frames are ``bytes`` or writable ``zmq.Frame`` buffers.
- A pool frame is written into a buffer the codec reuses once nothing references the frame
  any more (zmq done sending it, the caller dropped it); a frame still referenced anywhere
  is never overwritten. Encoded frames are therefore buffers (bytes or memoryview).
- A codec instance is not thread-safe (it keeps the frame list of the message in progress
  and its pool buffers); give each socket its own.
"""

from __future__ import annotations

import collections
import itertools
import sys
import time
from typing import Any, Sequence

import msgspec
import numpy as np

from schemas.messages import SCHEMA_VERSION, TAGS, Envelope, Message

INLINE_MAX_BYTES = 1024
"""Arrays below this go inline as msgpack bin: tiny (prompt ids, rewards), a memcpy is
cheaper than any bookkeeping."""
OWN_FRAME_MIN_BYTES = 1 << 20
"""Arrays at least this large get their own frame, sent without a copy. Between the two
bounds arrays share one pool frame: one memcpy on send, zero-copy views on receive. On a
Rollout of 8×4096 tokens (16 KiB arrays) this beat one frame per array, because pyzmq
copies every frame under its 64 KiB ``copy_threshold`` anyway and each frame costs a
zmq_msg and a Python Frame object on receive."""
POOL_ALIGN = 16
"""Pool offsets are aligned so decoded views are aligned for numpy and torch."""
POOL_RETAIN_MAX_BYTES = 64 << 20
"""Pool buffers a codec keeps for reuse, in bytes. A fresh pool buffer per message (what
``b"".join`` gives) costs page faults on every send (glibc hands large blocks back to the
kernel): on the 8×4096 Rollout that was ~20 faults and ~100 µs of a ~200 µs send, more than
the encode itself. Reused buffers fault once. A buffer stays referenced while it is queued in
zmq (HWM 64 messages plus what the IO thread and pyzmq's gc thread still hold: up to ~140
Rollouts of 257 KiB measured, ~36 MiB), so 64 MiB covers a full queue of such messages; past
it, buffers are allocated per message as before (correct, just slower)."""
POOL_REUSE_MAX_BYTES = 8 << 20
"""Pool frames larger than this are not kept for reuse (a handful of them would fill the
retained budget); their page faults are small next to the copy of that many bytes."""

REJECT_REASONS = ("malformed", "unknown_tag", "newer_schema", "oversize")


class DecodeError(Exception):
    """A received message was refused; ``reason`` is one of ``REJECT_REASONS``."""

    def __init__(self, reason: str, sender: str, detail: str) -> None:
        super().__init__(f"{reason} from {sender}: {detail}")
        self.reason = reason
        self.sender = sender
        self.detail = detail


class Codec:
    """Encodes ``Message`` values to frames and back, for one socket."""

    def __init__(self, sender: str, max_message_bytes: int = 1 << 30) -> None:
        self.sender = sender
        self.max_message_bytes = max_message_bytes
        self._ids = itertools.count(1)
        self._out_arrays: list[np.ndarray] = []
        self._out_pool: list[np.ndarray] = []
        self._pool_len = 0
        self._ring: collections.deque[bytearray] = collections.deque()
        self._ring_bytes = 0
        self._in_pool: Any = b""
        self._in_views: dict[np.dtype, np.ndarray] = {}
        self._in_frames: Sequence[Any] = ()
        self._env_enc = msgspec.msgpack.Encoder()
        self._body_enc = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._env_dec = msgspec.msgpack.Decoder(Envelope)
        self._body_dec = msgspec.msgpack.Decoder(Message, dec_hook=self._dec_hook)

    # ------------------------------------------------------------------ encode
    def _enc_hook(self, arr: Any) -> Any:
        # Hot path (once per array): no contiguity check for pooled arrays (the copy in
        # ``_fill_pool`` handles any layout), dtype strings cached, pooled arrays are only
        # collected here and copied once the pool's size is known.
        if type(arr) is not np.ndarray:
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"cannot encode {type(arr).__name__} on the wire")
            arr = np.asarray(arr)
        n = arr.nbytes
        if n < INLINE_MAX_BYTES:
            ref: Any = arr.tobytes()
        elif n < OWN_FRAME_MIN_BYTES:
            ref = (self._pool_len,)
            self._out_pool.append(arr)
            self._pool_len += (n + _ALIGN_MASK) & ~_ALIGN_MASK
        else:
            if not arr.flags.c_contiguous:
                arr = np.ascontiguousarray(arr)
            self._out_arrays.append(arr)  # zmq sends it from the array's own memory
            ref = len(self._out_arrays) - 1
        dt = arr.dtype
        return (_DTYPE_STR.get(dt) or _DTYPE_STR.setdefault(dt, dt.str), arr.shape, ref)

    def _pool_buffer(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes that nothing else references."""
        ring = self._ring
        # The oldest buffer first: frames are released in the order they were sent. (No
        # local name may hold it while it is checked: that would count as a reference.)
        free = bool(ring) and _unreferenced(ring)
        if free and len(ring[0]) >= size:
            ring.rotate(-1)
            return ring[-1]
        cap = _capacity(size)
        buf = bytearray(cap)
        if size <= POOL_REUSE_MAX_BYTES:
            if free:  # free but too small: replace it
                self._ring_bytes -= len(ring.popleft())
            if self._ring_bytes + cap <= POOL_RETAIN_MAX_BYTES:
                ring.append(buf)
                self._ring_bytes += cap
        return buf

    def _fill_pool(self) -> memoryview:
        """Copy the collected mid-sized arrays into one pool buffer; its frame."""
        size = self._pool_len
        out = memoryview(self._pool_buffer(size))
        off = 0
        for arr in self._out_pool:
            n = arr.nbytes
            try:
                out[off : off + n] = arr.data.cast("B")
            except TypeError:  # not C-contiguous (memoryview.cast refuses): copy its C-order bytes
                out[off : off + n] = arr.tobytes()
            end = off + n
            off = (end + _ALIGN_MASK) & ~_ALIGN_MASK
            if off != end:
                out[end:off] = _ZEROS[: off - end]
        return out[:size]

    def encode(self, msg: Message) -> list[Any]:
        """Frames for ``msg``: [envelope, body, *array buffers]."""
        tag = type(msg).__struct_config__.tag
        env = Envelope(SCHEMA_VERSION, next(self._ids), self.sender, time.time(), tag)
        try:
            body = self._body_enc.encode(msg)
            if not self._out_pool:
                if not self._out_arrays:
                    return [self._env_enc.encode(env), body]  # no arrays: no pool frame
                return [self._env_enc.encode(env), body, b"", *self._out_arrays]
            return [self._env_enc.encode(env), body, self._fill_pool(), *self._out_arrays]
        finally:
            self._out_arrays, self._out_pool, self._pool_len = [], [], 0

    # ------------------------------------------------------------------ decode
    def _dec_hook(self, typ: type, obj: Any) -> Any:
        # Hot path (once per array). Pooled arrays are slices of one typed view of the pool
        # per dtype (a slice is ~4× cheaper than np.frombuffer); every view is read-only.
        if typ is not np.ndarray:
            raise TypeError(f"no decoder for {typ!r}")
        dtype, shape, ref = obj
        dt = _DTYPES.get(dtype) or _wire_dtype(dtype)
        if len(shape) == 1:
            count = shape[0]
            if count < 0:
                raise ValueError(f"negative dimension in shape {shape}")
        else:
            count = 1
            for d in shape:
                if d < 0:
                    raise ValueError(f"negative dimension in shape {shape}")
                count *= d
        t = type(ref)
        if t is list:
            (off,) = ref
            isz = dt.itemsize
            if off % isz or _ALIGN_MASK + 1 < isz:  # not on an element boundary: no shared view
                arr = np.frombuffer(self._in_pool, dt, count, off)
            else:
                view = self._in_views.get(dt)
                if view is None:
                    pool = self._in_pool
                    view = self._in_views[dt] = np.frombuffer(pool, dt, len(pool) // isz)
                i = off // isz
                if off < 0 or i + count > len(view):
                    raise ValueError(f"array [{off}, +{count * isz}) outside the pool frame")
                arr = view[i : i + count]
        elif t is int:
            if ref < 0:
                raise ValueError(f"negative frame reference {ref}")
            arr = np.frombuffer(_readonly(self._in_frames[ref]), dt, count)
        else:
            arr = np.frombuffer(ref, dt, count)
        return arr if len(shape) == 1 else arr.reshape(shape)

    def decode_envelope(self, frames: Sequence[Any]) -> Envelope:
        if not frames:
            raise DecodeError("malformed", "?", "no frames")
        try:
            return self._env_dec.decode(_bytes_of(frames[0]))
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise DecodeError("malformed", "?", f"bad envelope: {e}") from None

    def decode(self, frames: Sequence[Any]) -> tuple[Envelope, Message]:
        """(envelope, message) from received frames, or ``DecodeError``."""
        env = self.decode_envelope(frames)
        size = sum(len(_bytes_of(f)) for f in frames)
        if size > self.max_message_bytes:
            raise DecodeError("oversize", env.sender, f"{size} bytes > limit {self.max_message_bytes}")
        if env.schema_version > SCHEMA_VERSION:
            raise DecodeError(
                "newer_schema", env.sender, f"schema {env.schema_version} > ours {SCHEMA_VERSION}"
            )
        if env.tag not in TAGS:
            raise DecodeError("unknown_tag", env.sender, f"unknown message tag {env.tag!r}")
        if len(frames) < 2:
            raise DecodeError("malformed", env.sender, "no body frame")
        self._in_pool = _readonly(frames[2]) if len(frames) > 2 else b""
        self._in_frames = frames[3:]
        try:
            msg = self._body_dec.decode(_bytes_of(frames[1]))
        except Exception as e:  # msgspec's errors, and whatever a hostile array header provokes
            raise DecodeError("malformed", env.sender, f"bad {env.tag} body: {e}") from None
        finally:
            self._in_frames, self._in_pool = (), b""
            if self._in_views:
                self._in_views = {}
        return env, msg


_DTYPES: dict[str, np.dtype] = {}
_DTYPE_STR: dict[np.dtype, str] = {}
_ZEROS = bytes(POOL_ALIGN)
_ALIGN_MASK = POOL_ALIGN - 1


def _wire_dtype(name: str) -> np.dtype:
    """The dtype a wire dtype string names (cached). Refused: object dtypes (their bytes would
    be read as pointers) and zero-size ones (no element count follows from a byte length)."""
    dt = np.dtype(name)
    if dt.hasobject or not dt.itemsize:
        raise ValueError(f"dtype {name!r} cannot travel on the wire")
    return _DTYPES.setdefault(name, dt)


def _capacity(size: int) -> int:
    """Pool buffer size for ``size`` bytes: rounded up to 1/8 of its power of two (≤ 12.5%
    slack), so messages of slightly different sizes can share buffers."""
    step = 1 << max(size.bit_length() - 3, 12)
    return (size + step - 1) // step * step


def _unreferenced(ring: "collections.deque[bytearray]") -> bool:
    """True when ``ring[0]`` is referenced by the ring alone: no frame, memoryview, numpy
    view or zmq message (pyzmq keeps the frame object until libzmq frees it) still uses it."""
    return sys.getrefcount(ring[0]) <= _FREE_REFS


def _calibrate_free_refs() -> int:
    ring = collections.deque([bytearray(1)])
    return sys.getrefcount(ring[0])


_FREE_REFS = _calibrate_free_refs()
"""What ``_unreferenced`` sees for a buffer held by its ring alone (2 on CPython 3.11);
measured the same way rather than assumed, as interpreters count borrowed references
differently."""


def _bytes_of(frame: Any) -> Any:
    """Buffer view of a frame (bytes, memoryview or zmq.Frame) without copying."""
    return getattr(frame, "buffer", frame)


def _readonly(frame: Any) -> Any:
    """Read-only buffer of a frame without copying (zmq.Frame buffers are writable)."""
    b = getattr(frame, "buffer", frame)
    return b if type(b) is bytes else memoryview(b).toreadonly()

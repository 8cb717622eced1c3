"""Codec: typed messages ⇄ ZeroMQ multipart frames.

Frame layout of one message::

    frame 0   head + pool, one buffer:
                head   magic 0xC1, layout 1 (u8 each), envelope length (u16), body length (u32)
                       (``_HEAD``, little-endian), the Envelope (msgpack, array_like: schema
                       version, msg id, sender, time, tag), the body (msgpack, tagged union
                       ``Message``; arrays appear as [dtype, shape, ref]), zero pad to 16 bytes
                pool   mid-sized arrays packed back to back (16-byte aligned); empty when the
                       message has no arrays above the inline size
    frame 1.. large arrays, one frame each, sent from the array's own memory

One frame for everything but large arrays: each ZeroMQ frame costs a zmq_msg, a send call
and a Python Frame object on receive, which on a Rollout of 8×4096 tokens was ~11 % of raw
pyzmq's rate (the same bytes as 3 frames against 1, ``ops/bench/bus.py``'s setup). 0xC1 is
the one byte msgpack never uses, so a frame 0 starting with it cannot be the first layout,
which the decoder still reads (recordings made before it): frame 0 Envelope, frame 1 body,
frame 2 pool, frames 3.. large arrays.

An array field is encoded as ``[dtype_str, shape, ref]`` where ``ref`` is the raw bytes
inline (arrays under ``INLINE_MAX_BYTES``), ``[offset]`` into the pool (up to
``OWN_FRAME_MIN_BYTES``), or an int: the index of its own frame among the large-array frames.

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
import io
import itertools
import struct
import sys
import time
from typing import Any, Sequence

import msgspec
import numpy as np

from schemas.messages import SCHEMA_VERSION, TAGS, Envelope, Message

INLINE_MAX_BYTES = 1024
"""Arrays below this go inline as msgpack bin: tiny (prompt ids, rewards), a memcpy is
cheaper than any bookkeeping."""
OWN_FRAME_MIN_BYTES = 256 << 10
"""Arrays at least this large get their own frame, sent without a copy. Between the two
bounds arrays share one pool frame: one memcpy on send, zero-copy views on receive. On a
Rollout of 8×4096 tokens (16 KiB arrays) the pool beats one frame per array by ~2× in
throughput (pyzmq copies every frame under its 64 KiB ``copy_threshold`` anyway, each frame
costs a zmq_msg, a send call and a Python Frame object on receive). The crossover, measured
with ``ops/bench/bus.py``'s setup on Rollouts of 4 samples (ours/raw, pool vs own frames):
64 KiB arrays 0.76 vs 0.59, 256 KiB 0.54 vs 0.54, 512 KiB 0.66 vs 0.72: copying a large
array costs more than a zero-copy frame's overhead from there on."""
POOL_ALIGN = 16
"""Pool offsets are 16-byte aligned within the frame so decoded views are aligned for numpy
and torch as far as the frame itself is (libzmq hands large received frames over 8-byte
aligned; small ones can start anywhere in its receive batch)."""
POOL_RETAIN_MAX_BYTES = 64 << 20
"""Pool buffers a codec keeps for reuse, in bytes. A fresh pool buffer per message (what
``b"".join`` gives) costs page faults on every send (glibc hands large blocks back to the
kernel): on the 8×4096 Rollout that was ~20 faults and ~100 µs of a ~200 µs send, more than
the encode itself. Reused buffers fault once. A buffer stays referenced while it is queued in
zmq (HWM 64 messages plus what the IO thread and pyzmq's gc thread still hold: up to ~140
Rollouts of 257 KiB measured, ~36 MiB), so 64 MiB covers a full queue of such messages; past
it, buffers are allocated per message as before (correct, just slower)."""
SMALL_CACHE_MAX_BYTES = 64
"""Inline arrays up to this size are decoded once per distinct value and shared (they are
read-only): version spans such as ``[[0, v]]`` repeat in every sample of every Rollout."""
SMALL_CACHE_ENTRIES = 4096
"""Distinct small arrays a codec keeps; the cache is emptied when it is full."""
POOL_REUSE_MAX_BYTES = 8 << 20
"""Pool frames larger than this are not kept for reuse (a handful of them would fill the
retained budget); their page faults are small next to the copy of that many bytes."""

REJECT_REASONS = ("malformed", "unknown_tag", "newer_schema", "oversize")

PACKED_MAGIC = 0xC1
"""First byte of a one-buffer head frame: msgpack never uses it, an Envelope never starts with it."""
PACKED_LAYOUT = 1
_HEAD = struct.Struct("<BBHI")


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
        self._pool_len = 0
        self._out_pool: list[Any] = []  # arrays (and pads) of the pool frame being encoded
        self._busy: collections.deque[io.BytesIO] = collections.deque()  # handed out, in order
        self._free: list[io.BytesIO] = []  # released; the last one released on top
        self._pool_bytes = 0  # retained in both
        self._in_pool: Any = b""
        self._in_views: dict[np.dtype, np.ndarray] = {}
        self._small: dict[tuple[str, tuple, bytes], np.ndarray] = {}
        self._in_frames: Sequence[Any] = ()
        self._env_enc = msgspec.msgpack.Encoder()
        self._body_enc = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._env_dec = msgspec.msgpack.Decoder(Envelope)
        self._body_dec = msgspec.msgpack.Decoder(Message, dec_hook=self._dec_hook)

    # ------------------------------------------------------------------ encode
    def _enc_hook(self, arr: Any) -> Any:
        # Hot path (once per array): pooled arrays are only listed here (with their pad) and
        # copied in one ``writelines`` call once the body is encoded; dtype strings cached.
        if type(arr) is not np.ndarray:
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"cannot encode {type(arr).__name__} on the wire")
            arr = np.asarray(arr)
        n = arr.nbytes
        if n < INLINE_MAX_BYTES:
            ref: Any = arr.tobytes()
        elif n < OWN_FRAME_MIN_BYTES:
            off = self._pool_len
            self._out_pool.append(arr)
            pad = -n & _ALIGN_MASK
            if pad:  # zeros, not bytes of an earlier message
                self._out_pool.append(_ZEROS[:pad])
            self._pool_len = off + n + pad
            ref = (off,)
        else:
            if not arr.flags.c_contiguous:
                arr = np.ascontiguousarray(arr)
            self._out_arrays.append(arr)  # zmq sends it from the array's own memory
            ref = len(self._out_arrays) - 1
        dt = arr.dtype
        return (_DTYPE_STR.get(dt) or _DTYPE_STR.setdefault(dt, dt.str), arr.shape, ref)

    def _pool_buffer(self) -> io.BytesIO:
        """A pool buffer that nothing else references, positioned at its start."""
        busy, free = self._busy, self._free
        # Frames are released in the order they were sent: collect the released ones from
        # the front. (No local name may hold a buffer while it is checked: that would count
        # as a reference.)
        while busy and _unreferenced(busy):
            free.append(busy.popleft())
        if free:
            buf = free.pop()  # the last released: the likeliest to still be in cache
            buf.seek(0)
        else:
            buf = io.BytesIO()
            buf.size = 0  # bytes it holds (its largest message so far)
        busy.append(buf)
        return buf

    def _fill_pool(self, head: list[Any], head_len: int) -> memoryview:
        """Frame 0: ``head`` (``head_len`` bytes, padded to the pool's alignment) then the
        listed arrays, copied back to back into a reused buffer."""
        parts = head + self._out_pool
        size = head_len + self._pool_len
        if size > POOL_REUSE_MAX_BYTES:
            return memoryview(b"".join([_contiguous(p) for p in parts]))
        buf = self._pool_buffer()
        try:
            buf.writelines(parts)  # one C loop of memcpys
        except ValueError:  # an array that is not C-contiguous: its C-order copy
            buf.seek(0)
            buf.writelines([_contiguous(p) for p in parts])
        if size > buf.size:  # a new buffer, or a larger message than it held before
            self._pool_bytes += size - buf.size
            buf.size = size
            free = self._free
            while self._pool_bytes > POOL_RETAIN_MAX_BYTES and free:
                self._pool_bytes -= free.pop(0).size  # spare buffers, coldest first
            if self._pool_bytes > POOL_RETAIN_MAX_BYTES:  # still over: do not keep this one
                self._busy.pop()
                self._pool_bytes -= size
        return buf.getbuffer()[:size]

    def encode(self, msg: Message) -> list[Any]:
        """Frames for ``msg``: [head + pool, *large array buffers]."""
        tag = type(msg).__struct_config__.tag
        env = self._env_enc.encode(Envelope(SCHEMA_VERSION, next(self._ids), self.sender, time.time(), tag))
        try:
            body = self._body_enc.encode(msg)
            n = _HEAD.size + len(env) + len(body)
            head = [_HEAD.pack(PACKED_MAGIC, PACKED_LAYOUT, len(env), len(body)), env, body]
            if not self._out_pool:
                return [b"".join(head), *self._out_arrays]
            pad = -n & _ALIGN_MASK
            if pad:
                head.append(_ZEROS[:pad])
            return [self._fill_pool(head, n + pad), *self._out_arrays]
        finally:
            self._out_arrays, self._out_pool, self._pool_len = [], [], 0

    # ------------------------------------------------------------------ decode
    def _dec_hook(self, typ: type, obj: Any) -> Any:
        # Hot path (once per array). The common case, a 1-D array at an aligned pool offset,
        # is a slice of one typed view of the pool per dtype (~4× cheaper than np.frombuffer);
        # everything else, and anything that does not check out here, goes to ``_array``.
        if typ is not _NDARRAY:
            raise TypeError(f"no decoder for {typ!r}")
        dtype, shape, ref = obj
        if type(ref) is bytes and len(ref) <= SMALL_CACHE_MAX_BYTES:
            key = (dtype, tuple(shape) if type(shape) is list else shape, ref)
            try:
                return self._small[key]
            except (KeyError, TypeError):  # TypeError: an unhashable (malformed) shape
                pass
            arr = self._array(dtype, shape, ref)
            small = self._small
            if len(small) >= SMALL_CACHE_ENTRIES:
                small.clear()
            try:
                small[key] = arr
            except TypeError:
                pass
            return arr
        if type(ref) is list:
            pv = self._in_views.get(dtype)
            if pv is None:
                pv = self._pool_view(dtype)
            if pv:
                try:
                    (count,) = shape
                    (off,) = ref
                except (TypeError, ValueError):
                    pass
                else:
                    if off >= 0 and not off & _ALIGN_MASK:
                        i = off >> pv[1]
                        arr = pv[0][i : i + count]
                        if len(arr) == count:  # a slice clamps; a short one is checked below
                            return arr
        return self._array(dtype, shape, ref)

    def _pool_view(self, dtype: Any) -> Any:
        """(typed view of the whole pool, log2 itemsize) for ``dtype``, or False when its
        itemsize does not divide ``POOL_ALIGN`` (aligned offsets would not be element
        boundaries). Cached for the message being decoded."""
        dt, isz, sliceable = _SPECS.get(dtype) or _wire_spec(dtype)
        pv: Any = False
        if sliceable:
            pool = self._in_pool
            pv = (np.frombuffer(pool, dt, len(pool) // isz), isz.bit_length() - 1)
        self._in_views[dtype] = pv
        return pv

    def _array(self, dtype: Any, shape: Any, ref: Any) -> np.ndarray:
        """Any array reference (inline, pool, own frame), checked; a read-only view."""
        dt = (_SPECS.get(dtype) or _wire_spec(dtype))[0]
        t = type(ref)
        if t is list:
            (off,) = ref
            if off < 0:
                raise ValueError(f"negative pool offset {off}")
            buf = self._in_pool
        elif t is int:
            if ref < 0:
                raise ValueError(f"negative frame reference {ref}")
            buf, off = _readonly(self._in_frames[ref]), 0
        else:
            buf, off = ref, 0
        # np.ndarray refuses negative dimensions and a buffer too small for them.
        return np.ndarray(shape, dt, buf, off)

    def _split(self, frames: Sequence[Any]) -> tuple[Any, Any, Any, Sequence[Any]]:
        """(envelope bytes, body bytes or None, pool buffer, large-array frames) of either
        layout, without copying; ``DecodeError`` when frame 0's head does not add up."""
        if not frames:
            raise DecodeError("malformed", "?", "no frames")
        f0 = _bytes_of(frames[0])
        if len(f0) >= _HEAD.size and f0[0] == PACKED_MAGIC:
            view = memoryview(f0)
            magic, layout, env_len, body_len = _HEAD.unpack_from(view)
            end = _HEAD.size + env_len + body_len
            if layout != PACKED_LAYOUT or end > len(view):
                raise DecodeError("malformed", "?", f"head frame of layout {layout} declares {end} bytes, "
                                                    f"has {len(view)}")
            start = end + (-end & _ALIGN_MASK)
            pool = view.toreadonly()[start:] if start < len(view) else b""
            return view[_HEAD.size:_HEAD.size + env_len], view[_HEAD.size + env_len:end], pool, frames[1:]
        # The first layout: envelope, body, pool, large arrays.
        return (f0, _bytes_of(frames[1]) if len(frames) > 1 else None,
                _readonly(frames[2]) if len(frames) > 2 else b"", frames[3:])

    def _envelope(self, raw: Any) -> Envelope:
        try:
            return self._env_dec.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise DecodeError("malformed", "?", f"bad envelope: {e}") from None

    def decode_envelope(self, frames: Sequence[Any]) -> Envelope:
        return self._envelope(self._split(frames)[0])

    def decode(self, frames: Sequence[Any]) -> tuple[Envelope, Message]:
        """(envelope, message) from received frames, or ``DecodeError``."""
        raw_env, body, pool, large = self._split(frames)
        env = self._envelope(raw_env)
        size = sum(len(_bytes_of(f)) for f in frames)
        if size > self.max_message_bytes:
            raise DecodeError("oversize", env.sender, f"{size} bytes > limit {self.max_message_bytes}")
        if env.schema_version > SCHEMA_VERSION:
            raise DecodeError(
                "newer_schema", env.sender, f"schema {env.schema_version} > ours {SCHEMA_VERSION}"
            )
        if env.tag not in TAGS:
            raise DecodeError("unknown_tag", env.sender, f"unknown message tag {env.tag!r}")
        if body is None:
            raise DecodeError("malformed", env.sender, "no body frame")
        self._in_pool = pool
        self._in_frames = large
        try:
            msg = self._body_dec.decode(body)
        except Exception as e:  # msgspec's errors, and whatever a hostile array header provokes
            raise DecodeError("malformed", env.sender, f"bad {env.tag} body: {e}") from None
        finally:
            self._in_frames, self._in_pool = (), b""
            if self._in_views:
                self._in_views = {}
        return env, msg


_SPECS: dict[str, tuple[np.dtype, int, bool]] = {}
"""Wire dtype string → (dtype, itemsize, whether pool offsets of it can be sliced from one
typed view: itemsizes dividing ``POOL_ALIGN``)."""
_DTYPE_STR: dict[np.dtype, str] = {}
_ZEROS = bytes(POOL_ALIGN)
_ALIGN_MASK = POOL_ALIGN - 1
_NDARRAY = np.ndarray


def _wire_spec(name: str) -> tuple[np.dtype, int, bool]:
    """``_SPECS`` entry of a wire dtype string (cached). Refused: object dtypes (their bytes
    would be read as pointers) and zero-size ones."""
    if type(name) is not str:
        raise TypeError(f"dtype must be a string, got {type(name).__name__}")
    dt = np.dtype(name)
    if dt.hasobject or not dt.itemsize:
        raise ValueError(f"dtype {name!r} cannot travel on the wire")
    isz = dt.itemsize
    return _SPECS.setdefault(name, (dt, isz, POOL_ALIGN % isz == 0))


def _contiguous(part: Any) -> Any:
    return part if type(part) is bytes else np.ascontiguousarray(part)


def _unreferenced(busy: "collections.deque[io.BytesIO]") -> bool:
    """True when ``busy[0]`` is referenced by the deque alone: no frame, memoryview, numpy
    view or zmq message (pyzmq keeps the frame object until libzmq frees it) still uses it."""
    return sys.getrefcount(busy[0]) <= _FREE_REFS


def _calibrate_free_refs() -> int:
    busy = collections.deque([io.BytesIO()])
    return sys.getrefcount(busy[0])


_FREE_REFS = _calibrate_free_refs()
"""What ``_unreferenced`` sees for a buffer held by its deque alone (2 on CPython 3.11);
measured the same way rather than assumed, as interpreters count borrowed references
differently."""


def _bytes_of(frame: Any) -> Any:
    """Buffer view of a frame (bytes, memoryview or zmq.Frame) without copying."""
    return getattr(frame, "buffer", frame)


def _readonly(frame: Any) -> Any:
    """Read-only buffer of a frame without copying (zmq.Frame buffers are writable)."""
    b = getattr(frame, "buffer", frame)
    return b if type(b) is bytes else memoryview(b).toreadonly()

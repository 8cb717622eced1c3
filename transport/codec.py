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
- Decoded arrays are read-only views of the received frames (zero-copy).
- A codec instance is not thread-safe (it keeps the frame list of the message in progress);
  give each socket its own.
"""

from __future__ import annotations

import itertools
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
        self._out_pool: list[Any] = []
        self._pool_len = 0
        self._in_pool: Any = b""
        self._in_frames: Sequence[Any] = ()
        self._env_enc = msgspec.msgpack.Encoder()
        self._body_enc = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._env_dec = msgspec.msgpack.Decoder(Envelope)
        self._body_dec = msgspec.msgpack.Decoder(Message, dec_hook=self._dec_hook)

    # ------------------------------------------------------------------ encode
    def _enc_hook(self, arr: Any) -> Any:
        # Hot path (once per array): no ascontiguousarray call when already contiguous,
        # dtype strings cached, the pool keeps views (joined once per message).
        if type(arr) is not np.ndarray:
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"cannot encode {type(arr).__name__} on the wire")
            arr = np.asarray(arr)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        n = arr.nbytes
        if n < INLINE_MAX_BYTES:
            ref: Any = arr.tobytes()
        elif n < OWN_FRAME_MIN_BYTES:
            ref = (self._pool_len,)
            self._out_pool.append(arr.data if arr.ndim else arr.tobytes())
            pad = -n % POOL_ALIGN
            if pad:
                self._out_pool.append(_ZEROS[:pad])
            self._pool_len += n + pad
        else:
            self._out_arrays.append(arr)  # zmq sends it from the array's own memory
            ref = len(self._out_arrays) - 1
        dt = arr.dtype
        return (_DTYPE_STR.get(dt) or _DTYPE_STR.setdefault(dt, dt.str), arr.shape, ref)

    def encode(self, msg: Message) -> list[Any]:
        """Frames for ``msg``: [envelope, body, *array buffers]."""
        tag = type(msg).__struct_config__.tag
        env = Envelope(SCHEMA_VERSION, next(self._ids), self.sender, time.time(), tag)
        try:
            body = self._body_enc.encode(msg)
            if not self._out_pool and not self._out_arrays:
                return [self._env_enc.encode(env), body]  # no arrays: no pool frame
            return [self._env_enc.encode(env), body, b"".join(self._out_pool), *self._out_arrays]
        finally:
            self._out_arrays, self._out_pool, self._pool_len = [], [], 0

    # ------------------------------------------------------------------ decode
    def _dec_hook(self, typ: type, obj: Any) -> Any:
        if typ is np.ndarray:
            dtype, shape, ref = obj
            dt = _DTYPES.get(dtype) or _DTYPES.setdefault(dtype, np.dtype(dtype))
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
                arr = np.frombuffer(self._in_pool, dt, count, ref[0])
            elif t is int:
                arr = np.frombuffer(_bytes_of(self._in_frames[ref]), dt, count)
            else:
                arr = np.frombuffer(ref, dt, count)
            return arr if len(shape) == 1 else arr.reshape(shape)
        raise TypeError(f"no decoder for {typ!r}")

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
        self._in_pool = _bytes_of(frames[2]) if len(frames) > 2 else b""
        self._in_frames = frames[3:]
        try:
            msg = self._body_dec.decode(_bytes_of(frames[1]))
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, IndexError) as e:
            raise DecodeError("malformed", env.sender, f"bad {env.tag} body: {e}") from None
        finally:
            self._in_frames, self._in_pool = (), b""
        return env, msg


_DTYPES: dict[str, np.dtype] = {}
_DTYPE_STR: dict[np.dtype, str] = {}
_ZEROS = bytes(POOL_ALIGN)


def _bytes_of(frame: Any) -> Any:
    """Buffer view of a frame (bytes, memoryview or zmq.Frame) without copying."""
    return getattr(frame, "buffer", frame)

"""Moving a step's batch from learner rank 0 (the only rank with sockets) to every rank.

Rank 0 pulls ``TrainGroup`` messages from the bus, decides the step's batch, encodes it
once with msgpack (arrays as raw bytes) and broadcasts the bytes over the learner's own
process group; every rank decodes the same batch and then takes the same branch.

Invariants and failure behaviour:
- Every rank calls ``broadcast_batch`` the same number of times, in the same order; an
  empty batch with ``stop=True`` tells the other ranks to leave their loop (drain/shutdown),
  so no rank is left waiting in a collective.
- The payload is msgspec msgpack (``StepBatch``): no pickle, even inside the job.
"""

from __future__ import annotations

import msgspec
import numpy as np
import torch
import torch.distributed as dist

from schemas.messages import TrainGroup


def _enc_hook(obj):
    if isinstance(obj, np.ndarray):
        return (obj.dtype.str, obj.shape, np.ascontiguousarray(obj).tobytes())
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _dec_hook(typ, obj):
    if typ is np.ndarray:
        dtype, shape, raw = obj
        return np.frombuffer(raw, np.dtype(dtype)).reshape(shape)
    raise TypeError(f"no decoder for {typ!r}")


class StepBatch(msgspec.Struct, array_like=True):
    """learner rank 0 → learner ranks (torch.distributed broadcast): one step's input."""

    groups: list[TrainGroup]
    stop: bool = False
    """True: no more steps; every rank leaves its loop."""


_ENC = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_DEC = msgspec.msgpack.Decoder(StepBatch, dec_hook=_dec_hook)


def broadcast_batch(batch: StepBatch | None, *, src: int = 0, group: dist.ProcessGroup | None = None) -> StepBatch:
    """Collective: rank ``src`` passes its batch, the others pass None; all return it.
    ``group`` must be a CPU-capable (gloo) group; with NCCL training, pass a gloo side group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        assert batch is not None
        return batch
    if dist.get_rank() == src:
        payload = torch.frombuffer(bytearray(_ENC.encode(batch)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src, group=group)
    if dist.get_rank() != src:
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(payload, src, group=group)
    if dist.get_rank() == src:
        return batch  # type: ignore[return-value]
    return _DEC.decode(payload.numpy().tobytes())

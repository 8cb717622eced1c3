"""Receiving weight payloads into named tensors: shm buffer, CUDA IPC handles, collectives.

Every path produces the same thing, ``{name: tensor}`` views into received bucket bytes laid
out by a ``WeightManifest`` (``TensorEntry.offset`` is into the whole payload; bucket ``i``
holds ``[buckets[i].offset, + nbytes)``), which the engine then copies into its parameters.

Invariants and failure behaviour:
- Nothing here touches a model: a failure (digest mismatch, wrong handle count, a broken
  collective) happens before the caller copies anything, so the caller keeps old weights.
- shm: every bucket's digest is verified first (``DigestMismatch`` names the buckets).
- IPC / collective: bytes stay in device memory, digests are not computed (that would cost a
  device-to-host copy of the whole model); an empty digest list is returned.
- IPC: a handle whose rebuild function is ``rebuild_cuda_tensor`` is re-targeted to this
  process's current CUDA device (the sender's device index need not match ours), as vLLM's
  IPC engine does; without CUDA it raises ``RuntimeError`` saying so.
- Collective: ``torch.distributed.broadcast`` of each bucket as flat uint8 from ``src``
  (NCCL on GPUs: buffers on this CUDA device; gloo: host buffers). A NCCL group without
  CUDA raises ``RuntimeError``. Every bucket is received into staging before returning, so
  the sender's broadcasts always have a matching receive.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from schemas.messages import WeightManifest
from stages.publisher.manifest import unpack

REBUILD_DEVICE_ARG = 6
"""Position of the device index in ``rebuild_cuda_tensor``'s arguments (torch ≥ 2.0)."""


def from_buckets(manifest: WeightManifest, buckets: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Named views into flat uint8 bucket tensors."""
    if len(buckets) != len(manifest.buckets):
        raise ValueError(f"version {manifest.version}: {len(buckets)} buckets received, "
                         f"manifest has {len(manifest.buckets)}")
    for i, (got, want) in enumerate(zip(buckets, manifest.buckets)):
        if got.dtype != torch.uint8 or got.numel() < want.nbytes:
            raise ValueError(f"version {manifest.version}: bucket {i} is {got.dtype} x {got.numel()}, "
                             f"need uint8 x {want.nbytes}")
    out = {}
    for e in manifest.entries:
        start = e.offset - manifest.buckets[e.bucket].offset
        raw = buckets[e.bucket].reshape(-1)[start : start + e.nbytes]
        out[e.name] = raw.view(getattr(torch, e.dtype)).reshape(e.shape)
    return out


def receive_shm(buffer: memoryview | np.ndarray, manifest: WeightManifest) -> tuple[dict[str, torch.Tensor], list[str]]:
    payload = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
    payload = payload.reshape(-1).view(np.uint8)
    if payload.nbytes < manifest.total_bytes:
        raise ValueError(f"version {manifest.version}: buffer of {payload.nbytes} bytes, "
                         f"manifest needs {manifest.total_bytes}")
    return unpack(manifest, payload)


def receive_ipc(handles: Sequence[tuple[Any, tuple]], manifest: WeightManifest) -> dict[str, torch.Tensor]:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    buckets = []
    for func, args in handles:
        if func is rebuild_cuda_tensor:
            if not torch.cuda.is_available():
                raise RuntimeError("CUDA IPC weight handles received, but CUDA is not available here")
            args = list(args)
            args[REBUILD_DEVICE_ARG] = torch.cuda.current_device()
        buckets.append(func(*args))
    return from_buckets(manifest, buckets)


def receive_collective(group: Any, manifest: WeightManifest, src: int, device: torch.device) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        if not torch.cuda.is_available() or device.type != "cuda":
            raise RuntimeError(f"NCCL weight broadcast needs an engine on a CUDA device (engine is on {device})")
        where = device
    else:
        where = torch.device("cpu")
    buckets = []
    with torch.cuda.device(where) if where.type == "cuda" else contextlib.nullcontext():  # per-thread device
        for b in manifest.buckets:
            buf = torch.empty(b.nbytes, dtype=torch.uint8, device=where)
            dist.broadcast(buf, src=src, group=group)
            buckets.append(buf)
    return from_buckets(manifest, buckets)

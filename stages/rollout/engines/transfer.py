"""Receiving weight payloads into named tensors: shm buffer, CUDA IPC handles, collectives.

Every path produces the same thing, ``{name: tensor}`` views into received bucket bytes laid
out by a ``WeightManifest`` (``TensorEntry.offset`` is into the whole payload; bucket ``i``
holds ``[buckets[i].offset, + nbytes)``), plus the digest of every bucket computed on the
received bytes (by the algorithm the manifest's digests name: ``c1`` on the host or on the
device, ``g1`` on the device), which the engine returns to the publisher.

Invariants and failure behaviour:
- Nothing here touches a model: a failure (digest mismatch, wrong handle count, a broken
  collective) happens before the caller copies anything, so the caller keeps old weights.
- Every path verifies each bucket's digest (when the manifest has one) before returning
  (``DigestMismatch`` names the buckets). On CUDA buckets this costs a few reductions per
  tensor on the device, never a copy to the host.
- IPC: a plain-field handle (``vllm_worker.IpcBucketHandle``) is opened on the GPU with the
  handle's UUID; a ``reduce_tensor`` tuple whose rebuild function is ``rebuild_cuda_tensor``
  is re-targeted to this process's current CUDA device (the sender's device index need not
  match ours), as vLLM's IPC engine does; without CUDA either raises ``RuntimeError``.
- Collective: a ``stages.publisher.collective.BroadcastGroup`` (the weight group, with its
  per-bucket deadline) or a ``torch.distributed`` group; each bucket is broadcast as flat
  uint8 from ``src`` (NCCL: buffers on this CUDA device; gloo: host buffers). A NCCL group
  without CUDA raises ``RuntimeError``. Every bucket is received into staging before
  returning, so the sender's broadcasts always have a matching receive.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from schemas.messages import WeightManifest
from stages.publisher.manifest import unpack, verify

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


def receive_ipc(handles: Sequence[Any], manifest: WeightManifest) -> tuple[dict[str, torch.Tensor], list[str]]:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    from stages.rollout.engines.vllm_worker import IpcBucketHandle, open_ipc_handle

    if len(handles) != len(manifest.buckets):
        raise ValueError(f"version {manifest.version}: {len(handles)} buckets received, "
                         f"manifest has {len(manifest.buckets)}")
    buckets = []
    for h in handles:
        if isinstance(h, IpcBucketHandle):
            if not torch.cuda.is_available():
                raise RuntimeError("CUDA IPC weight handles received, but CUDA is not available here")
            buckets.append(open_ipc_handle(h))
            continue
        func, args = h
        if func is rebuild_cuda_tensor:
            if not torch.cuda.is_available():
                raise RuntimeError("CUDA IPC weight handles received, but CUDA is not available here")
            args = list(args)
            args[REBUILD_DEVICE_ARG] = torch.cuda.current_device()
        buckets.append(func(*args))
    tensors = from_buckets(manifest, buckets)
    return tensors, verify(manifest, [b.reshape(-1)[: m.nbytes] for b, m in zip(buckets, manifest.buckets)])


def receive_collective(group: Any, manifest: WeightManifest, src: int,
                       device: torch.device) -> tuple[dict[str, torch.Tensor], list[str]]:
    from stages.publisher.collective import BroadcastGroup

    if isinstance(group, BroadcastGroup):
        backend, send = group.backend, group.broadcast
    else:
        import torch.distributed as dist

        backend = str(dist.get_backend(group)).lower()

        def send(buf, src):
            dist.broadcast(buf, src=src, group=group)
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
            send(buf, src)
            buckets.append(buf)
        digests = verify(manifest, buckets)
    return from_buckets(manifest, buckets), digests

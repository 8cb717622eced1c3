"""Weight payloads: a state dict packed into buckets with a manifest, and back.

Invariants and failure behaviour:
- ``pack`` is deterministic: entries in state-dict order, each tensor's bytes 64-byte
  aligned, buckets cut at tensor boundaries once they reach ``bucket_bytes`` (a tensor is
  never split). Every bucket carries a digest of its bytes.
- ``check_compatible`` refuses a manifest that does not match the receiving model (missing
  or unknown names, shape or dtype differences) with ``ManifestMismatch`` listing every
  offending name; the caller keeps its old weights.
- ``unpack`` verifies each bucket's digest against the manifest before returning anything;
  a mismatch raises ``DigestMismatch`` naming the buckets.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

import numpy as np
import torch

from schemas.messages import TensorEntry, WeightBucket, WeightManifest

ALIGN = 64
"""Tensor offsets are cache-line aligned so views into the payload are aligned too."""
DEFAULT_BUCKET_BYTES = 256 << 20
"""256 MiB buckets: few enough to keep per-bucket overhead negligible, small enough that a
deadline per bucket means something and that staging memory stays bounded on GPUs."""


class ManifestMismatch(ValueError):
    """The manifest's tensors do not match the receiving model."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("manifest does not match the model: " + "; ".join(problems))
        self.problems = problems


class DigestMismatch(ValueError):
    pass


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def digest(buf: np.ndarray | memoryview | bytes) -> str:
    """128-bit BLAKE2b of a byte buffer, hex."""
    return hashlib.blake2b(memoryview(buf).cast("B") if not isinstance(buf, np.ndarray) else buf.data,
                           digest_size=16).hexdigest()


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A uint8 numpy view of a CPU tensor's bytes (works for bf16, which numpy lacks)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def plan(state: Mapping[str, torch.Tensor], version: int,
         bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> WeightManifest:
    """Manifest (without digests) for ``state``: offsets, buckets, sizes."""
    entries, buckets = [], []
    pos = bucket_start = 0
    for name, t in state.items():
        pos += -pos % ALIGN
        if pos - bucket_start >= bucket_bytes:
            buckets.append(WeightBucket(bucket_start, pos - bucket_start, ""))
            bucket_start = pos
        n = t.numel() * t.element_size()
        entries.append(TensorEntry(name, dtype_name(t.dtype), list(t.shape), pos, n, len(buckets)))
        pos += n
    pos += -pos % ALIGN
    buckets.append(WeightBucket(bucket_start, pos - bucket_start, ""))
    return WeightManifest(version, entries, buckets, pos)


def pack(state: Mapping[str, torch.Tensor], version: int,
         bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> tuple[WeightManifest, np.ndarray]:
    """Manifest with digests, and the payload as one uint8 array."""
    man = plan(state, version, bucket_bytes)
    payload = np.zeros(man.total_bytes, np.uint8)
    for e, t in zip(man.entries, state.values()):
        payload[e.offset : e.offset + e.nbytes] = tensor_bytes(t.cpu())
    man.buckets = [WeightBucket(b.offset, b.nbytes, digest(payload[b.offset : b.offset + b.nbytes]))
                   for b in man.buckets]
    return man, payload


def check_compatible(man: WeightManifest, params: Mapping[str, torch.Tensor]) -> None:
    problems = []
    seen = set()
    for e in man.entries:
        seen.add(e.name)
        p = params.get(e.name)
        if p is None:
            problems.append(f"{e.name}: not a parameter of the model")
        elif list(p.shape) != e.shape:
            problems.append(f"{e.name}: shape {e.shape} != model {list(p.shape)}")
        elif dtype_name(p.dtype) != e.dtype and not _castable(e.dtype, p.dtype):
            problems.append(f"{e.name}: dtype {e.dtype} cannot load into {dtype_name(p.dtype)}")
    missing = sorted(set(params) - seen)
    problems += [f"{n}: missing from the manifest" for n in missing]
    if problems:
        raise ManifestMismatch(problems)


def _castable(src: str, dst: torch.dtype) -> bool:
    return src in ("float32", "bfloat16", "float16") and dst.is_floating_point


def bucket_digests(man: WeightManifest, payload: np.ndarray) -> list[str]:
    return [digest(payload[b.offset : b.offset + b.nbytes]) for b in man.buckets]


def unpack(man: WeightManifest, payload: np.ndarray) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors (views into ``payload``) by name, and the digests computed on ``payload``."""
    got = bucket_digests(man, payload)
    bad = [i for i, (b, d) in enumerate(zip(man.buckets, got)) if b.digest != d]
    if bad:
        raise DigestMismatch(f"version {man.version}: bucket(s) {bad} do not match their digests")
    out = {}
    for e in man.entries:
        raw = torch.from_numpy(payload[e.offset : e.offset + e.nbytes])
        out[e.name] = raw.view(getattr(torch, e.dtype)).reshape(e.shape)
    return out, got


def load_into(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor],
              names: Iterable[str] | None = None) -> None:
    """Copy tensors into the model's parameters/buffers in place (casting dtype)."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name in names or tensors:
            params[name].copy_(tensors[name])

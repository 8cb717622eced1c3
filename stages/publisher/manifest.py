"""Weight payloads: a state dict packed into buckets with a manifest, and back.

Invariants and failure behaviour:
- ``pack`` / ``pack_into`` are deterministic: entries in state-dict order, each tensor's
  bytes 64-byte aligned, buckets cut at tensor boundaries once they reach ``bucket_bytes``
  (a tensor is never split). Every bucket carries a digest of its entries' bytes.
- ``check_compatible`` refuses a manifest that does not match the receiving model (missing
  or unknown names, shape or dtype differences) with ``ManifestMismatch`` listing every
  offending name; the caller keeps its old weights.
- ``unpack`` verifies each bucket's digest against the manifest before returning anything;
  a mismatch raises ``DigestMismatch`` naming the buckets.

Digests are named by a prefix, so a receiver computes whatever the sender chose:
- ``c1:`` (host payloads, the default of ``pack``): over a bucket's bytes, with every byte
  outside an entry (alignment padding) read as zero, as little-endian 64-bit words
  ``w_0..w_{n-1}``: the 64-bit wrapping sums ``S = Σ w_i`` and ``W = Σ (i+1)·w_i``, as 32 hex
  digits. It detects torn, missing, stale and misplaced bytes (a word moved from ``i`` to
  ``j`` changes ``W`` by ``(j-i)·w``), not tampering. Why not a cryptographic hash: BLAKE2b
  runs at 0.64 GB/s on this project's CPU machine against a 9-17 GB/s memory copy, so two
  digests (sender and engine) made a 1.2 GB publish ~10x a copy; ``S`` and ``W`` are
  computed as row and column sums of 8 KiB rows, reduced in L2-sized steps (one read of
  memory, ~11 GB/s in numpy, and fused with the copy on the sender). CRC32 (3.7 GB/s) and
  SHA-1 (1.6 GB/s) were measured too; xxhash is not a dependency.
- ``g1:`` (CUDA buckets): ``stages.rollout.engines.vllm_worker.gpu_digests``, computed on the
  device.
- no prefix: 128-bit BLAKE2b of the whole bucket (manifests made before ``c1``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from schemas.messages import TensorEntry, WeightBucket, WeightManifest

ALIGN = 64
"""Tensor offsets are cache-line aligned so views into the payload are aligned too."""
DEFAULT_BUCKET_BYTES = 256 << 20
"""256 MiB buckets: few enough to keep per-bucket overhead negligible, small enough that a
deadline per bucket means something and that staging memory stays bounded on GPUs."""
C1_PREFIX = "c1:"
G1_PREFIX = "g1:"
C1_ROW_WORDS = 1024
"""Row length of the ``c1`` row/column decomposition (8 KiB): long rows keep numpy's
per-row reduction cheap, and the column-sum vector small."""
C1_STEP_ROWS = 256
"""Rows reduced (and, when packing, copied) per step: 2 MiB, so the row sums and the
column sums (and the copy) of a step share one trip through memory (L2/L3-resident). Each
step's numpy calls hold the GIL between their loops, so with ``HOST_THREADS`` threads the
step must be long: at 32 rows (256 KiB) two threads digested a 1.39 GB bf16 payload in 107
ms, about one thread's time; at 256 rows in 66 ms (pack with its copy: 151 → 122 ms). One
thread alone is ~3 % slower at 256 rows than at 32."""
_MASK64 = (1 << 64) - 1
HOST_THREADS = int(os.environ.get("CONVEYOR_WEIGHT_THREADS", "0")) or min(8, os.cpu_count() or 1)
"""Threads that pack, digest and copy host payloads (numpy releases the GIL in its loops).
Weight movement is a burst on the critical path of every update, so it takes the cores the
host has; ``CONVEYOR_WEIGHT_THREADS`` overrides (1: serial)."""
PIECE_BYTES = 8 << 20
"""Work unit of the threaded paths: large tensors are split into 8 MiB pieces (a multiple
of the c1 row), so one embedding matrix does not serialise the pool."""
THREADED_MIN_BYTES = 64 << 20
"""Payloads below this run serially: a pool's hand-offs cost more than they save (the
default CPU model is ~2 MB)."""
_POOL: ThreadPoolExecutor | None = None


def _parallel(fn: Callable[[Any], Any], items: Sequence[Any], nbytes: int) -> list[Any]:
    """``[fn(x) for x in items]``, on ``HOST_THREADS`` threads when the payload is large."""
    global _POOL
    if HOST_THREADS <= 1 or nbytes < THREADED_MIN_BYTES or len(items) < 2:
        return [fn(x) for x in items]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(HOST_THREADS, thread_name_prefix="weights")
    return list(_POOL.map(fn, items))


def _pieces(man: WeightManifest) -> list[tuple[int, int, int]]:
    """(entry index, byte start in the entry, bytes) covering every entry, pieces of at most
    ``PIECE_BYTES``; starts are multiples of 8, so only an entry's last piece has a partial word."""
    out = []
    for i, e in enumerate(man.entries):
        for c in range(0, max(e.nbytes, 1), PIECE_BYTES):
            out.append((i, c, min(PIECE_BYTES, e.nbytes - c)))
    return out


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
    """128-bit BLAKE2b of a byte buffer, hex (the unprefixed, legacy digest)."""
    return hashlib.blake2b(memoryview(buf).cast("B") if not isinstance(buf, np.ndarray) else buf.data,
                           digest_size=16).hexdigest()


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A uint8 numpy view of a CPU tensor's bytes (works for bf16, which numpy lacks)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


# ----------------------------------------------------------------------------- c1 digest
def _c1_words(dst: np.ndarray, src: np.ndarray | None = None) -> tuple[int, int]:
    """``(Σ w_i, Σ (i+1)·w_i)`` mod 2^64 of the uint64 words ``dst``; with ``src`` (uint64
    words of the same length) each step is first copied from ``src`` into ``dst``."""
    n, k = dst.size, C1_ROW_WORDS
    rows_n = n // k
    s = w = 0
    if rows_n:
        main = dst[: rows_n * k].reshape(rows_n, k)
        from_ = src[: rows_n * k].reshape(rows_n, k) if src is not None else None
        rows = np.empty(rows_n, np.uint64)
        cols = np.zeros(k, np.uint64)
        for i in range(0, rows_n, C1_STEP_ROWS):
            blk = main[i : i + C1_STEP_ROWS]
            if from_ is not None:
                np.copyto(blk, from_[i : i + C1_STEP_ROWS])
            np.add.reduce(blk, axis=1, out=rows[i : i + C1_STEP_ROWS])
            cols += np.add.reduce(blk, axis=0)
        # word (r, j) sits at index r·k + j: Σ (r·k + j + 1)·w = k·Σ_r r·rowsum_r + Σ_j (j+1)·colsum_j
        s = int(np.add.reduce(rows))
        w = k * int(np.add.reduce(rows * np.arange(rows_n, dtype=np.uint64))) + \
            int(np.add.reduce(cols * np.arange(1, k + 1, dtype=np.uint64)))
    if n > rows_n * k:
        rest = dst[rows_n * k :]
        if src is not None:
            np.copyto(rest, src[rows_n * k :])
        s += int(np.add.reduce(rest))
        w += int(np.add.reduce(rest * np.arange(rows_n * k + 1, n + 1, dtype=np.uint64)))
    return s & _MASK64, w & _MASK64


def _c1_segment(dst: np.ndarray, word_offset: int, src: np.ndarray | None = None) -> tuple[int, int]:
    """Contribution ``(S, W)`` of one entry's bytes ``dst`` (uint8, 8-byte aligned start) at
    word ``word_offset`` of its bucket; copies ``src`` (uint8, same size) in first if given."""
    n = dst.size
    full = n - n % 8
    s, w = _c1_words(dst[:full].view(np.uint64), None if src is None else src[:full].view(np.uint64))
    if n > full:  # trailing bytes, zero-padded to a word
        if src is not None:
            dst[full:] = src[full:]
        last = int.from_bytes(dst[full:].tobytes(), "little")
        s += last
        w += (full // 8 + 1) * last
    # Σ (o + i + 1)·w_i = o·S + Σ (i+1)·w_i
    return s & _MASK64, (w + word_offset * s) & _MASK64


def _c1_hex(s: int, w: int) -> str:
    return f"{C1_PREFIX}{s & _MASK64:016x}{w & _MASK64:016x}"


def c1_digests(man: WeightManifest, buckets: Sequence[np.ndarray]) -> list[str]:
    """``c1`` digest of each bucket; ``buckets[i]``: uint8 array of bucket ``i``'s bytes."""

    def piece(item: tuple[int, int, int]) -> tuple[int, int, int]:
        i, c, n = item
        e = man.entries[i]
        start = e.offset - man.buckets[e.bucket].offset + c
        return (e.bucket, *_c1_segment(buckets[e.bucket][start : start + n], start // 8))

    return _combine(man, _parallel(piece, _pieces(man), man.total_bytes))


def _combine(man: WeightManifest, parts: Iterable[tuple[int, int, int]]) -> list[str]:
    acc = [[0, 0] for _ in man.buckets]
    for b, s, w in parts:
        acc[b][0] += s
        acc[b][1] += w
    return [_c1_hex(s, w) for s, w in acc]


def c1_digests_torch(man: WeightManifest, buckets: Sequence[torch.Tensor]) -> list[str]:
    """``c1`` on flat uint8 tensors on any device (one host sync per call)."""
    parts: list[torch.Tensor] = []
    where: list[tuple[int, int]] = []  # (bucket, word offset of the part's first word)
    chunk = C1_ROW_WORDS * C1_ROW_WORDS * 4  # 32 MiB of words: bounds the int64 temporaries
    for e in man.entries:
        start = e.offset - man.buckets[e.bucket].offset
        raw = buckets[e.bucket].reshape(-1)[start : start + e.nbytes]
        pad = -e.nbytes % 8
        if pad:
            raw = torch.cat([raw, torch.zeros(pad, dtype=torch.uint8, device=raw.device)])
        words = raw.view(torch.int64)
        for j in range(0, words.numel(), chunk):
            x = words[j : j + chunk]
            idx = torch.arange(1, x.numel() + 1, dtype=torch.int64, device=x.device)
            parts += [x.sum(), (x * idx).sum()]
            where.append((e.bucket, start // 8 + j))
    acc = [[0, 0] for _ in man.buckets]
    values = torch.stack(parts).tolist() if parts else []
    for (b, o), s, w in zip(where, values[0::2], values[1::2]):
        acc[b][0] += s
        acc[b][1] += w + o * s
    return [_c1_hex(s, w) for s, w in acc]


# ----------------------------------------------------------------------------- packing
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


def same_layout(a: WeightManifest, b: WeightManifest) -> bool:
    """Same entries at the same offsets in the same buckets (versions and digests aside)."""
    return a.total_bytes == b.total_bytes and a.entries == b.entries and \
        [(x.offset, x.nbytes) for x in a.buckets] == [(x.offset, x.nbytes) for x in b.buckets]


def pack_into(state: Mapping[str, torch.Tensor], man: WeightManifest, dst: np.ndarray,
              zero_padding: bool = True) -> WeightManifest:
    """Copy ``state`` (laid out by ``man``, from ``plan``) into ``dst`` (uint8, at least
    ``man.total_bytes``) and digest it in the same pass; returns ``man`` with ``c1`` digests.
    ``zero_padding=False`` skips zeroing the gaps between entries (callers whose buffer held
    the same layout before: the gaps are still zero)."""
    if dst.size < man.total_bytes:
        raise ValueError(f"version {man.version}: destination of {dst.size} bytes, manifest needs {man.total_bytes}")
    srcs = []
    pos = 0
    for e, t in zip(man.entries, state.values()):
        if zero_padding and e.offset > pos:
            dst[pos : e.offset] = 0
        src = tensor_bytes(t if t.device.type == "cpu" else t.cpu())
        if src.size != e.nbytes:
            raise ValueError(f"{e.name}: {src.size} bytes, manifest says {e.nbytes}")
        srcs.append(src)
        pos = e.offset + e.nbytes
    if zero_padding and man.total_bytes > pos:
        dst[pos : man.total_bytes] = 0

    def piece(item: tuple[int, int, int]) -> tuple[int, int, int]:
        i, c, n = item
        e = man.entries[i]
        start = e.offset - man.buckets[e.bucket].offset + c
        return (e.bucket, *_c1_segment(dst[e.offset + c : e.offset + c + n], start // 8, srcs[i][c : c + n]))

    digests = _combine(man, _parallel(piece, _pieces(man), man.total_bytes))
    return WeightManifest(man.version, man.entries,
                          [WeightBucket(b.offset, b.nbytes, d) for b, d in zip(man.buckets, digests)], man.total_bytes)


def pack(state: Mapping[str, torch.Tensor], version: int,
         bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> tuple[WeightManifest, np.ndarray]:
    """Manifest with ``c1`` digests, and the payload as one uint8 array."""
    man = plan(state, version, bucket_bytes)
    payload = np.zeros(man.total_bytes, np.uint8)
    return pack_into(state, man, payload, zero_padding=False), payload


# ----------------------------------------------------------------------------- receiving
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


def _bucket_arrays(man: WeightManifest, payload: np.ndarray) -> list[np.ndarray]:
    return [payload[b.offset : b.offset + b.nbytes] for b in man.buckets]


def compute_digests(man: WeightManifest, buckets: Sequence[Any]) -> list[str]:
    """Each bucket's digest by the algorithm its manifest digest names (``c1`` when the
    manifest has none). ``buckets``: uint8 numpy arrays (host) or flat uint8 tensors (any
    device), one per manifest bucket."""
    kinds = {_kind(b.digest) for b in man.buckets} or {"c1"}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    tensors = bool(buckets) and isinstance(buckets[0], torch.Tensor)
    if kind == "c1":
        if tensors and buckets[0].device.type != "cpu":
            return c1_digests_torch(man, buckets)
        return c1_digests(man, [b.numpy() if isinstance(b, torch.Tensor) else b for b in buckets])
    if kind == "g1":
        from stages.rollout.engines.vllm_worker import gpu_digests

        tb = [b if isinstance(b, torch.Tensor) else torch.from_numpy(b) for b in buckets]
        return gpu_digests(man, _views(man, tb))
    if kind == "blake2b":
        return [digest(np.asarray(b.cpu().numpy() if isinstance(b, torch.Tensor) else b)[: m.nbytes])
                for b, m in zip(buckets, man.buckets)]
    raise DigestMismatch(f"version {man.version}: buckets use different digest kinds {sorted(kinds)}")


def _kind(d: str) -> str:
    if d.startswith(C1_PREFIX) or not d:
        return "c1"
    if d.startswith(G1_PREFIX):
        return "g1"
    return "blake2b"


def _views(man: WeightManifest, buckets: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for e in man.entries:
        start = e.offset - man.buckets[e.bucket].offset
        raw = buckets[e.bucket].reshape(-1)[start : start + e.nbytes]
        out[e.name] = raw.view(getattr(torch, e.dtype)).reshape(e.shape)
    return out


def verify(man: WeightManifest, buckets: Sequence[Any]) -> list[str]:
    """Digests of ``buckets``; ``DigestMismatch`` naming every bucket whose manifest digest
    (when it has one) differs."""
    got = compute_digests(man, buckets)
    bad = [i for i, (b, d) in enumerate(zip(man.buckets, got)) if b.digest and b.digest != d]
    if bad:
        raise DigestMismatch(f"version {man.version}: bucket(s) {bad} do not match their digests")
    return got


def bucket_digests(man: WeightManifest, payload: np.ndarray) -> list[str]:
    return compute_digests(man, _bucket_arrays(man, payload))


def unpack(man: WeightManifest, payload: np.ndarray) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors (views into ``payload``, all of one storage) by name, and the digests
    computed on ``payload``."""
    got = verify(man, _bucket_arrays(man, payload))
    out = {}
    with _quiet_readonly():
        whole = torch.from_numpy(payload.reshape(-1).view(np.uint8))  # one storage: neighbours stay neighbours
    for e in man.entries:
        out[e.name] = whole[e.offset : e.offset + e.nbytes].view(getattr(torch, e.dtype)).reshape(e.shape)
    return out, got


@contextlib.contextmanager
def _quiet_readonly():
    """``torch.from_numpy`` of a read-only (shared-memory) view warns; the views are only read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        yield


def load_into(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor],
              names: Iterable[str] | None = None) -> None:
    """Copy tensors into the model's parameters/buffers in place (casting dtype). Host
    tensors of the parameter's dtype into contiguous host parameters are byte copies in
    pieces on ``HOST_THREADS`` threads; everything else is ``copy_`` one tensor at a time."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    pieces, total = [], 0
    with torch.no_grad():
        for name in names or tensors:
            p, t = params[name], tensors[name]
            if (p.device.type == "cpu" and t.device.type == "cpu" and p.dtype == t.dtype and p.shape == t.shape
                    and p.is_contiguous() and t.is_contiguous()):
                dst, src = p.reshape(-1).view(torch.uint8).numpy(), t.reshape(-1).view(torch.uint8).numpy()
                pieces += [(dst, src, c) for c in range(0, dst.size, PIECE_BYTES)]
                total += dst.size
            else:
                p.copy_(t)
    _parallel(lambda x: np.copyto(x[0][x[2] : x[2] + PIECE_BYTES], x[1][x[2] : x[2] + PIECE_BYTES]), pieces, total)

"""Inside vLLM's worker process: weight updates into the live model, and their plain-field wire.

``ConveyorWorkerExtension`` is mixed into vLLM 0.26.0's GPU worker
(``worker_extension_cls``); ``VllmEngine`` reaches it with ``AsyncLLM.collective_rpc``. Its
methods are prefixed ``conveyor_`` because vLLM refuses an extension attribute that the
worker already has (``start_weight_update``, ``update_weights`` ... are vLLM's own).

How an update lands (``conveyor_load_ipc`` / ``_nccl`` / ``_host``):
1. The manifest arrives as msgpack bytes (``schemas.messages.WeightManifest``), the buckets as
   CUDA IPC handles in plain fields (``IpcBucketHandle``), an NCCL broadcast, or host arrays.
2. A copy plan maps every manifest name to a destination view of a vLLM parameter. vLLM fuses
   ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj``; the plan
   reads the fused layout from the model's own ``packed_modules_mapping`` and each fused
   layer's ``output_sizes``, so q, k, v and gate, up are row ranges of the fused weight. A
   tied ``lm_head.weight`` is the embedding. The plan is built once per model.
3. With the plan, loading is one batched device-to-device copy (``torch._foreach_copy_``)
   from the bucket views into the parameters, in place: CUDA graphs and compiled code keep
   pointing at the same storage. This replaces vLLM's own path (layerwise reload and
   ``model.load_weights`` per tensor), which measured 133-174 ms for Qwen3-0.6B where the
   bytes alone take under 1 ms (``ops/bench/gpu_weights.py`` measures both).
4. When no plan can be built (tensor parallel > 1, or a fused layer kind this module does
   not know), the same entry points load through vLLM's own ``initialize_layerwise_reload``
   / ``model.load_weights`` / ``finalize_layerwise_reload``.

Digests (``gpu_digests``): a non-cryptographic 128-bit checksum per manifest bucket, prefixed
``g1:``, computed on the GPU: over every entry's bytes read as little-endian words, the
64-bit wrapping sum of the words and the 64-bit wrapping sum of word × (its byte position in
the bucket + 1). It detects torn, missing, misplaced or stale bytes (not tampering), costs a
few reductions per tensor, and never copies weights to the host. On the fast path it is
computed on the destination parameters after the copy, i.e. on what was loaded; for an entry
whose dtype was cast on load, and on the fallback path, on the received bytes. A sender
computes the same function over its own bucket views; if the manifest already carries ``g1:``
digests they are checked before anything is copied.

Failure behaviour: every check (manifest layout, handle count, device identity, digests)
happens before the first byte is copied, and raises ``ValueError`` / ``DigestMismatch`` /
``RuntimeError`` naming what was wrong; the model keeps its weights. A CUDA error during the
copy itself leaves the parameters undefined (vLLM's own path has the same property).
NCCL: the first ``conveyor_nccl_init`` blocks until the trainer joins (vLLM's
``StatelessProcessGroup``); every bucket is received into staging memory (``total_bytes``
of GPU memory beyond vLLM's budget) before any is copied.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from schemas.messages import WeightManifest
from stages.publisher.manifest import DigestMismatch

DIGEST_PREFIX = "g1:"
"""Marks a digest made by ``gpu_digests`` (manifest digests without it are BLAKE2b, host-side)."""
DIGEST_CHUNK_WORDS = 1 << 24
"""Words per reduction: bounds the int64 temporary of a weighted sum at 128 MiB while keeping
the number of kernel launches per tensor at one chunk for every Qwen3 tensor but the embedding."""
DIGEST_SLAB_WORDS = 1 << 25
"""Words stacked into one slab (128 MiB of int32, plus its 256 MiB int64 weighted product)."""
_MASK64 = (1 << 64) - 1
KNOWN_FUSED_KINDS = ("QKVParallelLinear", "MergedColumnParallelLinear")
"""vLLM layer classes whose fused rows the fast plan understands (``output_sizes`` per part)."""
PLAIN_KINDS = ("RowParallelLinear", "ColumnParallelLinear", "ReplicatedLinear", "VocabParallelEmbedding",
               "ParallelLMHead", "RMSNorm", "GemmaRMSNorm", "LayerNorm", "Embedding")
"""Layer classes whose parameters are loaded by a plain copy at tensor-parallel size 1."""


# ----------------------------------------------------------------------------- wire types
class IpcBucketHandle(msgspec.Struct, array_like=True, gc=False):
    """One bucket's CUDA IPC handle as plain fields: the arguments of
    ``torch.multiprocessing.reductions.rebuild_cuda_tensor`` with classes and dtype by name
    and the device named by GPU UUID (indices differ between processes). Never pickled."""

    gpu_uuid: str
    size: list[int]
    stride: list[int]
    tensor_offset: int
    dtype: str
    storage_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


class NcclRendezvous(msgspec.Struct, array_like=True, gc=False):
    """Where the trainer (rank 0) and the engines meet for the weight-broadcast NCCL group."""

    address: str
    port: int
    rank: int
    """This engine's rank in the group (1..world_size-1; rank 0 is the sender)."""
    world_size: int


def gpu_uuid(device: int | torch.device | None = None) -> str:
    return str(torch.cuda.get_device_properties(torch.device("cuda", torch.cuda.current_device())
                                                if device is None else device).uuid)


def encode_ipc_handle(handle: tuple[Any, tuple] | IpcBucketHandle, uuid: str | None = None) -> IpcBucketHandle:
    """``reduce_tensor(t)`` of a CUDA tensor → plain fields (``uuid``: the sender's GPU, looked
    up from the handle's device index when not given)."""
    if isinstance(handle, IpcBucketHandle):
        return handle
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    func, args = handle
    if func is not rebuild_cuda_tensor:
        raise ValueError(f"not a CUDA IPC handle (rebuild function {getattr(func, '__name__', func)!r})")
    (_cls, size, stride, offset, _storage_cls, dtype, device, storage_handle, storage_size, storage_offset,
     _requires_grad, ref_handle, ref_offset, event_handle, event_sync) = args
    return IpcBucketHandle(uuid or gpu_uuid(device), list(size), list(stride), int(offset),
                           str(dtype).removeprefix("torch."), bytes(storage_handle), int(storage_size),
                           int(storage_offset), bytes(ref_handle), int(ref_offset), bytes(event_handle or b""),
                           bool(event_sync))


def open_ipc_handle(h: IpcBucketHandle) -> torch.Tensor:
    """The sender's tensor, mapped into this process on the GPU with the handle's UUID."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    device = next((i for i in range(torch.cuda.device_count()) if gpu_uuid(i) == h.gpu_uuid), None)
    if device is None:
        raise RuntimeError(f"CUDA IPC handle is for GPU {h.gpu_uuid}, which this process cannot see "
                           f"(visible: {[gpu_uuid(i) for i in range(torch.cuda.device_count())]})")
    return rebuild_cuda_tensor(torch.Tensor, torch.Size(h.size), tuple(h.stride), h.tensor_offset,
                               torch.storage.TypedStorage, getattr(torch, h.dtype), device, h.storage_handle,
                               h.storage_size_bytes, h.storage_offset_bytes, False, h.ref_counter_handle,
                               h.ref_counter_offset, h.event_handle or None, h.event_sync_required)


# ----------------------------------------------------------------------------- digests
def _words(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as the widest words that divide its size (4, 2 or 1 bytes)."""
    raw = t.detach().reshape(-1).view(torch.uint8)
    n = raw.numel()
    width = torch.int32 if n % 4 == 0 else torch.int16 if n % 2 == 0 else torch.uint8
    try:
        return raw.view(width)
    except RuntimeError:  # storage offset not aligned to the word: read an aligned copy
        return raw.clone().view(width)


def gpu_digests(manifest: WeightManifest, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Per-bucket ``g1:`` digest of the manifest's entries, read from ``tensors`` (name → the
    entry's bytes as a tensor of its dtype and shape, on any one device).

    Cost is kernel launches, not bytes (a 0.6B model is 310 tensors): entries of the same word
    count and width are stacked into one [rows, words] slab (a copy of at most
    ``DIGEST_SLAB_WORDS`` words) and reduced together, so a pass is a few dozen launches
    instead of ~6 per tensor. Entries longer than ``DIGEST_CHUNK_WORDS`` are reduced chunk by
    chunk. The result is the same function as reducing entry by entry: both sums are taken
    modulo 2**64, where the order of additions does not matter."""
    if not manifest.entries:
        return [DIGEST_PREFIX + "0" * 32 for _ in manifest.buckets]
    device = next(iter(tensors.values())).device
    groups: dict[tuple[int, torch.dtype], list[tuple[int, int, torch.Tensor]]] = {}
    for e in manifest.entries:
        t = tensors[e.name]
        if t.numel() * t.element_size() != e.nbytes:
            raise ValueError(f"{e.name}: {t.numel() * t.element_size()} bytes, manifest says {e.nbytes}")
        w = _words(t)
        base = e.offset - manifest.buckets[e.bucket].offset
        for j in range(0, w.numel(), DIGEST_CHUNK_WORDS):  # one piece unless the entry is long
            x = w[j : j + DIGEST_CHUNK_WORDS]
            groups.setdefault((x.numel(), x.dtype), []).append((e.bucket, base + j * w.element_size(), x))
    weights = torch.arange(1, max(n for n, _ in groups) + 1, dtype=torch.int64, device=device)
    plains: list[torch.Tensor] = []
    weighted: list[torch.Tensor] = []
    where: list[tuple[int, int]] = []  # (bucket, byte position of the piece's first word)
    for (n, _), items in groups.items():
        rows = max(1, DIGEST_SLAB_WORDS // n)
        for i in range(0, len(items), rows):
            part = items[i : i + rows]
            slab = torch.stack([x for _, _, x in part]) if len(part) > 1 else part[0][2].reshape(1, n)
            plain, wsum = _slab_sums(slab, weights[:n])
            plains.append(plain)
            weighted.append(wsum)
            where += [(b, pos) for b, pos, _ in part]
    values = torch.stack([torch.cat(plains), torch.cat(weighted)]).tolist()
    s1 = [0] * len(manifest.buckets)
    s2 = [0] * len(manifest.buckets)
    for (b, pos), plain, wsum in zip(where, values[0], values[1]):
        s1[b] = (s1[b] + plain) & _MASK64
        s2[b] = (s2[b] + wsum + pos * plain) & _MASK64
    return [f"{DIGEST_PREFIX}{a:016x}{c:016x}" for a, c in zip(s1, s2)]


def _slab_sums_eager(slab: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``slab`` [rows, n] (words): the wrapping int64 sum of the words and of
    word × weight. The product is materialised (int64: twice the words' bytes), then summed."""
    return slab.sum(1, dtype=torch.int64), (slab * weights).sum(1)


FUSED_DIGESTS = True
"""On CUDA, ``_slab_sums`` compiled: one kernel reads each word once and keeps both sums, in
place of a sum, a product written out in int64 and its sum (about 5 passes over the bytes'
size). The eager passes cost ~19 ms on the sender and ~38 ms in the worker for the 3.4 GB of
the Qwen3-1.7B shape on an H200 (docs/performance.md). Integer sums wrap the same way in
either form, so digests do not depend on which one ran (tested on the CPU)."""


@functools.cache
def _fused_sums():
    """The compiled reduction, made on first use (a worker that never digests on CUDA never
    imports the compiler)."""
    return torch.compile(_slab_sums_eager, dynamic=True)


def _slab_sums(slab: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    global FUSED_DIGESTS
    if not (FUSED_DIGESTS and slab.is_cuda):
        return _slab_sums_eager(slab, weights)
    try:
        return _fused_sums()(slab, weights)
    except Exception as e:  # noqa: BLE001 -- no compiler on this machine: same digest, unfused
        FUSED_DIGESTS = False
        import warnings

        warnings.warn(f"g1 digests: compiled reduction unavailable ({type(e).__name__}: {e}); using eager")
        return _slab_sums_eager(slab, weights)


def check_digests(manifest: WeightManifest, got: Sequence[str]) -> None:
    """Raise ``DigestMismatch`` naming the buckets whose ``g1:`` manifest digest differs."""
    bad = [i for i, (b, d) in enumerate(zip(manifest.buckets, got))
           if b.digest.startswith(DIGEST_PREFIX) and b.digest != d]
    if bad:
        raise DigestMismatch(f"version {manifest.version}: bucket(s) {bad} do not match their digests")


def bucket_views(manifest: WeightManifest, buckets: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Named views (dtype, shape) into flat uint8 bucket tensors laid out by ``manifest``."""
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


def layout_key(manifest: WeightManifest) -> str:
    """Identifies a manifest's layout (not its version or digests): plans are cached by it."""
    h = hashlib.blake2b(digest_size=16)
    for e in manifest.entries:
        h.update(f"{e.name}|{e.dtype}|{e.shape}|{e.offset}|{e.nbytes}|{e.bucket};".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- copy plan
@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor lives in the vLLM model."""

    view: torch.Tensor
    """Destination: a parameter, or a row range of a fused parameter (contiguous)."""
    alias: bool = False
    """True for a tied tensor (``lm_head.weight`` = the embedding): not copied twice."""


def build_plan(model: torch.nn.Module, tie_word_embeddings: bool) -> dict[str, Target] | None:
    """Checkpoint name → destination view, or ``None`` if some parameter is not a plain or
    known fused copy at tensor-parallel size 1 (then vLLM's own loader is used)."""
    packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", {}) or {})
    plan: dict[str, Target] = {}
    for name, param in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        module = model.get_submodule(prefix) if prefix else model
        kind = type(module).__name__
        if getattr(module, "tp_size", 1) != 1:
            return None
        fused = prefix.rpartition(".")[2]
        if fused in packed:
            if kind not in KNOWN_FUSED_KINDS:
                return None
            sizes = list(getattr(module, "output_sizes", []))
            parts = packed[fused]
            if len(sizes) != len(parts) or sum(sizes) != param.shape[0]:
                return None
            row = 0
            for part, size in zip(parts, sizes):
                plan[f"{prefix[: -len(fused)]}{part}.{leaf}"] = Target(param.data.narrow(0, row, size))
                row += size
        elif kind in PLAIN_KINDS:
            plan[name] = Target(param.data)
        else:
            return None
    if tie_word_embeddings and "lm_head.weight" not in plan:
        embed = next((k for k in plan if k.endswith("embed_tokens.weight")), None)
        if embed is not None:
            plan["lm_head.weight"] = Target(plan[embed].view, alias=True)
    return plan


def plan_problems(manifest: WeightManifest, plan: Mapping[str, Target]) -> list[str]:
    """What keeps ``manifest`` from loading through ``plan`` (empty: it loads)."""
    problems = []
    seen = set()
    for e in manifest.entries:
        seen.add(e.name)
        t = plan.get(e.name)
        if t is None:
            problems.append(f"{e.name}: not a parameter of the model")
        elif list(t.view.shape) != list(e.shape):
            problems.append(f"{e.name}: shape {list(e.shape)} != model {list(t.view.shape)}")
        elif str(t.view.dtype).removeprefix("torch.") != e.dtype and not (
                e.dtype in ("float32", "bfloat16", "float16") and t.view.dtype.is_floating_point):
            problems.append(f"{e.name}: dtype {e.dtype} cannot load into {t.view.dtype}")
    problems += [f"{n}: missing from the manifest" for n, t in plan.items() if n not in seen and not t.alias]
    return problems


def copy_and_digest(manifest: WeightManifest, plan: Mapping[str, Target], src: Mapping[str, torch.Tensor],
                    digests: bool) -> list[str]:
    """Copy every entry into its destination (one batched copy per dtype pair), then digest
    what was loaded. ``src``: name → received tensor (dtype/shape of the manifest)."""
    dst, srcs, cast = [], [], {}
    for e in manifest.entries:
        t = plan[e.name]
        if t.alias:
            continue
        s = src[e.name]
        if s.dtype != t.view.dtype:
            cast[e.name] = s
        dst.append(t.view)
        srcs.append(s)
    with torch.no_grad():
        torch._foreach_copy_(dst, srcs)
    if not digests:
        torch.cuda.synchronize()
        return []
    loaded = {e.name: cast.get(e.name, plan[e.name].view) for e in manifest.entries}
    return gpu_digests(manifest, loaded)  # ``.tolist()`` inside synchronises


# ----------------------------------------------------------------------------- the extension
class ConveyorWorkerExtension:
    """Mixed into vLLM's ``Worker``; ``self`` is the worker (``model_runner``, ``vllm_config``)."""

    # State lives in one attribute so that nothing here shadows a worker attribute.
    def _conveyor(self) -> dict:
        st = getattr(self, "_conveyor_state", None)
        if st is None:
            model = self.model_runner.get_model()
            model = model.unwrap() if hasattr(model, "unwrap") else model
            hf = self.vllm_config.model_config.hf_config
            tied = bool(getattr(hf.get_text_config() if hasattr(hf, "get_text_config") else hf,
                                "tie_word_embeddings", False))
            st = self._conveyor_state = {
                "model": model, "plan": build_plan(model, tied), "tied": tied, "version": 0,
                "ipc_cache": {}, "nccl": None, "nccl_key": None, "last_load_s": 0.0,
            }
        return st

    def conveyor_describe(self) -> dict:
        """``fast``: whether the copy plan exists; ``params``: [name, shape, dtype, alias] of
        every checkpoint tensor the plan expects (vLLM's own names when ``fast`` is False)."""
        st = self._conveyor()
        if st["plan"] is None:
            params = [[n, list(p.shape), str(p.dtype).removeprefix("torch."), False]
                      for n, p in st["model"].named_parameters()]
        else:
            params = [[n, list(t.view.shape), str(t.view.dtype).removeprefix("torch."), t.alias]
                      for n, t in st["plan"].items()]
        return {"fast": st["plan"] is not None, "tied": st["tied"], "params": params,
                "gpu_uuid": gpu_uuid(torch.cuda.current_device())}

    def _conveyor_load(self, manifest: WeightManifest, received: Mapping[str, torch.Tensor], digests: bool,
                       via_vllm_loader: bool = False) -> list[str]:
        st = self._conveyor()
        t0 = time.perf_counter()
        if any(b.digest.startswith(DIGEST_PREFIX) for b in manifest.buckets):
            check_digests(manifest, gpu_digests(manifest, received))
        if st["plan"] is not None and not via_vllm_loader:
            problems = plan_problems(manifest, st["plan"])
            if problems:
                raise ValueError("manifest does not match the model: " + "; ".join(problems))
            out = copy_and_digest(manifest, st["plan"], received, digests)
        else:
            from vllm.model_executor.model_loader.reload import (finalize_layerwise_reload,
                                                                  initialize_layerwise_reload)

            out = gpu_digests(manifest, received) if digests else []
            initialize_layerwise_reload(st["model"])
            try:
                st["model"].load_weights([(e.name, received[e.name]) for e in manifest.entries])
            finally:
                finalize_layerwise_reload(st["model"], self.vllm_config.model_config)
            torch.cuda.synchronize()
        st["last_load_s"] = time.perf_counter() - t0
        return out

    def conveyor_load_ipc(self, manifest_msg: bytes, handles_msg: bytes, digests: bool = True,
                          keep_open: bool = True, via_vllm_loader: bool = False) -> list[str]:
        """Load from the sender's buckets (``handles_msg``: msgpack of one ``IpcBucketHandle``
        per manifest bucket). ``keep_open``: keep the mappings until the next update, so a
        sender that reuses its bucket buffers is not re-mapped every version (torch's IPC cache
        hits; the sender's per-send reference counters are still released); a mapping that the
        next update does not use is released then. ``via_vllm_loader``: load through vLLM's own
        loader even where the copy plan exists (the benchmark's comparison)."""
        st = self._conveyor()
        manifest = msgspec.msgpack.decode(manifest_msg, type=WeightManifest)
        hs = msgspec.msgpack.decode(handles_msg, type=list[IpcBucketHandle])
        if len(hs) != len(manifest.buckets):
            raise ValueError(f"version {manifest.version}: {len(hs)} IPC handles for {len(manifest.buckets)} buckets")
        buckets = [open_ipc_handle(h) for h in hs]
        try:
            return self._conveyor_load(manifest, bucket_views(manifest, buckets), digests, via_vllm_loader)
        finally:
            st["ipc_cache"] = {"buckets": buckets} if keep_open else {}
            del buckets

    def conveyor_release_ipc(self) -> int:
        """Drop every kept IPC mapping (the sender may then free its buffers). Returns how many."""
        st = self._conveyor()
        n = len(st["ipc_cache"].get("buckets", []))
        st["ipc_cache"] = {}
        torch.cuda.ipc_collect()
        return n

    def conveyor_load_host(self, manifest_msg: bytes, buckets: list, digests: bool = True) -> list[str]:
        """Load from host arrays (one flat uint8 array per bucket), copied to this GPU first."""
        import numpy as np

        manifest = msgspec.msgpack.decode(manifest_msg, type=WeightManifest)
        device = torch.device("cuda", torch.cuda.current_device())
        dev = [torch.from_numpy(np.ascontiguousarray(b).reshape(-1).view(np.uint8)).to(device) for b in buckets]
        return self._conveyor_load(manifest, bucket_views(manifest, dev), digests)

    def conveyor_nccl_init(self, rendezvous_msg: bytes) -> str:
        """Join the trainer's weight-broadcast group (blocks until every rank joined)."""
        from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

        st = self._conveyor()
        r = msgspec.msgpack.decode(rendezvous_msg, type=NcclRendezvous)
        key = (r.address, r.port, r.rank, r.world_size)
        if st["nccl_key"] != key:
            st["nccl"] = stateless_init_process_group(r.address, r.port, r.rank, r.world_size,
                                                      torch.cuda.current_device())
            st["nccl_key"] = key
        return f"rank {r.rank} of {r.world_size}"

    def conveyor_load_nccl(self, manifest_msg: bytes, src: int = 0, digests: bool = True) -> list[str]:
        """Receive every bucket by broadcast from ``src`` (flat uint8, manifest order), then load."""
        st = self._conveyor()
        if st["nccl"] is None:
            raise RuntimeError("update_weights_nccl before the NCCL group was joined (conveyor_nccl_init)")
        manifest = msgspec.msgpack.decode(manifest_msg, type=WeightManifest)
        device = torch.device("cuda", torch.cuda.current_device())
        stream = torch.cuda.current_stream()
        buckets = []
        for b in manifest.buckets:
            buf = torch.empty(b.nbytes, dtype=torch.uint8, device=device)
            st["nccl"].broadcast(buf, src=src, stream=stream)
            buckets.append(buf)
        return self._conveyor_load(manifest, bucket_views(manifest, buckets), digests)

    def conveyor_nccl_raw(self, sizes: list[int], reps: int, src: int = 0) -> int:
        """Benchmark baseline: receive ``reps`` rounds of broadcasts of ``sizes`` bytes into
        reused buffers, loading nothing (the bytes alone over the same communicator)."""
        st = self._conveyor()
        if st["nccl"] is None:
            raise RuntimeError("conveyor_nccl_raw before the NCCL group was joined (conveyor_nccl_init)")
        device = torch.device("cuda", torch.cuda.current_device())
        bufs = [torch.empty(n, dtype=torch.uint8, device=device) for n in sizes]
        stream = torch.cuda.current_stream()
        for _ in range(reps):
            for b in bufs:
                st["nccl"].broadcast(b, src=src, stream=stream)
        stream.synchronize()
        return reps

    def conveyor_finish(self, version: int) -> int:
        st = self._conveyor()
        st["version"] = int(version)
        return st["version"]

    def conveyor_version(self) -> int:
        return self._conveyor()["version"]

    def conveyor_last_load_s(self) -> float:
        """Seconds the last load took inside the worker (checks, copy, digests)."""
        return self._conveyor()["last_load_s"]

    def conveyor_param_digests(self, manifest_msg: bytes) -> list[str]:
        """``g1:`` digests of the live parameters laid out by ``manifest`` (tests compare them
        with the sender's, to show that the engine holds exactly those weights)."""
        st = self._conveyor()
        if st["plan"] is None:
            raise RuntimeError("parameter digests need the copy plan (tensor parallel 1, known layers)")
        manifest = msgspec.msgpack.decode(manifest_msg, type=WeightManifest)
        return gpu_digests(manifest, {e.name: st["plan"][e.name].view for e in manifest.entries})


# ----------------------------------------------------------------------------- trainer side
def open_nccl_sender(address: str, port: int, world_size: int):
    """Rank 0 of the weight-broadcast group (vLLM's ``trainer_init``): run concurrently with
    every engine's ``VllmEngine.init_nccl``."""
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    return trainer_init({"master_address": address, "master_port": port, "world_size": world_size})


def broadcast_buckets(comm, buckets: Sequence[torch.Tensor], src: int = 0) -> None:
    """Send flat uint8 buckets in manifest order; concurrent with the engines' receive."""
    stream = torch.cuda.current_stream()
    for b in buckets:
        comm.broadcast(b, src=src, stream=stream)
    stream.synchronize()

"""Learner rank 0's side of weight movement: stage a version's bytes, describe them in an offer.

One interface, three transports (``rollout.weight_transport`` picks one; ``make_sender``)::

    offer = sender.stage(state, version)   # bytes in place, manifest with digests
    (send offer to the publisher)
    sender.deliver()                        # nccl: broadcast now (background); others: no-op
    sender.settled(version)                 # the publisher declared it ready (optional hint)
    sender.close()

- ``ShmSender``: packs straight into the double-buffered ``/dev/shm`` slot of the version
  (one pass: copy + ``c1`` digest), engines read it in place (``shm``).
- ``CudaIpcSender``: copies into persistent CUDA bucket buffers (``CudaBuckets``, ``g1``
  digests on the GPU) and offers their IPC handles as plain fields (``cuda_ipc``).
- ``NcclSender``: fills persistent buckets (CUDA, or host for gloo) and broadcasts them in
  manifest order over a dedicated group with the engines (``nccl``), see ``collective``.

Invariants and failure behaviour:
- The bytes of version v never change while an engine may still read them: shm slots are
  flock-guarded (``shm``); an IPC buffer is refilled only after the version it held settled
  (ready, or its whole update budget ran out, after which every engine gave up on it); the
  nccl buckets are refilled only after the previous broadcast finished or failed.
- Every wait here is bounded by the update budget (``core.update_budget_s``).
- nccl: any failure or missed deadline (join, a bucket) aborts the group and bumps the epoch,
  so the next offer names a new group that every engine joins afresh; the failed version
  stays incomplete (engines keep their last complete version), the next one is tried.
  ``last_error`` tells what happened to the last transfer.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any, Mapping, Protocol

import msgspec
import numpy as np
import torch

from pipeline.endpoints import free_port
from schemas.messages import CudaIpcHandle, WeightGroup, WeightManifest, WeightsOffer
from stages.publisher.core import update_budget_s
from stages.publisher.manifest import DEFAULT_BUCKET_BYTES, pack_into, plan, same_layout
from stages.publisher.shm import ShmWeightWriter


class WeightSender(Protocol):
    transport: str

    def stage(self, state: Mapping[str, torch.Tensor], version: int) -> WeightsOffer: ...

    def deliver(self) -> None: ...

    def settled(self, version: int) -> None: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------- shm
class ShmSender:
    transport = "shm"

    def __init__(self, run_id: str, bucket_bytes: int = DEFAULT_BUCKET_BYTES, deadline_s: float = 30.0) -> None:
        self.writer = ShmWeightWriter(run_id)
        self.bucket_bytes, self.deadline_s = bucket_bytes, deadline_s

    def stage(self, state: Mapping[str, torch.Tensor], version: int) -> WeightsOffer:
        layout = plan(state, version, self.bucket_bytes)
        with self.writer.slot(version, layout.total_bytes) as dst:
            # Gaps between entries are not part of any digest, and readers never look at them.
            man = pack_into(state, layout, dst, zero_padding=False)
        return WeightsOffer(man, self.transport, self.writer.path_of(version), self.deadline_s, staged_at=time.time())

    def deliver(self) -> None:
        pass

    def settled(self, version: int) -> None:
        pass

    def close(self) -> None:
        self.writer.close()


# ----------------------------------------------------------------------------- cuda_ipc
class CudaBuckets:
    """Sender side of ``cuda_ipc``: persistent GPU bucket buffers laid out by a manifest.

    The learner (or a test, or the vLLM engine's seeded start) copies its state into the
    buckets, then hands ``handles()`` to engines; the buffers must stay alive and unmodified
    until every engine acknowledged (``update_weights_ipc`` returned). Reusing one
    ``CudaBuckets`` for every version lets engines keep their mappings open (no re-mapping
    per version). Sources may live on any device (host sources are copied in)."""

    def __init__(self, state: Mapping[str, torch.Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 device: torch.device | str | None = None) -> None:
        from stages.rollout.engines.vllm_worker import bucket_views

        self.layout = plan(state, 0, bucket_bytes)
        self.device = torch.device(device) if device is not None else next(iter(state.values())).device
        self.buffers = [torch.empty(b.nbytes, dtype=torch.uint8, device=self.device) for b in self.layout.buckets]
        for b in self.buffers:
            b.zero_()  # alignment padding is part of what a receiver may read
        self.views = bucket_views(self.layout, self.buffers)

    def fill(self, state: Mapping[str, torch.Tensor], version: int, digests: bool = True) -> WeightManifest:
        """Copy ``state`` in; returns the manifest of ``version`` with ``g1:`` digests (or none)."""
        from stages.rollout.engines.vllm_worker import gpu_digests

        names = [e.name for e in self.layout.entries]
        dst = [self.views[n] for n in names]
        src = [state[n].detach() for n in names]
        with torch.no_grad():
            if all(s.device == self.device for s in src):
                torch._foreach_copy_(dst, src)
            else:
                for d, s in zip(dst, src):
                    d.copy_(s)
        got = gpu_digests(self.layout, self.views) if digests else ["" for _ in self.layout.buckets]
        if not digests and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return msgspec.structs.replace(
            self.layout, version=version,
            buckets=[msgspec.structs.replace(b, digest=d) for b, d in zip(self.layout.buckets, got)])

    def handles(self) -> list:
        """One ``vllm_worker.IpcBucketHandle`` per bucket (``reduce_tensor`` now, so each
        handle's event follows this version's copies)."""
        from torch.multiprocessing.reductions import reduce_tensor

        from stages.rollout.engines.vllm_worker import encode_ipc_handle

        return [encode_ipc_handle(reduce_tensor(b)) for b in self.buffers]


def to_wire(handle: Any) -> CudaIpcHandle:
    """``vllm_worker.IpcBucketHandle`` (or a ``reduce_tensor`` tuple) → the schema's handle."""
    from stages.rollout.engines.vllm_worker import encode_ipc_handle

    return msgspec.msgpack.decode(msgspec.msgpack.encode(encode_ipc_handle(handle)), type=CudaIpcHandle)


class CudaIpcSender:
    transport = "cuda_ipc"

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, deadline_s: float = 30.0,
                 device: torch.device | str = "cuda", digests: bool = True) -> None:
        self.bucket_bytes, self.deadline_s, self.digests = bucket_bytes, deadline_s, digests
        self.device = torch.device(device)
        self.buckets: CudaBuckets | None = None
        self._cv = threading.Condition()
        self._settled = -1
        self._pending: tuple[int, float] | None = None
        """(version in the buffers, monotonic time its update budget runs out)."""
        self.last_wait_s = 0.0
        """How long the latest ``stage`` waited for the previous version to settle."""
        self.last_settled = True
        """Whether it settled (False: its update budget ran out and ``stage`` went on)."""

    def stage(self, state: Mapping[str, torch.Tensor], version: int) -> WeightsOffer:
        t0 = time.monotonic()
        self.last_settled = self.wait_settled()
        self.last_wait_s = time.monotonic() - t0
        layout = plan(state, version, self.bucket_bytes)
        if self.buckets is None or not same_layout(self.buckets.layout, layout):
            self.buckets = CudaBuckets(state, self.bucket_bytes, self.device)
        man = self.buckets.fill(state, version, self.digests)
        handles = [to_wire(h) for h in self.buckets.handles()]
        self._pending = (version, time.monotonic() + update_budget_s(self.deadline_s, len(man.buckets)))
        return WeightsOffer(man, self.transport, f"cuda:{handles[0].gpu_uuid}" if handles else "", self.deadline_s,
                            ipc_handles=handles, staged_at=time.time())

    def wait_settled(self) -> bool:
        """Until the version in the buffers settled or its budget ran out; True if it settled."""
        if self._pending is None:
            return True
        version, until = self._pending
        with self._cv:
            ok = self._cv.wait_for(lambda: self._settled >= version, timeout=max(0.0, until - time.monotonic()))
        self._pending = None
        return ok

    def deliver(self) -> None:
        pass

    def settle_state(self) -> dict:
        """For diagnostics: ``pending`` (version in the buffers, monotonic end of its update
        budget) and ``settled`` (newest version the engines released)."""
        with self._cv:
            return {"pending": self._pending, "settled": self._settled}

    def settled(self, version: int) -> None:
        with self._cv:
            self._settled = max(self._settled, version)
            self._cv.notify_all()

    def close(self) -> None:
        self.buckets = None


# ----------------------------------------------------------------------------- nccl
class NcclSender:
    """Rank 0 of the weight group. ``protocol="torch"``: a ``torch.distributed`` group over a
    store served at ``address:port`` (the torch engine; ``backend="gloo"`` with host buffers
    on CPU); ``protocol="vllm"``: vLLM's ``StatelessProcessGroup`` + PyNccl at a fresh port
    per epoch (the vLLM engine's worker). vLLM's communicator cannot be aborted: on a failure
    it is dropped and a new one built at the next epoch."""

    transport = "nccl"

    def __init__(self, members: list[str], address: str, port: int, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 deadline_s: float = 30.0, device: torch.device | str = "cuda", backend: str | None = None,
                 protocol: str = "torch") -> None:
        if protocol not in ("torch", "vllm"):
            raise ValueError(f"nccl protocol {protocol!r}: expected torch or vllm")
        self.members, self.address, self.port = list(members), address, port
        self.bucket_bytes, self.deadline_s, self.protocol = bucket_bytes, deadline_s, protocol
        self.device = torch.device(device)
        self.backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        if self.backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"backend nccl needs CUDA buffers, not {self.device}")
        if protocol == "vllm" and self.backend != "nccl":
            raise ValueError("the vllm protocol is NCCL only")
        self.instance = secrets.token_hex(3)
        self.epoch = 0
        self.group: Any = None
        """The joined group of the current epoch (``BroadcastGroup``, or vLLM's communicator)."""
        self._group_port = port
        self.store = None
        if protocol == "torch":
            from stages.publisher.collective import serve_store

            self.store = serve_store(address, port)
        self._layout: WeightManifest | None = None
        self._payload: np.ndarray | None = None
        self._cuda: CudaBuckets | None = None
        self._buckets: list[torch.Tensor] = []
        self._next: tuple[WeightManifest, WeightGroup] | None = None
        self._thread: threading.Thread | None = None
        self.last_error = ""
        self.transfers = {"ok": 0, "failed": 0}

    @property
    def group_id(self) -> str:
        return f"{self.instance}:{self.epoch}"

    def _fill(self, state: Mapping[str, torch.Tensor], version: int) -> WeightManifest:
        layout = plan(state, version, self.bucket_bytes)
        if self.device.type == "cuda":
            if self._cuda is None or not same_layout(self._cuda.layout, layout):
                self._cuda = CudaBuckets(state, self.bucket_bytes, self.device)
                self._buckets = self._cuda.buffers
            return self._cuda.fill(state, version)
        if self._payload is None or self._layout is None or not same_layout(self._layout, layout):
            self._payload = np.zeros(layout.total_bytes, np.uint8)
            self._buckets = [torch.from_numpy(self._payload[b.offset : b.offset + b.nbytes]) for b in layout.buckets]
        self._layout = layout
        return pack_into(state, layout, self._payload, zero_padding=False)

    def stage(self, state: Mapping[str, torch.Tensor], version: int) -> WeightsOffer:
        self.wait()
        man = self._fill(state, version)
        if self.group is None and self.protocol == "vllm":
            self._group_port = free_port(self.address)  # vLLM's store lives and dies with its communicator
        group = WeightGroup(self.address, self._group_port, self.group_id, self.members, self.backend, self.protocol)
        self._next = (man, group)
        return WeightsOffer(man, self.transport, f"tcp://{self.address}:{self._group_port}", self.deadline_s,
                            group=group, staged_at=time.time())

    def deliver(self) -> None:
        """Broadcast the staged version in the background (join first if the epoch is new)."""
        if self._next is None:
            raise RuntimeError("deliver() without stage()")
        man, group = self._next
        self._next = None
        self._thread = threading.Thread(target=self._transfer, args=(man, group), name="weights-nccl", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Until the transfer in progress ended (its own deadlines bound it); True if none runs."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
            self._thread = None
        return True

    def _transfer(self, man: WeightManifest, group: WeightGroup) -> None:
        from stages.publisher.collective import BroadcastGroup, _run_with_deadline

        world = len(self.members) + 1
        try:
            if self.protocol == "torch":
                if self.group is None:
                    self.group = BroadcastGroup.join(self.store, group.group_id, 0, world, backend=self.backend,
                                                     device=self.device, timeout_s=self.deadline_s)
                for b in self._buckets:
                    self.group.broadcast(b, 0)
            else:
                from stages.rollout.engines.vllm_worker import broadcast_buckets, open_nccl_sender

                if self.group is None:
                    self.group = _run_with_deadline(lambda: open_nccl_sender(self.address, group.port, world),
                                                    self.deadline_s, f"join {group.group_id}")
                comm = self.group
                for b in self._buckets:
                    _run_with_deadline(lambda b=b: (torch.cuda.set_device(self.device), broadcast_buckets(comm, [b])),
                                       self.deadline_s, f"bucket of version {man.version}")
            self.last_error = ""
            self.transfers["ok"] += 1
        except Exception as e:  # noqa: BLE001 - reported through last_error; the next version retries
            self.last_error = f"version {man.version}: {e}"
            self.transfers["failed"] += 1
            if self.group is not None and hasattr(self.group, "abort"):
                self.group.abort()
            self.group = None
            self.epoch += 1  # the next offer names a new group

    def settled(self, version: int) -> None:
        pass

    def close(self) -> None:
        self.wait(self.deadline_s)
        if self.group is not None and hasattr(self.group, "abort"):
            self.group.abort()
        self.group = None
        self.store = None


# ----------------------------------------------------------------------------- choice
def staging_device(stack: Any) -> torch.device:
    """Where the stack's sender takes the full state from: the host for ``shm`` (packed
    into ``/dev/shm``), the sender's CUDA device for ``cuda_ipc`` and ``nccl`` (its bucket
    buffers live there, so the learner gathers on its GPU: no GPU → host → GPU round trip).
    A function of the stack alone, so every learner rank picks the same gather
    (``fsdp.full_parameters``), though only rank 0 has a sender."""
    transport = stack.rollout.weight_transport
    if transport == "shm":
        return torch.device("cpu")
    if transport in ("cuda_ipc", "nccl"):
        return torch.device("cuda", 0) if stack.learner.device.startswith("cuda") else torch.device("cuda")
    raise ValueError(f"rollout.weight_transport={transport!r}: expected shm, cuda_ipc or nccl")


def make_sender(stack: Any, run_dir: Any, endpoints: Mapping[str, str]) -> WeightSender:
    """The sender the stack's ``rollout.weight_transport`` names, for learner rank 0; its
    buffers are on ``staging_device(stack)``."""
    from stages.publisher.shm import run_slot_id

    transport = stack.rollout.weight_transport
    bucket_bytes, deadline = stack.publisher.bucket_mb << 20, stack.publisher.deadline_s
    device = staging_device(stack)
    if transport == "shm":
        return ShmSender(run_slot_id(stack.run.name, run_dir), bucket_bytes, deadline)
    if transport == "cuda_ipc":
        return CudaIpcSender(bucket_bytes, deadline, device)
    if transport == "nccl":
        address = endpoints["weights.dist"]
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        return NcclSender([f"rollout/{i}" for i in range(stack.rollout.replicas)], host, int(port),
                          bucket_bytes=bucket_bytes, deadline_s=deadline, device=device,
                          protocol="vllm" if stack.rollout.engine == "vllm" else "torch")
    raise ValueError(f"rollout.weight_transport={transport!r}: expected shm, cuda_ipc or nccl")

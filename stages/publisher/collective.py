"""The ``nccl`` transport's process group: learner rank 0 broadcasts buckets to the engines.

The group is its own world, apart from the learner's FSDP world and from any default
process group: ``ProcessGroupNCCL`` (CUDA buffers) or ``ProcessGroupGloo`` (host buffers;
the same code on CPU, which is how it is tested) built directly over a ``PrefixStore`` of
one ``TCPStore`` that the sender serves. Rank 0 is the sender, engines are ranks 1..n in
the order of ``WeightGroup.members``. Each (re)built group has a new ``group_id``
(``<sender instance>:<epoch>``) and its own store prefix, so a rebuilt group never meets a
stale rendezvous key, and a restarted sender (new instance) never meets its predecessor's.

Invariants and failure behaviour:
- Every operation has a deadline: joining waits at most ``timeout_s`` for every rank, each
  broadcast at most ``timeout_s`` (``Work.wait(timeout)``). On expiry or on any error the
  group is aborted locally and ``CollectiveFailed`` is raised; a peer then fails too (gloo:
  its connection to us closes at once; NCCL: its own deadline). An aborted group is never
  used again: the sender moves to the next epoch, engines join it with the next offer.
- ``join`` runs the blocking rendezvous in a daemon thread, so a rank that never shows up
  costs ``timeout_s``, not a hang (an NCCL communicator stuck in its init is abandoned).
"""

from __future__ import annotations

import contextlib
import datetime
import threading
from typing import Any

import torch

STORE_CONNECT_S = 30.0
"""How long an engine's store client waits for the sender's store; a sender that is not up
after this long is gone for this offer anyway."""


class CollectiveFailed(RuntimeError):
    """A join or broadcast of the weight group failed or missed its deadline; the group is aborted."""


def serve_store(host: str, port: int) -> Any:
    """The sender's rendezvous store (``TCPStore`` server), kept for the sender's lifetime."""
    from torch.distributed import TCPStore

    return TCPStore(host, port, is_master=True, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=STORE_CONNECT_S))


def connect_store(host: str, port: int, timeout_s: float = STORE_CONNECT_S) -> Any:
    """A client of the sender's store; waits at most ``timeout_s`` for it."""
    from torch.distributed import TCPStore

    return TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def _run_with_deadline(fn, timeout_s: float, what: str):
    """``fn()`` in a daemon thread; ``CollectiveFailed`` if it does not return in time."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e

    t = threading.Thread(target=body, name=f"weights-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise CollectiveFailed(f"{what}: no completion within {timeout_s:.1f} s")
    if "error" in out:
        raise CollectiveFailed(f"{what}: {out['error']}") from out["error"]
    return out["value"]


class BroadcastGroup:
    """One epoch of the weight group, joined by this process at ``rank``."""

    def __init__(self, pg: Any, group_id: str, rank: int, world: int, backend: str, device: torch.device,
                 timeout_s: float) -> None:
        self.pg, self.group_id, self.rank, self.world = pg, group_id, rank, world
        self.backend, self.device, self.timeout_s = backend, device, timeout_s
        self.aborted = False

    @classmethod
    def join(cls, store: Any, group_id: str, rank: int, world: int, *, backend: str,
             device: torch.device | str = "cpu", timeout_s: float) -> "BroadcastGroup":
        """Blocks until every rank joined (at most ``timeout_s``); ``CollectiveFailed`` otherwise."""
        from torch.distributed import PrefixStore

        device = torch.device(device)
        timeout = datetime.timedelta(seconds=timeout_s)
        prefixed = PrefixStore(f"conveyor-weights/{group_id}/", store)
        if backend == "gloo":
            def make():
                from torch.distributed import ProcessGroupGloo

                return ProcessGroupGloo(prefixed, rank, world, timeout)
        elif backend == "nccl":
            if device.type != "cuda":
                raise ValueError(f"the nccl weight group needs a CUDA device, not {device}")

            def make():
                from torch.distributed import ProcessGroupNCCL

                torch.cuda.set_device(device)
                opts = ProcessGroupNCCL.Options()
                opts._timeout = timeout
                pg = ProcessGroupNCCL(prefixed, rank, world, opts)
                pg.eager_connect_single_device(device)  # the communicator now, not at the first bucket
                return pg
        else:
            raise ValueError(f"weight group backend {backend!r}: expected nccl or gloo")
        pg = _run_with_deadline(make, timeout_s, f"join {group_id} as rank {rank}/{world}")
        return cls(pg, group_id, rank, world, backend, device, timeout_s)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> None:
        """One bucket from ``src`` (in place on receivers); aborts the group and raises
        ``CollectiveFailed`` on error or after ``timeout_s``."""
        if self.aborted:
            raise CollectiveFailed(f"group {self.group_id} was aborted")
        from torch.distributed import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        opts.timeout = datetime.timedelta(seconds=self.timeout_s)
        try:
            with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                work = self.pg.broadcast([t], opts)
                work.wait(datetime.timedelta(seconds=self.timeout_s))
                if self.device.type == "cuda":
                    torch.cuda.current_stream().synchronize()
        except Exception as e:
            self.abort()
            raise CollectiveFailed(f"broadcast in group {self.group_id} (rank {self.rank}/{self.world}): {e}") from e

    def abort(self) -> None:
        """Tear the group down now (peers blocked on us fail or time out); idempotent."""
        if self.aborted:
            return
        self.aborted = True
        for name in ("abort", "_abort", "shutdown"):
            fn = getattr(self.pg, name, None)
            if fn is not None:
                with contextlib.suppress(Exception):
                    fn()
                break
        self.pg = None

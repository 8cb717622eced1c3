"""Engine side of weight updates: offer → verified load (any transport) → acknowledgement.

``WeightLoader.apply(offer)`` dispatches on ``offer.transport``:
- ``shm``: the payload is read in place from the sender's slot (share-locked while loading,
  see ``stages.publisher.shm``) → ``engine.update_weights_shm``; an engine that
  ``adopts_shm`` the manifest takes the payload as its parameters (no copy) and the slot
  stays held while they are live (released once the engine moved to another version);
- ``cuda_ipc``: the offer's plain-field handles (``CudaIpcHandle``) → the sender's CUDA
  buckets, mapped here → ``engine.update_weights_ipc``;
- ``nccl``: join the offer's broadcast group if it is new to this engine (rank =
  position in ``group.members`` + 1), then ``engine.update_weights_nccl`` receives every
  bucket from rank 0 (``protocol="vllm"``: the vLLM engine joins vLLM's group itself).
After the acknowledgement, ``canary_report(offer)`` runs the offer's canary prompt on the
version just loaded (``teacher_forced_logprobs``) for a ``CanaryReport`` (the shell sends
it after the ``WeightsLoaded``, so the canary never delays the version's readiness).

Deadlines: each phase gets ``offer.deadline_s``: start (nccl: joining, within that time of
``offer.staged_at``; then ``start_weight_update``, which pauses generation), each bucket
(the collective's per-operation timeout; shm/ipc loads are local copies bounded as a whole
by ``deadline_s × buckets``), finish. On expiry or any error the update is aborted
(``abort_weight_update``: old weights, generation resumes) and, for nccl, the group is
aborted and never rejoined (the sender moves to a new group for the next version).

Learner epochs (rollback): versions are ordered only within one learner incarnation
(``WeightsOffer.learner_epoch``). A learner that crashed after publishing version 28 and
resumed its step-20 checkpoint offers 20, 21, ... under a newer epoch; those weights are
the only ones of a timeline that still exists, so the loader takes them although their
version is lower than the live one (samples then record spans with version 20 as usual).
The rule, with ``live_epoch`` the epoch of the weights this loader last made live (0 for
the seeded start and for offers that carry no epoch):
- offer epoch > ``live_epoch``: applied, whatever its version (even equal to the live one);
- offer epoch = ``live_epoch``: applied only if newer than the live version (the first
  offer also at an equal version, see ``loaded_any``);
- offer epoch < ``live_epoch``: ignored (a late offer of a learner that no longer exists).
``live_epoch`` moves only when a version goes live; a refused offer of a newer epoch leaves
the engine on its old weights and the next offer of that epoch is applied.

Invariants and failure behaviour:
- An offer is applied only if it supersedes the engine's live weights (the epoch rule
  above); a version goes live only after every bucket arrived and matched its digest
  (engines verify before anything is copied into the model).
- A manifest that does not match the engine's parameters, a digest mismatch, a failed or
  late transfer leave the engine on its previous version; the result is reported to the
  publisher as ``WeightsLoaded(ok=False, error="<phase>: ...")``. A torn shm read (the
  slot was lapped) is not reported: the newer offer that lapped it is already on its way.
- A (re)started engine given an nccl offer whose join window has passed (it came from the
  publisher's last-value cache) refuses it at once instead of waiting: that broadcast is
  over. It joins the group of a later version (the sender rebuilds the group once a
  broadcast fails, i.e. at most two versions later).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import numpy as np

from schemas.messages import CanaryReport, WeightsLoaded, WeightsOffer
from stages.publisher.manifest import DigestMismatch, ManifestMismatch
from stages.publisher.shm import ShmWeightReader, TornRead

JOIN_MIN_S = 0.5
"""Least time an engine gives a join: the sender's window is measured from its own clock."""


class Refused(Exception):
    """This engine will not load the offered version (the message says why and in which phase)."""


class WeightLoader:
    def __init__(self, engine, engine_name: str) -> None:
        self.engine = engine
        self.engine_name = engine_name
        self.reader = ShmWeightReader()
        self.loaded_any = False
        """The engine starts on seeded weights labelled version 0; the first offer is loaded
        even at version 0, so its digests are checked and it is acknowledged."""
        self.live_epoch = 0
        """Learner epoch of the live weights (0: the seeded start, or offers without one)."""
        self.group: Any = None
        """The torch-protocol ``BroadcastGroup`` this engine is in (nccl transport)."""
        self.dead_groups: set[str] = set()
        """Group ids that failed here: the sender has abandoned them too."""
        self.holding: set[str] = set()
        """shm slots held because the engine's parameters are their payload (``_adopt_shm``)."""

    def supersedes(self, offer: WeightsOffer) -> bool:
        """Whether ``offer`` replaces the live weights (the epoch rule of the module docstring)."""
        if offer.learner_epoch != self.live_epoch:
            return offer.learner_epoch > self.live_epoch
        version, live = offer.manifest.version, self.engine.weight_version
        return version > live or (version == live and not self.loaded_any)

    async def apply(self, offer: WeightsOffer) -> WeightsLoaded | None:
        if not self.supersedes(offer):
            return None
        version, epoch = offer.manifest.version, offer.learner_epoch
        t0 = time.perf_counter()
        try:
            digests = await self._load(offer)
        except TornRead:
            return None
        except Refused as e:
            return WeightsLoaded(version, self.engine_name, False, [], str(e), time.perf_counter() - t0, epoch)
        seconds = time.perf_counter() - t0
        self.loaded_any = True
        self.live_epoch = epoch
        return WeightsLoaded(version, self.engine_name, True, digests, "", seconds, epoch)

    # ------------------------------------------------------------------ phases
    async def _load(self, offer: WeightsOffer) -> list[str]:
        man, version, deadline = offer.manifest, offer.manifest.version, offer.deadline_s
        group = await self._join(offer) if offer.transport == "nccl" else None
        try:
            async with asyncio.timeout(deadline):
                await self.engine.start_weight_update(version, man)
        except ManifestMismatch as e:
            raise Refused(f"start: {e}") from None
        except (TimeoutError, Exception) as e:  # noqa: BLE001 - any failure refuses the version
            await self.engine.abort_weight_update()
            raise Refused(f"start: {_why(e, deadline)}") from None
        budget = deadline * len(man.buckets)
        try:
            if offer.transport == "shm":
                try:
                    if getattr(self.engine, "adopts_shm", None) and self.engine.adopts_shm(man):
                        digests = await self._adopt_shm(offer.location, man, budget)
                    else:
                        with self.reader.view(offer.location, version) as payload:
                            async with asyncio.timeout(budget):
                                digests = await self.engine.update_weights_shm(payload, man)
                except OSError as e:
                    if isinstance(e, TimeoutError):  # an OSError too
                        raise
                    raise Refused(f"cannot read {offer.location}: {e}") from None
            elif offer.transport == "cuda_ipc":
                from stages.rollout.engines.vllm_worker import IpcBucketHandle

                handles = [msgspec.msgpack.decode(msgspec.msgpack.encode(h), type=IpcBucketHandle)
                           for h in offer.ipc_handles]
                async with asyncio.timeout(budget):
                    digests = await self.engine.update_weights_ipc(handles, man)
            elif offer.transport == "nccl":
                async with asyncio.timeout(budget + deadline):  # the group's own per-bucket timeouts come first
                    digests = await self.engine.update_weights_nccl(group, man, src=0)
            else:
                raise Refused(f"unknown transport {offer.transport!r}")
        except BaseException as e:
            await self.engine.abort_weight_update()
            if offer.transport == "nccl":
                self._drop_group()
            if isinstance(e, (TornRead, Refused)):
                raise
            if isinstance(e, asyncio.CancelledError):
                raise
            if isinstance(e, (DigestMismatch, ManifestMismatch)):
                raise Refused(f"buckets: {e}") from None
            raise Refused(f"buckets: {_why(e, budget)}") from None
        if not getattr(self.engine, "adopted", False):
            self._release_held()  # the engine copied this version: no slot needs holding
        try:
            async with asyncio.timeout(deadline):
                await self.engine.finish_weight_update(version)
        except (TimeoutError, Exception) as e:  # noqa: BLE001
            await self.engine.abort_weight_update()
            raise Refused(f"finish: {_why(e, deadline)}") from None
        return list(digests)

    async def _adopt_shm(self, location: str, man: Any, budget: float) -> list[str]:
        """Zero-copy shm load: hold the slot, let the engine verify it and make it its
        parameters, then let go of the slot it used before (the old weights are gone from
        the model by then). If the engine refuses, nothing changed: the new hold goes."""
        payload = self.reader.hold(location, man.version)
        try:
            async with asyncio.timeout(budget):
                digests = await self.engine.update_weights_shm(payload, man, adopt=True)
        except BaseException:
            if location not in self.holding:
                self.reader.release(location)
            raise
        self._release_held(keep=location)
        self.holding = {location}
        return digests

    def _release_held(self, keep: str | None = None) -> None:
        for path in self.holding - {keep}:
            self.reader.release(path)
        self.holding &= {keep}

    async def _join(self, offer: WeightsOffer) -> Any:
        g = offer.group
        if g is None:
            raise Refused("start: nccl offer without a group")
        if self.engine_name not in g.members:
            raise Refused(f"start: {self.engine_name} is not a member of weight group {g.group_id} "
                          f"({len(g.members)} engines: {', '.join(g.members)})")
        rank, world = g.members.index(self.engine_name) + 1, len(g.members) + 1
        if g.protocol == "vllm":
            from stages.rollout.engines.vllm_worker import NcclRendezvous

            return NcclRendezvous(g.address, g.port, rank, world)  # the vLLM engine joins (once per rendezvous)
        if self.group is not None and self.group.group_id == g.group_id:
            return self.group
        if g.group_id in self.dead_groups:
            raise Refused(f"start: weight group {g.group_id} failed here; waiting for the sender's next group")
        left = offer.deadline_s - (time.time() - offer.staged_at)
        if left <= 0:
            raise Refused(f"start: the join window of group {g.group_id} closed {-left:.1f} s ago "
                          "(an offer from before this engine started); joining the next group")
        self._drop_group()
        from stages.publisher.collective import BroadcastGroup, CollectiveFailed, connect_store

        device = getattr(self.engine, "device", "cpu") if g.backend == "nccl" else "cpu"
        try:
            store = await asyncio.to_thread(connect_store, g.address, g.port, max(left, JOIN_MIN_S))
            left = offer.deadline_s - (time.time() - offer.staged_at)
            self.group = await asyncio.to_thread(BroadcastGroup.join, store, g.group_id, rank, world, backend=g.backend,
                                                 device=device, timeout_s=max(left, JOIN_MIN_S))
        except (CollectiveFailed, RuntimeError, ValueError) as e:
            self.dead_groups.add(g.group_id)
            raise Refused(f"start: joining weight group {g.group_id}: {e}") from None
        return self.group

    def _drop_group(self) -> None:
        if self.group is not None:
            self.dead_groups.add(self.group.group_id)
            self.group.abort()
            self.group = None

    async def canary_report(self, offer: WeightsOffer) -> CanaryReport | None:
        """The engine's canary logprobs on the live version, if it is the offer's version and
        the offer has a canary and the engine can run it (else None; the update stands)."""
        if offer.canary_ids is None or self.engine.weight_version != offer.manifest.version:
            return None
        try:
            lp = await self.engine.teacher_forced_logprobs(offer.canary_ids)
        except Exception:  # noqa: BLE001 - an engine without a canary reports none
            return None
        return CanaryReport(offer.manifest.version, self.engine_name, np.asarray(lp, np.float32))

    def close(self) -> None:
        self.reader.close()
        if self.group is not None:
            self.group.abort()
            self.group = None


def _why(e: BaseException, limit: float) -> str:
    if isinstance(e, TimeoutError):
        return f"deadline of {limit:.1f} s passed"
    return f"{type(e).__name__}: {e}"


ShmWeightLoader = WeightLoader
"""The earlier name (shm only); the rollout shell still uses it."""

"""Learner side of publishing: after a step, full weights → sender → ``WeightsOffer``.

``WeightOutlet.read`` runs on every learner rank (gathering the full parameters and the
canary forward are collective), in the learner's step thread right after the step; rank 0's
``ship`` then stages the bytes with the sender the stack names (``senders.make_sender``),
attaches the canary (ids and the learner's logprobs; first offer and every
``CANARY_EVERY_VERSIONS``-th version) and sends the offer to the publisher's ``publish``
socket, then lets the sender deliver (``nccl``: the broadcast starts in the background while
training goes on). The staging and offer run beside the next step (``shipping``: the
gathered tensors never share storage with the model). The next ``read`` waits until the
sender has staged the last version (so one gathered copy exists at a time), and the next
``ship`` until its offer is out. ``publish`` (the first offer of an incarnation) does both.

Where the full state is gathered is the sender's choice (``senders.staging_device``, the
same on every rank): on the host for ``shm``; on the learner's GPU for ``cuda_ipc`` and
``nccl``, cast to the engine dtype there and copied into the sender's CUDA buckets, with no
host round trip. Rank 0 drops the gathered state as soon as the sender staged it (it is in
the sender's buffers then), so it never outlives one ``publish``.

For ``cuda_ipc`` rank 0 also follows the publisher's ``WeightsReady`` so that the sender
knows when a version's buffers are free again (``CudaIpcSender.settled``); only those of
its own epoch count (the last-value cache may hand it its predecessor's, of a higher
version, which would free the buffers too early).

Learner epoch: rank 0 takes the next incarnation number at start (``next_learner_epoch``:
a counter in ``<run_dir>/learner_epoch``, written durably before the first offer, so an
epoch is never reused even if the learner dies at once) and stamps it on every offer; the
shell puts it on every ``Progress``. Engines, the publisher and the source order versions
within an epoch and let a newer epoch win (a learner resumed from an older checkpoint
re-offers lower versions; see ``stages.rollout.weights``).

Failure behaviour: a sender error (no CUDA, a full ``/dev/shm``) propagates from the next
``ship``, ``publish`` or ``shipped``: the learner stage fails and the supervisor restarts the
learner group. A failed nccl transfer does not
raise: it is logged at the next publish (``last_error``) and the engines stay on their
version.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import torch

import transport
from schemas.messages import WeightsReady
from stages.publisher.canary import canary_ids, teacher_forced_logprobs
from stages.publisher.senders import CudaIpcSender, make_sender, staging_device


EPOCH_FILE = "learner_epoch"

SLOW_PUBLISH_S = 10.0
"""A publish still running after this long logs the phase it is in (gathering, the canary,
staging, which includes waiting for the engines to release the previous version's CUDA
buffers; sending the offer), the newest ``WeightsReady`` the learner has seen, and writes
every thread's stack to the replica's ``.out`` log, once per publish; one that finishes
slower than this logs where its time went. A GPU stack once stalled inside a publish with
nothing in any log. A normal publish takes well under a second, even for 1.7B."""

FIRST_PUBLISH_SLOW_S = 120.0
"""The same for an incarnation's first publish: its canary forward compiles the model's
layers first (``compile_layers``), 18 s on an H200 for Qwen3-0.6B, which is no stall."""

CANARY_EVERY_VERSIONS = 10
"""The canary (a teacher-forced forward on the learner, then on every engine) rides on the
first offer of each learner incarnation and on every 10th version: it checks that engines
compute what the learner does (weight names, dtype, kernels), which does not change between
versions of one run, while the per-tensor digests check every version's bytes. On every
version it cost ~9 % of the default CPU stack's rollout CPU and a forward per learner step."""


@dataclass(frozen=True)
class WeightsRead:
    """One version as ``WeightOutlet.read`` took it from the model, for ``ship``."""

    params: dict[str, torch.Tensor]
    """Full parameters in the engine dtype, on the staging device; own storage."""
    canary: Any
    """The learner's canary logprobs, or None for a version that carries none."""
    version: int
    t0: float
    """When the read started (monotonic)."""
    t_read: float
    """When it finished (monotonic)."""
    slow_s: float
    """Past this long since ``t0`` the publish is reported as stuck (``watchdog``) or slow."""
    watchdog: threading.Timer
    """Reports the publish stuck; cancelled when it ends (``_ship``, or ``ship`` off rank 0)."""


def next_learner_epoch(run_dir: str | Path) -> int:
    """One more than the epoch recorded in ``run_dir`` (1 for the first learner of a run);
    recorded durably (temporary file, fsync, rename) before it is returned."""
    path = Path(run_dir) / EPOCH_FILE
    try:
        last = int(path.read_text().strip() or 0)
    except FileNotFoundError:
        last = 0
    epoch = last + 1
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{epoch}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return epoch


class WeightOutlet:
    def __init__(self, ctx: Any, rank: int) -> None:
        self.ctx, self.rank = ctx, rank
        s = ctx.stack
        self.epoch = next_learner_epoch(ctx.run_dir) if rank == 0 else 0
        """This learner's incarnation (rank 0; other ranks send nothing)."""
        self.engine_dtype = getattr(torch, s.model.dtype)
        self.device = staging_device(s)
        """Where ``publish`` gathers the full state (every rank: it picks the collective)."""
        self.canary = canary_ids()
        self.sender = make_sender(s, ctx.run_dir, ctx.endpoints) if rank == 0 else None
        self.offers = None
        self._follower: asyncio.Task | None = None
        self._reported = ""
        self.ready_seen: tuple[int, float] | None = None
        """(version, monotonic time) of the newest own-epoch ``WeightsReady`` (cuda_ipc)."""
        self._canaried = False
        """Whether this incarnation has sent a canary yet (its first offer carries one)."""
        self.phase = "idle"
        """What the running publish is doing (gather, canary, stage, send), for the watchdog."""
        self.shipping: asyncio.Future | None = None
        """Rank 0: the last publish's staging and offer, running while the learner trains."""
        self._staged = threading.Event()
        """Set while no read copy awaits staging: ``read`` waits for it, so at most one
        gathered copy of the model exists beside the sender's buffers."""
        self._staged.set()
        if rank == 0:
            self.offers = transport.push(ctx.endpoints["publish"], bind=False, sender=ctx.name, name="publish")
            ctx._channels.append(self.offers)
            if self.sender.transport == "cuda_ipc":
                self._follower = asyncio.get_running_loop().create_task(self._follow_ready())

    async def _follow_ready(self) -> None:
        try:
            ch = await self.ctx.subscribe("weights", topics=("weights_ready",))
            async for msg in ch:
                if isinstance(msg, WeightsReady) and msg.learner_epoch == self.epoch:
                    self.ready_seen = (msg.version, time.monotonic())
                    self.sender.settled(msg.version)
        except asyncio.CancelledError:
            raise
        except Exception:  # without it every later publish waits out its update budget
            self.ctx.log.exception("WeightsReady follower failed: each cuda_ipc publish now waits its whole budget")
            raise

    async def publish(self, learner: Any) -> None:
        """Collective: every rank calls it after the step whose weights are to be published.
        Returns once nothing reads the model any more (the gather, the canary): the next
        step may change the parameters. Rank 0's staging and offer go on in ``shipping``
        while it trains; the next ``publish`` (or ``shipped``) waits for them first. The
        learner's step loop calls ``read`` in its training thread and ``ship`` instead."""
        await self.shipped()  # here, cancellable; ``read`` would wait for the staging in a thread
        await self.ship(await asyncio.to_thread(self.read, learner))

    def read(self, learner: Any) -> WeightsRead:
        """Collective, blocking (call it from a worker thread, on every rank in the same
        order as the other collectives): once the last publish's staging is done with its
        copy (rank 0), the full parameters and, on the first offer and every
        ``CANARY_EVERY_VERSIONS``-th, the canary. Hand the result to ``ship``."""
        self._staged.wait()
        slow_s = SLOW_PUBLISH_S if self._canaried else FIRST_PUBLISH_SLOW_S
        t0 = time.monotonic()
        watchdog = threading.Timer(slow_s, self._report_stuck, (learner.version, t0))
        watchdog.daemon = True
        watchdog.start()
        try:
            self.phase = "gather"
            params = learner.full_parameters(self.engine_dtype, self.device)  # own storage, never the model's
            canary = None  # the same decision on every rank: the forward is collective under FSDP
            if not self._canaried or learner.version % CANARY_EVERY_VERSIONS == 0:
                self.phase = "canary"
                canary = teacher_forced_logprobs(learner.model, self.canary, learner.device)
                self._canaried = True
        except BaseException:
            watchdog.cancel()
            self.phase = "idle"
            raise
        if self.rank == 0:
            self._staged.clear()  # ``ship`` hands the copy to the sender; the next read waits for it
        return WeightsRead(params, canary, learner.version, t0, time.monotonic(), slow_s, watchdog)

    async def ship(self, read: WeightsRead) -> None:
        """After ``read``: rank 0 starts staging and offering that version (``shipping``,
        beside the next step) once the previous offer is out (raising what its staging
        raised); other ranks have nothing to send."""
        if self.rank != 0:
            read.watchdog.cancel()
            self.phase = "idle"
            return
        try:
            await self.shipped()
        except BaseException:
            read.watchdog.cancel()
            self._staged.set()
            raise
        self.shipping = asyncio.ensure_future(self._ship(read))

    async def shipped(self) -> None:
        """Until the last publish's offer is sent (rank 0); raises what its staging raised."""
        if self.shipping is not None:
            shipping, self.shipping = self.shipping, None
            await shipping

    def _report_stuck(self, version: int, t0: float) -> None:
        """The watchdog: the publish of ``version`` has run past its limit; say where."""
        now = time.monotonic()
        settle = self.sender.settle_state() if isinstance(self.sender, CudaIpcSender) else {}
        self.ctx.log.warning("publish still running", version=version, phase=self.phase,
                             running_s=round(now - t0, 3), ready_seen=self._ready_seen_age(now),
                             stacks="written to the replica's .out log", **settle)
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)

    def _ready_seen_age(self, now: float) -> tuple[int, float] | None:
        """(version, seconds since) of the newest own-epoch ``WeightsReady``, for the logs."""
        return None if self.ready_seen is None else (self.ready_seen[0], round(now - self.ready_seen[1], 3))

    async def _ship(self, read: WeightsRead) -> None:
        """Rank 0: stage the read parameters with the sender and send the offer."""
        version, canary, t0, t_read, slow_s, watchdog = (
            read.version, read.canary, read.t0, read.t_read, read.slow_s, read.watchdog)
        try:
            self.phase = "stage"
            params, read = read.params, None
            offer = await asyncio.to_thread(self.sender.stage, params, version)  # waits for the last transfer
            del params  # in the sender's buffers now; on the GPU it would hold a second copy of the model
            self._staged.set()
            t_staged = time.monotonic()
            waited = getattr(self.sender, "last_wait_s", 0.0)
            if not getattr(self.sender, "last_settled", True):
                self.ctx.log.warning("previous version never settled: staged over its buffers after its update budget",
                                     version=version, waited_s=round(waited, 3), ready_seen=self.ready_seen)
            if t_staged - t0 > slow_s:
                self.ctx.log.warning("slow publish", version=version, read_s=round(t_read - t0, 3),
                                     settle_wait_s=round(waited, 3), stage_s=round(t_staged - t_read - waited, 3),
                                     ready_seen=self._ready_seen_age(t_staged))
            last = getattr(self.sender, "last_error", "")
            if last and last != self._reported:
                self.ctx.log.warning("weight transfer failed", error=last)
            self._reported = last
            offer = msgspec.structs.replace(offer, canary_ids=None if canary is None else self.canary,
                                            canary_logprobs=canary, learner_epoch=self.epoch)
            self.phase = "send"
            await self.offers.send(offer)
            self.sender.deliver()
        finally:
            self._staged.set()
            watchdog.cancel()
            self.phase = "idle"

    def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        if self.shipping is not None:
            self.shipping.cancel()
        if self.sender is not None:
            with contextlib.suppress(Exception):
                self.sender.close()

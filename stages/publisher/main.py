"""Publisher stage shell: offers from the learner → engines, confirmations → WeightsReady.

Sockets: PULL ``publish`` (bound here; learner rank 0 sends ``WeightsOffer``, engines send
``WeightsLoaded`` and ``CanaryReport``), PUB ``weights`` (bound here; offers and ``WeightsReady``, with a
last-value cache so a (re)starting engine gets the newest offer first).
Deadlines are checked every ``TICK_S``. Each engine's canary gap (learner vs engine
teacher-forced logprobs of a fixed prompt, ``core.canary_gap``) is logged per version and
sent as ``Metrics`` (step = version; mean and max over the engines reported so far, and the
max per engine as ``canary_gap_max/<engine>``); once a version is settled the publisher
sends its publish time and lagging/failed engines the same way. The supervisor adds the
newest of these figures to every ``metrics.jsonl`` row.

Failure behaviour: the publisher holds no bytes and no state that survives it; if it dies,
the offer in flight is lost (engines stay on their version), and the learner's next offer
goes to its restarted successor.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

import transport
from pipeline.runtime import StageContext
from schemas.messages import CanaryReport, WeightsLoaded, WeightsOffer
from stages.publisher.core import PublisherCore

TICK_S = 0.2
"""Deadline resolution; deadlines are seconds long, so 200 ms is precise enough."""


def settled_metrics(core: PublisherCore, version: int, staged_at: float, ready: bool) -> dict[str, float]:
    return {"weights_version": float(version), "weights_ready": float(ready),
            "weights_publish_s": max(0.0, time.time() - staged_at) if staged_at else 0.0,
            "weights_lagging": float(len(core.lagging)), "weights_failed": float(len(core.last_failed)),
            "weights_incomplete": float(len(core.incomplete_versions))}


def canary_metrics(core: PublisherCore, version: int) -> dict[str, float]:
    gaps = core.canaries.get(version, {})
    if not gaps:
        return {}
    out = {"canary_version": float(version),
           "canary_gap_mean": float(sum(m for m, _ in gaps.values()) / len(gaps)),
           "canary_gap_max": float(max(x for _, x in gaps.values()))}
    out.update({f"canary_gap_max/{e}": x for e, (_, x) in sorted(gaps.items())})
    return out


async def run(ctx: StageContext) -> None:
    s = ctx.stack
    core = PublisherCore({f"rollout/{i}" for i in range(s.rollout.replicas)})
    inbox = transport.pull(ctx.endpoints["publish"], bind=True, sender=ctx.name, name="publish")
    ctx._channels.append(inbox)
    out = ctx.publisher("weights")
    while not ctx.draining.is_set():
        try:
            msg = await asyncio.wait_for(inbox.recv(), TICK_S)
        except asyncio.TimeoutError:
            msg = None
        ready = None
        pending = core.pending
        if isinstance(msg, WeightsOffer):
            offer = core.offer(msgspec.structs.replace(msg, deadline_s=s.publisher.deadline_s), time.monotonic())
            if offer is None:
                ctx.log.warning("offer of an older learner epoch dropped", version=msg.manifest.version,
                                epoch=msg.learner_epoch, newest_epoch=core.learner_epoch)
            else:
                await out.send(offer)
                ctx.log.info("offered", version=msg.manifest.version, epoch=msg.learner_epoch,
                             bytes=msg.manifest.total_bytes, transport=msg.transport,
                             buckets=len(msg.manifest.buckets))
        elif isinstance(msg, WeightsLoaded):
            if not msg.ok:
                ctx.log.warning("engine refused version", engine=msg.engine, version=msg.version, error=msg.error)
            ready = core.loaded(msg)
        elif isinstance(msg, CanaryReport):
            gap = core.canary(msg)
            if gap is not None:
                ctx.log.info("canary", engine=msg.engine, version=msg.version,
                             gap_mean=round(gap[0], 7), gap_max=round(gap[1], 7))
                await ctx.metrics(msg.version, canary_metrics(core, msg.version))
        ready = ready or core.expire(time.monotonic())
        if pending is not None and core.pending is not pending:  # that version settled
            version = pending.offer.manifest.version
            settled = ready is not None and ready.version == version
            if core.last_failed:
                ctx.log.warning("engines failed version", version=version, failed=core.last_failed)
            await ctx.metrics(version, settled_metrics(core, version, pending.offer.staged_at, settled))
        if ready is not None:
            await out.send(ready)
            ctx.weight_version = ready.version
            ctx.processed += 1
            ctx.log.info("weights ready", version=ready.version, epoch=ready.learner_epoch,
                         lagging=sorted(core.lagging))

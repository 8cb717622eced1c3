"""Publisher stage shell: offers from the learner → engines, confirmations → WeightsReady.

Sockets: PULL ``publish`` (bound here; learner rank 0 sends ``WeightsOffer``, engines send
``WeightsLoaded``), PUB ``weights`` (bound here; offers and ``WeightsReady``, with a
last-value cache so a (re)starting engine gets the newest offer first).
Deadlines are checked every ``TICK_S``.
"""

from __future__ import annotations

import asyncio
import time

import transport
from pipeline.runtime import StageContext
from schemas.messages import WeightsLoaded, WeightsOffer
from stages.publisher.core import PublisherCore

TICK_S = 0.2
"""Deadline resolution; deadlines are seconds long, so 200 ms is precise enough."""


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
        if isinstance(msg, WeightsOffer):
            offer = WeightsOffer(msg.manifest, msg.transport, msg.location, s.publisher.deadline_s)
            await out.send(core.offer(offer, time.monotonic()))
            ctx.log.info("offered", version=msg.manifest.version, bytes=msg.manifest.total_bytes)
        elif isinstance(msg, WeightsLoaded):
            if not msg.ok:
                ctx.log.warning("engine refused version", engine=msg.engine, version=msg.version, error=msg.error)
            ready = core.loaded(msg)
        ready = ready or core.expire(time.monotonic())
        if ready is not None:
            await out.send(ready)
            ctx.weight_version = ready.version
            ctx.processed += 1
            ctx.log.info("weights ready", version=ready.version, lagging=sorted(core.lagging))

"""Source stage shell: ``PromptSource`` → ``prompts`` work stream; ``Progress`` → credit.

Sockets: PUSH ``prompts`` (groups), PUSH ``train`` (``GroupFailed`` for abandoned groups, so
the learner records their terminal state; resent until a ``Progress`` answers it), SUB ``progress`` (consumed/dropped ids and the
learner version), SUB ``weights`` (``WeightsReady``: the live version, see the source's
"Weight lag"). State (cursor, outstanding groups) is saved to ``source_state.json`` in
the run dir after it issues, at most every ``STATE_SAVE_INTERVAL_S``, and when it stops;
it is restored at start, so a restarted source reissues what was outstanding instead of
forgetting it. A source killed between saves restores a state up to that old: it issues
again, under the same ids and attempt 0, the groups issued since, which the learner
deduplicates (see ``stages.source.source``, "Ids"). ``Control(REISSUE)`` (sent by the
supervisor when a downstream replica restarts) reissues every outstanding group at once.
"""

from __future__ import annotations

import asyncio
import time

from pipeline.runtime import StageContext
from schemas.messages import ControlCommand, Progress, WeightsReady
from stages.source.source import PromptSource, SourceConfig

STATE_FILE = "source_state.json"
WEIGHTS_WAIT_FACTOR = 3
"""Issue anyway after waiting this many publisher deadlines for the newest weights: by then
the publisher has given up on that version (engines stay on their last complete one)."""
IDLE_POLL_S = 0.5
"""Longest sleep between polls when no progress arrives (lease checks need no more)."""
STATE_SAVE_INTERVAL_S = 0.25
"""Least time between two state saves while issuing. A save (encode, write, rename) was
~60 % of the source's CPU when it followed every issue (several per learner step, ~2.6 ms
of CPU a step on the 2-core default stack, py-spy, ad hoc); a quarter second bounds what a
killed source issues twice to about five steps' worth of the default stack's groups."""


def source_config(ctx: StageContext) -> SourceConfig:
    s = ctx.stack
    return SourceConfig(
        task=s.task.name, dataset_path=s.task.dataset, prompt_field=s.task.prompt_field,
        answer_field=s.task.answer_field, n_samples=s.source.group_size,
        groups_per_step=s.learner.groups_per_step, max_staleness=s.run.max_staleness,
        lease_seconds=s.source.lease_s, seed=s.run.seed, follow_weights=True,
        weights_wait_s=WEIGHTS_WAIT_FACTOR * s.publisher.deadline_s,
    )


async def run(ctx: StageContext) -> None:
    src = PromptSource(source_config(ctx), ctx.run_dir)
    state_path = ctx.run_dir / STATE_FILE
    if state_path.exists():
        src.load_state(state_path)
        ctx.log.info("source resumed", cursor=src.cursor, outstanding=len(src.outstanding))
    out, failed_out = ctx.work_out("prompts"), ctx.work_out("train")
    progress = await ctx.subscribe("progress", topics=("progress",))
    weights = await ctx.subscribe("weights", topics=("weights_ready",))
    wake = asyncio.Event()
    reissue = asyncio.Event()
    ctx.control_handlers[ControlCommand.REISSUE] = lambda _msg: (reissue.set(), wake.set())

    async def follow_progress() -> None:
        async for msg in progress:
            if isinstance(msg, Progress):
                src.on_progress(msg)
                ctx.weight_version = msg.version
                wake.set()

    async def follow_weights() -> None:
        async for msg in weights:
            if isinstance(msg, WeightsReady):
                src.on_weights_ready(msg.version, msg.learner_epoch)
                wake.set()

    follower = asyncio.get_running_loop().create_task(follow_progress())
    weights_follower = asyncio.get_running_loop().create_task(follow_weights())
    unsaved, saved_at = False, float("-inf")
    try:
        while not ctx.draining.is_set():
            groups = src.reissue_all_outstanding() if reissue.is_set() else []
            reissue.clear()
            groups += src.poll()
            for g in groups:
                await out.send(g)
            failed = src.take_failed()
            for f in failed:
                await failed_out.send(f)
            if groups or failed:
                unsaved = True
                ctx.processed += len(groups)
            if unsaved and (now := time.monotonic()) >= saved_at + STATE_SAVE_INTERVAL_S:
                src.save_state(state_path)
                unsaved, saved_at = False, now
            ctx.in_flight = len(src.outstanding)
            nxt = src.next_lease_expiry()
            timeout = IDLE_POLL_S if nxt is None else max(0.0, min(IDLE_POLL_S, nxt - time.time()))
            if unsaved:  # wake for the save even when nothing else comes
                timeout = min(timeout, max(0.0, saved_at + STATE_SAVE_INTERVAL_S - time.monotonic()))
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
    finally:
        follower.cancel()
        weights_follower.cancel()
        src.save_state(state_path)
        src.close()

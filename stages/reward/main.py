"""Reward stage shell: ``rollouts`` work stream → ``RewardScorer`` → ``scored`` stream.

Several messages are scored concurrently (up to the puller's credit), and the groups of a
``RolloutBatch`` concurrently too, so one slow reward function never holds up other groups.
Each group is emitted whole as soon as it is scored; groups scored in the same turn of the
event loop leave together as one ``ScoredBatch`` (``transport.coalesce``; a batch of
built-in rewards, which run inline, leaves whole and in its order), a lone one as a
``ScoredGroup``. ``score`` never raises for anything a rollout or reward function does (see
``stages.reward.scorer``).
"""

from __future__ import annotations

import asyncio

from pipeline.runtime import StageContext
from schemas.messages import Rollout, RolloutBatch, ScoredBatch
from stages.reward.scorer import RewardConfig, RewardScorer
from transport.coalesce import TurnCoalescer

GROUPS_IN_FLIGHT = 4
"""Messages (groups or batches of them) scored at once per replica: enough to hide one slow
sample behind others."""


async def run(ctx: StageContext) -> None:
    s = ctx.stack
    rewards = {s.task.name: s.task.reward} if s.task.reward else {}
    scorer = RewardScorer(RewardConfig(rewards=rewards, tasks=[s.task.name],
                                       sample_timeout_s=s.reward.timeout_s, num_workers=s.reward.workers,
                                       isolation=s.reward.isolation))
    await scorer.start()
    inbox, out = ctx.work_in("rollouts", credit=GROUPS_IN_FLIGHT), ctx.work_out("scored")

    scored = TurnCoalescer(out.send, ScoredBatch)

    async def score_one(rollout: Rollout) -> None:
        await scored.submit(await scorer.score(rollout))

    async def score_and_send(msg: Rollout | RolloutBatch) -> None:
        match msg:
            case RolloutBatch():
                await asyncio.gather(*map(score_one, msg.rollouts))
            case Rollout():
                await score_one(msg)

    try:
        await ctx.serve(inbox, (Rollout, RolloutBatch), score_and_send)
    finally:
        await scorer.close()

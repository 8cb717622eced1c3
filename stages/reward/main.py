"""Reward stage shell: ``rollouts`` work stream → ``RewardScorer`` → ``scored`` stream.

Several messages are scored concurrently (up to the puller's credit), so one slow reward
function never blocks other messages; each group is emitted whole. A ``Rollout`` gives a
``ScoredGroup``; a ``RolloutBatch`` gives one ``ScoredBatch`` in its order once all its
groups are scored (concurrently: a slow sample holds its batch up to ``reward.timeout_s``).
``score`` never raises for anything a rollout or reward function does (see
``stages.reward.scorer``).
"""

from __future__ import annotations

from pipeline.runtime import StageContext
import asyncio

from schemas.messages import Rollout, RolloutBatch, ScoredBatch
from stages.reward.scorer import RewardConfig, RewardScorer

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

    async def score_and_send(msg: Rollout | RolloutBatch) -> None:
        match msg:
            case RolloutBatch():
                await out.send(ScoredBatch(list(await asyncio.gather(*map(scorer.score, msg.rollouts)))))
            case Rollout():
                await out.send(await scorer.score(msg))

    try:
        await ctx.serve(inbox, (Rollout, RolloutBatch), score_and_send)
    finally:
        await scorer.close()

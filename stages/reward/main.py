"""Reward stage shell: ``rollouts`` work stream → ``RewardScorer`` → ``scored`` stream.

Several groups are scored concurrently (up to the puller's credit), so one slow reward
function never blocks other groups; each group is emitted whole. ``score`` never raises for
anything a rollout or reward function does (see ``stages.reward.scorer``).
"""

from __future__ import annotations

from pipeline.runtime import StageContext
from schemas.messages import Rollout
from stages.reward.scorer import RewardConfig, RewardScorer

GROUPS_IN_FLIGHT = 4
"""Groups scored at once per replica: enough to hide one slow sample behind others."""


async def run(ctx: StageContext) -> None:
    s = ctx.stack
    rewards = {s.task.name: s.task.reward} if s.task.reward else {}
    scorer = RewardScorer(RewardConfig(rewards=rewards, tasks=[s.task.name],
                                       sample_timeout_s=s.reward.timeout_s, num_workers=s.reward.workers,
                                       isolation=s.reward.isolation))
    await scorer.start()
    inbox, out = ctx.work_in("rollouts", credit=GROUPS_IN_FLIGHT), ctx.work_out("scored")

    async def score_and_send(msg: Rollout) -> None:
        await out.send(await scorer.score(msg))

    try:
        await ctx.serve(inbox, Rollout, score_and_send)
    finally:
        await scorer.close()

"""Logprob stage shell: ``scored`` work stream → ``ReferenceScorer`` → ``train`` stream.

A group that fails to score (e.g. a token id outside the vocabulary) is forwarded as
``GroupFailed`` with the reason, so the learner records a terminal state for it; the stage
keeps serving.
"""

from __future__ import annotations

from pipeline.runtime import StageContext
from schemas.messages import GroupFailed, ScoredGroup
from stages.logprob.scorer import ReferenceScorer


async def run(ctx: StageContext) -> None:
    s = ctx.stack
    scorer = ReferenceScorer(s.model.name, enabled=s.logprob.reference, seed=s.run.seed, device=s.logprob.device,
                             shared_row_tokens=s.learner.shared_row_tokens)  # score rows as the learner trains them
    inbox, out = ctx.work_in("scored"), ctx.work_out("train")
    async for msg in ctx.consume(inbox):
        if not isinstance(msg, ScoredGroup):
            ctx.log.warning("unexpected message", tag=type(msg).__name__)
            continue
        try:
            await out.send(scorer(msg))
        except Exception as e:  # one bad group must not stop the stage
            ctx.log.exception("group failed", group_id=msg.rollout.group.group_id)
            await out.send(GroupFailed(msg.rollout.group.group_id, f"logprob: {e!r}", ctx.name))
        ctx.processed += 1

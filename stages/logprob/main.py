"""Logprob stage shell: ``scored`` work stream → ``ReferenceScorer`` → ``train`` stream.

A ``ScoredGroup`` gives a ``TrainGroup``, a ``ScoredBatch`` one ``TrainBatch`` in its order.
A group that fails to score (e.g. a token id outside the vocabulary) is forwarded as
``GroupFailed`` with the reason (in its batch's place), so the learner records a terminal
state for it; the stage keeps serving.
"""

from __future__ import annotations

from pipeline.runtime import StageContext
from schemas.messages import GroupFailed, ScoredBatch, ScoredGroup, TrainBatch, TrainGroup
from stages.logprob.scorer import ReferenceScorer


async def run(ctx: StageContext) -> None:
    s = ctx.stack
    scorer = ReferenceScorer(s.model.name, enabled=s.logprob.reference, seed=s.run.seed, device=s.logprob.device,
                             shared_row_tokens=s.learner.shared_row_tokens)  # score rows as the learner trains them
    inbox, out = ctx.work_in("scored"), ctx.work_out("train")

    def failed(group: ScoredGroup, e: Exception) -> GroupFailed:
        ctx.log.exception("group failed", group_id=group.rollout.group.group_id)  # called in an except block
        return GroupFailed(group.rollout.group.group_id, f"logprob: {e!r}", ctx.name)

    def score(group: ScoredGroup) -> TrainGroup | GroupFailed:
        try:
            return scorer(group)
        except Exception as e:  # one bad group must not stop the stage
            return failed(group, e)

    async for msg in ctx.consume(inbox):
        match msg:
            case ScoredBatch():
                groups = msg.groups
                result: TrainBatch | TrainGroup | GroupFailed = TrainBatch([score(g) for g in groups])
            case ScoredGroup():
                groups = [msg]
                result = score(msg)
            case _:
                ctx.log.warning("unexpected message", tag=type(msg).__name__)
                continue
        try:
            await out.send(result)
        except Exception as e:  # e.g. a result the codec cannot encode: its groups fail, the stage goes on
            failures = [failed(g, e) for g in groups]
            await out.send(TrainBatch(failures) if isinstance(msg, ScoredBatch) else failures[0])
        ctx.processed += 1

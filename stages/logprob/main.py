"""Logprob stage shell: ``scored`` work stream → ``ReferenceScorer`` → ``train`` stream.

With ``logprob.reference`` off there is nothing to add: each message is passed on to the
learner as received, unread (the learner takes a ``ScoredGroup`` as a ``TrainGroup``
without reference logprobs), which spares a decode and an encode of every group (~60 µs of
CPU each on the 2-core default stack, ad hoc); the stage still holds its credit, so a
kill loses what it held and the source reissues it, as for any stage.

With it on, a ``ScoredGroup`` gives a ``TrainGroup``, a ``ScoredBatch`` one ``TrainBatch``
in its order. A group that fails to score (e.g. a token id outside the vocabulary) is
forwarded as ``GroupFailed`` with the reason (in its batch's place), so the learner records
a terminal state for it; the stage keeps serving.
"""

from __future__ import annotations

from pipeline.runtime import StageContext
from schemas.messages import GroupFailed, ScoredBatch, ScoredGroup, TrainBatch, TrainGroup
from stages.logprob.scorer import ReferenceScorer
from transport.workqueue import WorkPuller
from transport.zmq_sockets import PushChannel


async def run(ctx: StageContext) -> None:
    s = ctx.stack
    scorer = ReferenceScorer(s.model.name, enabled=s.logprob.reference, seed=s.run.seed, device=s.logprob.device,
                             shared_row_tokens=s.learner.shared_row_tokens)  # score rows as the learner trains them
    inbox, out = ctx.work_in("scored"), ctx.work_out("train")
    if not scorer.enabled:
        await relay(ctx, inbox, out)
        return

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


async def relay(ctx: StageContext, inbox: WorkPuller, out: PushChannel) -> None:
    """Pass every item on unread until drained."""
    while True:
        try:
            frames = await inbox.recv_frames()
        except EOFError:
            return
        ctx.in_flight = 1
        await out.send_frames(frames)
        ctx.in_flight = 0
        ctx.processed += 1

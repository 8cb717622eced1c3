"""Rollout stage shell: ``prompts`` work stream → engine → ``rollouts`` stream.

Sockets: work in ``prompts`` (credit ``BATCHES_HELD`` × the groups that fill the engine's
batch: a replica holds at most that many, and a kill loses at most that many), PUSH
``rollouts`` (the groups one engine step finishes go as one ``RolloutBatch``, a lone one as
a ``Rollout``: ``transport.coalesce``), SUB ``weights`` (offers; the last-value cache gives
a (re)starting engine the newest offer first, which it loads before asking for work), PUSH
``publish`` (its ``WeightsLoaded`` acknowledgements).

Many groups are in flight at once (each a task awaiting ``engine.generate``); weight
offers are applied between decode steps by the engine, so no request is dropped and each
sample's ``version_spans`` say which version produced which tokens.
"""

from __future__ import annotations

import asyncio
import time

import transport
from pipeline.runtime import StageContext
from schemas.messages import PromptGroup, Rollout, RolloutBatch, WeightsOffer
from stages.model import EOS_ID
from stages.rollout.engines.base import SamplingParams
from stages.rollout.engines.torch_engine import TorchEngine
from stages.rollout.weights import ShmWeightLoader
from transport.coalesce import TurnCoalescer

BATCHES_HELD = 2
"""Engine batches' worth of groups a replica holds: one running and one waiting, so the
slots a finished group frees are refilled at the next step, not after a credit round trip
to the broker (several decode steps). Async default stack, 400 steps (ad hoc): with one
batch plus one group held, 4.2 groups per prefill and 72 sequences per decode step (of
128); with two batches, 6.1 and 100, and async's rollout CPU per step fell to sync's."""
FIRST_OFFER_WAIT_S = 2.0
"""At start, how long to wait for the newest weights offer before serving the initial
(seeded) weights: long enough for the snapshot to arrive, short enough not to matter."""


def build_engine(ctx: StageContext):
    """The engine the stack names: ``torch`` (built-in) or ``vllm`` (GPU; ``rollout.device``
    ``cuda:N`` narrows this process to GPU N before vLLM starts, so its engine core runs there)."""
    s = ctx.stack
    if s.rollout.engine == "vllm":
        from stages.rollout.engines.vllm_engine import VllmEngine, pin_cuda_device

        pin_cuda_device(s.rollout.device)
        return VllmEngine(s.model.name, dtype=s.model.dtype, seed=s.run.seed, max_num_seqs=s.rollout.max_batch,
                          gpu_memory_utilization=s.rollout.gpu_memory_utilization)
    return TorchEngine(s.model.name, device=s.rollout.device, dtype=s.model.dtype,
                       max_batch=s.rollout.max_batch, seed=s.run.seed, sampling_seed=s.run.seed * 1000 + ctx.replica)


async def run(ctx: StageContext) -> None:
    s = ctx.stack
    engine = build_engine(ctx)
    await engine.start()
    loader = ShmWeightLoader(engine, ctx.name)
    acks = transport.push(ctx.endpoints["publish"], bind=False, sender=ctx.name, name="publish")
    ctx._channels.append(acks)
    weights = await ctx.subscribe("weights", topics=("weights_offer",))

    async def apply(offer: WeightsOffer) -> None:
        ack = await loader.apply(offer)
        if ack is not None:
            await acks.send(ack)
            ctx.weight_version = engine.weight_version
            ctx.log.info("weights loaded", version=ack.version, ok=ack.ok, error=ack.error,
                         seconds=round(ack.load_seconds, 4))
            if ack.ok and (report := await loader.canary_report(offer)) is not None:
                await acks.send(report)  # after the acknowledgement: never delays readiness

    try:  # newest complete version before accepting work
        first = await asyncio.wait_for(weights.recv(), FIRST_OFFER_WAIT_S)
        if isinstance(first, WeightsOffer):
            await apply(first)
    except asyncio.TimeoutError:
        pass

    async def follow_weights() -> None:
        async for msg in weights:
            if isinstance(msg, WeightsOffer):
                await apply(msg)

    follower = asyncio.get_running_loop().create_task(follow_weights())
    out = ctx.work_out("rollouts")

    finished = TurnCoalescer(out.send, RolloutBatch)
    credit = max(2, BATCHES_HELD * (s.rollout.max_batch // max(1, s.source.group_size)))
    inbox = ctx.work_in("prompts", credit=credit)

    async def generate(group: PromptGroup) -> None:
        t0 = time.perf_counter()
        params = SamplingParams(temperature=s.rollout.temperature, top_p=s.rollout.top_p,
                                max_tokens=s.rollout.max_tokens, stop_ids=[EOS_ID], n=group.n_samples)
        completions = await engine.generate(f"{group.group_id}/{group.attempt}", group.prompt_ids, params)
        samples = [c.to_sample() for c in completions]
        await finished.submit(Rollout(group, samples, ctx.name, time.perf_counter() - t0))

    try:
        await ctx.serve(inbox, PromptGroup, generate)
    finally:
        follower.cancel()
        loader.close()
        await engine.stop()

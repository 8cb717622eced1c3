"""Learner stage shell: one process per rank; rank 0 owns every socket.

Rank 0 pulls ``TrainGroup``/``GroupFailed`` (alone or in a ``TrainBatch``; a ``ScoredGroup``
or ``ScoredBatch`` that a logprob stage without a reference model passed on counts as
``TrainGroup``s without reference logprobs) from the ``train`` stream until it has
``groups_per_step`` trainable groups (``Learner.admit`` drops duplicates, stale and failed
ones with a reason; groups of a batch beyond the step wait, unadmitted, for the next one,
whose version then judges their staleness). Every rank then runs, in one worker thread,
the batch broadcast (``feed.broadcast_batch``), the step, and for a step to be published
the publish's read of the new parameters (``stages.publisher.outlet``: full parameters and
the canary forward, collective, after the last version's staging). Collectives thus keep
one order on all ranks, and the read is done before the next step changes the parameters.
After the step rank 0 starts the sender's staging and offer for ``rollout.weight_transport``
(→ ``WeightsOffer`` to the publisher, beside the next step), publishes ``Progress``
(consumed and dropped ids) and sends step ``Metrics`` to the supervisor. Blocking torch work
runs in a thread so heartbeats keep flowing. With ``learner.async_checkpoint`` a periodic
checkpoint is written in the background; the first step that ends after its write marks
it complete, and only then does its step reach the source as ``checkpoint_step``. A save
that falls due while the previous write still runs waits for the first step after it.

Drain (SIGTERM or ``Control(DRAIN)``): rank 0 finishes the step in progress, broadcasts a
stop, every rank checkpoints (collective), rank 0 sends its last offer, and they exit.
Start: the newest complete checkpoint is resumed, and its weights are offered before
anything else, so engines generate with the learner's weights. Every start is a new learner
epoch (``outlet.next_learner_epoch``), carried on each offer and ``Progress``: after a
rollback the engines, the publisher and the source take the resumed, lower versions over the
newer-numbered ones of the lost timeline.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from pipeline.runtime import StageContext
from schemas.messages import DroppedGroup, GroupFailed, Progress, ScoredBatch, ScoredGroup, TrainBatch, TrainGroup
from stages.learner.config import LearnerConfig
from stages.learner.feed import StepBatch, broadcast_batch
from stages.learner.trainer import Learner, StepResult
from stages.publisher.outlet import WeightOutlet, WeightsRead


def _init_dist(ctx: StageContext, device: torch.device) -> None:
    s = ctx.stack
    backend = "nccl" if device.type == "cuda" else "gloo"
    # NCCL: bind the group to this rank's GPU (else barrier() and the communicator guess
    # from the calling thread's current device).
    bound = {"device_id": device} if device.type == "cuda" else {}
    if s.learner.world_size == 1:
        # One rank needs no rendezvous: an in-process store binds no port, so a port taken by
        # another process between the supervisor's pick and this bind cannot fail the start.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **bound)
        return
    dist.init_process_group(backend, init_method=ctx.endpoints["learner.dist"], rank=ctx.replica,
                            world_size=s.learner.world_size, **bound)


def _use_device_in_worker_threads(device: torch.device) -> None:
    """CUDA's current device is per thread, and the learner's blocking torch work runs in
    worker threads (``asyncio.to_thread``), which start on cuda:0: every rank's collectives
    and allocations without an explicit device would land there. The loop's default executor
    now starts each worker on this rank's GPU."""
    torch.cuda.set_device(device)
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(thread_name_prefix="learner", initializer=torch.cuda.set_device, initargs=(device,)))


async def run(ctx: StageContext) -> None:
    s = ctx.stack
    rank = ctx.replica
    device = torch.device(f"cuda:{rank}" if s.learner.device.startswith("cuda") else "cpu")
    if device.type == "cuda":
        _use_device_in_worker_threads(device)
    await asyncio.to_thread(_init_dist, ctx, device)
    learner: Learner = await asyncio.to_thread(Learner, LearnerConfig.for_stack(s, ctx.run_dir), device=device)
    resumed = await asyncio.to_thread(learner.resume)
    ctx.log.info("learner ready", rank=rank, resumed=resumed, step=learner.step, version=learner.version)

    outlet = WeightOutlet(ctx, rank)  # rank 0: the stack's weight sender and the offer socket
    resumed_step = learner.step

    def report(step: int, version: int, consumed: Sequence[str] = (),
               dropped: Sequence[DroppedGroup] = ()) -> Progress:
        """Progress of this step, stamped with this incarnation's epoch and resume point."""
        return Progress(step, version, list(consumed), list(dropped), learner.checkpoint_step, outlet.epoch,
                        resumed_step)

    if rank == 0:
        inbox = ctx.work_in("train", credit=2 * s.learner.groups_per_step)
        progress = ctx.publisher("progress")
        await progress.send(report(learner.step, learner.version))

    async def stage_weights() -> None:
        await outlet.publish(learner)  # collective: full parameters and the canary forward

    await stage_weights()
    ctx.weight_version = learner.version
    last_step_at = time.perf_counter()
    t_saved = last_step_at  # when the newest checkpoint save started
    checkpoint_due, deferred_at = False, 0  # a periodic save waiting for the previous write; since which step

    async def finish_written() -> None:
        """A background checkpoint whose write is done: mark it complete and say so."""
        if learner.checkpoint_written():
            await asyncio.to_thread(learner.finish_checkpoint)
            ctx.log.info("checkpoint complete", step=learner.checkpoint_step,
                         seconds=round(time.perf_counter() - t_saved, 3))

    received: collections.deque[TrainGroup | GroupFailed] = collections.deque()
    """Groups taken off the stream and not admitted yet (a batch's groups beyond a step)."""

    async def collect() -> StepBatch:
        keep: list[TrainGroup] = []
        while len(keep) < s.learner.groups_per_step:
            if not received:
                try:
                    msg = await inbox.recv()
                except EOFError:  # draining: train what is held, then stop
                    return StepBatch(keep, stop=not keep)
                match msg:
                    case TrainBatch():
                        received.extend(msg.groups)
                    case TrainGroup() | GroupFailed():
                        received.append(msg)
                    case ScoredBatch():  # passed on unread by a logprob stage with nothing to add
                        received.extend(TrainGroup(g) for g in msg.groups)
                    case ScoredGroup():
                        received.append(TrainGroup(msg))
                continue
            k, d = learner.admit([received.popleft()], in_step={g.scored.rollout.group.group_id for g in keep})
            keep += k
            if d:  # report terminal drops promptly: the source returns their credit
                learner.record_dropped(d)
                await progress.send(report(learner.step, learner.version, dropped=d))
        return StepBatch(keep)

    def train(batch: StepBatch | None) -> tuple[StepBatch, float, float, StepResult | None, WeightsRead | None]:
        """Every rank, in one worker thread: the batch broadcast, the step and, when the step
        is to be published, the publish's read of the new parameters (``outlet.read``, which
        first waits for the last version's staging). Returns (the batch, when training began
        and ended, the step's result, the read); no result for a stop. One hand-off to a
        thread per step, where there were three: on the 2-core default stack (async,
        2026-12-03) the one-rank broadcast, a no-op, took 1.3 ms a step as its own hop and
        the read 3.2 ms (medians), all of it between two steps on the learner's busy core."""
        batch = broadcast_batch(batch)
        t_train = time.perf_counter()
        if batch.stop:
            return batch, t_train, t_train, None, None
        ctx.in_flight = len(batch.groups)
        result = learner.train_step(batch.groups)
        t_trained = time.perf_counter()
        publish = result.step % s.publisher.every_steps == 0 and not result.skipped
        return batch, t_train, t_trained, result, outlet.read(learner) if publish else None

    try:
        publish_s = 0.0
        """The last publish's read of the model, in seconds: its part between two steps."""
        while True:
            t_wait = time.perf_counter()
            batch = await collect() if rank == 0 else None
            batch, t_train, t_trained, result, read = await asyncio.to_thread(train, batch)
            if result is None:
                break
            if read is not None:
                publish_s = read.t_read - read.t0
                await outlet.ship(read)  # rank 0: staging and offer beside the next step
                read = None  # the staging then holds the only reference: the copy goes once staged
            ctx.weight_version = learner.version
            ctx.processed += len(batch.groups)
            ctx.in_flight = 0
            await finish_written()  # this step's report then carries it
            if rank == 0:
                n_samples = sum(len(g.scored.rollout.samples) for g in batch.groups)
                metrics = dict(result.metrics, samples=float(n_samples),
                               samples_per_s=n_samples / max(t_trained - last_step_at, 1e-9),
                               dropped_stale=float(learner.dropped_counts["stale"]),
                               dropped_duplicate=float(learner.dropped_counts["duplicate"]),
                               dropped_failed=float(learner.dropped_counts["failed"]),
                               dropped_invalid=float(learner.dropped_counts["invalid"]),
                               # where the step's wall time went: waiting for data (the pipeline
                               # starving the learner), training, and the weight publish's read
                               # of the model after the step (rank 0's staging and offer run
                               # beside the next one)
                               wait_s=t_train - t_wait, train_s=t_trained - t_train, publish_s=publish_s)
                last_step_at = t_trained
                await progress.send(report(result.step, result.version, result.consumed_ids))
                await ctx.metrics(result.step, metrics)
                ctx.log.info("step", step=result.step, version=result.version, skipped=result.skipped,
                             reward_mean=round(metrics["reward_mean"], 4), loss=round(metrics["loss"], 5))
            if s.learner.checkpoint_every and result.step % s.learner.checkpoint_every == 0:
                checkpoint_due = True
            if checkpoint_due:
                # Collective. A background write still running (every rank agrees on it)
                # defers the save to the first step after it, instead of holding the loop.
                if await asyncio.to_thread(learner.checkpoint_busy):
                    if not deferred_at:
                        deferred_at = result.step
                        ctx.log.info("checkpoint deferred", step=result.step, reason="the previous one is still being written")
                else:
                    deferred = result.step - deferred_at if deferred_at else 0
                    checkpoint_due, deferred_at = False, 0
                    await finish_written()  # the previous one's write ended since the step did
                    # collective; async_checkpoint: the write goes on in the background
                    t_saved = time.perf_counter()
                    written = await asyncio.to_thread(learner.save_checkpoint, False)
                    ctx.log.info("checkpoint", step=learner.step, background=written is None,
                                 seconds=round(time.perf_counter() - t_saved, 3), deferred_steps=deferred)
                    if written and rank == 0:
                        # the source may now forget groups this checkpoint covers
                        await progress.send(report(learner.step, learner.version))
        # The checkpoint first: the last offer may wait on engines that are draining too (a
        # cuda_ipc sender waits for the previous version's buffers to be released), and a
        # stop that ends the learner then must not have cost it its final checkpoint (GPU
        # stack, 2026-12-02: killed after 14 s in the publish, the drain's checkpoint never
        # written).
        await asyncio.to_thread(learner.save_checkpoint)
        if rank == 0:
            await progress.send(report(learner.step, learner.version))
        await outlet.shipped()  # the last version's offer is out before the drain ends
        ctx.log.info("learner drained", step=learner.step, version=learner.version)
    finally:
        outlet.close()
        if dist.is_initialized():
            dist.destroy_process_group()

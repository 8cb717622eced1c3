"""Learner batch feed: every rank gets rank 0's batch, bit-exact; stop reaches everyone."""

import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.endpoints import free_port
from stages.learner.feed import StepBatch, broadcast_batch
from stages.testing import make_train_group, messages_equal


def _port() -> int:
    return free_port()


def _worker(rank, world, port, q):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sent = StepBatch([make_train_group(f"g{i}", length=50 + i, seed=i) for i in range(3)])
        got = broadcast_batch(sent if rank == 0 else None)
        stop = broadcast_batch(StepBatch([], stop=True) if rank == 0 else None)
        q.put((rank, messages_equal(sent.groups, got.groups), stop.stop))
    finally:
        dist.destroy_process_group()


def test_every_rank_receives_the_same_batch_and_the_stop():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    world, port = 2, _port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=60) for _ in range(world))
    for p in procs:
        p.join(30)
    assert results == [(0, True, True), (1, True, True)]

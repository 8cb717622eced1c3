"""Learner benchmark: trained tokens/s on CPU for the default model, W=1 and W=2.

    python ops/bench/learner.py [--quick]

Each world size runs in its own spawned gloo world (one process per rank, FSDP2) on the same
synthetic batches: ``--groups`` groups of 16 samples with 16-48 completion tokens and an
8-token prompt, packed into micro-batches of 4096 tokens. Two warm-up steps, then
``--steps`` timed steps; tokens/s = the median over steps of completion tokens trained
/ step wall time (all ranks together). Each rank fixes glibc's malloc thresholds first, as a
stage process does (``pipeline.malloc``). On a 2-core machine W=2 shares the same cores, so
it shows the sharding and collective overhead rather than a speed-up. Last line:

    bench learner: tokens_per_s_w1=N tokens_per_s_w2=M
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from stages.testing import make_train_group, run_world

WARMUP_STEPS = 2
"""Untimed steps first: allocator warm-up and first-call overheads are not throughput."""
MICRO_BATCH_TOKENS = 4096
"""The stack default budget: the packing a real run uses."""


def _batch(step: int, groups: int):
    return [make_train_group(f"b{step}g{i}", n_samples=16, length=16 + (7 * i + step) % 33, seed=step * 97 + i)
            for i in range(groups)]


def _bench(steps: int, groups: int) -> float:
    import torch
    import torch.distributed as dist

    from pipeline.malloc import tune_allocator
    from stages.learner.config import LearnerConfig
    from stages.learner.trainer import Learner

    tune_allocator()  # as every stage process does (pipeline/stage.py)
    torch.set_num_threads(max(1, torch.get_num_threads() // dist.get_world_size()))
    cfg = LearnerConfig(model="tiny", lr=1e-3, micro_batch_tokens=MICRO_BATCH_TOKENS, groups_per_step=groups,
                        max_staleness=10, run_dir=tempfile.mkdtemp())
    learner = Learner(cfg)
    for s in range(WARMUP_STEPS):
        learner.train_step(_batch(s, groups))
    batches = [_batch(100 + s, groups) for s in range(steps)]
    rates = []
    for b in batches:
        dist.barrier()
        t0 = time.perf_counter()
        tokens = learner.train_step(b).metrics["tokens"]
        dist.barrier()
        rates.append(tokens / (time.perf_counter() - t0))
    # Median of per-step rates: the 2 cores are shared, and a step that lost its core to
    # another process says nothing about the learner.
    return float(statistics.median(rates))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (< 60 s)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--groups", type=int, default=16)
    args = ap.parse_args()
    steps = args.steps or (4 if args.quick else 20)
    w1 = run_world(_bench, 1, steps, args.groups)[0]
    print(f"W=1: {w1:.0f} trained tokens/s", flush=True)
    w2 = run_world(_bench, 2, steps, args.groups)[0]
    print(f"W=2: {w2:.0f} trained tokens/s", flush=True)
    print(f"bench learner: tokens_per_s_w1={w1:.0f} tokens_per_s_w2={w2:.0f}")


if __name__ == "__main__":
    main()

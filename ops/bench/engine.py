"""Engine benchmark: the torch engine's continuous batching against HF ``model.generate``.

    python ops/bench/engine.py [--quick] [--repeats N] [--threads N]

Same model (the default ``tiny``, seed 0), same 64 prompts, same sampling (temperature 1,
top-p 1, no top-k), same per-request budgets, same torch thread count, same process.
Output lengths vary: request ``i`` may generate up to ``16 + (i * 7) % 113`` tokens
(16..128) and stops at EOS. The engine retires a sequence as soon as it finishes, so its
batch shrinks; HF ``generate`` takes one ``max_new_tokens`` per call, so it gets the largest
budget and runs the padded batch until every row is done or the budget is spent.

Counting (the same for both): for each request, the generated tokens a caller gets back,
up to and including EOS and never past that request's own budget. HF tokens generated past
a row's budget or EOS are not counted. Throughput = counted tokens / wall time of the whole
call (prefill included); the two methods alternate ``--repeats`` times and each reports its
best run (the machine may be shared). Last line:

    bench engine: tokens_per_s=N hf_generate_tokens_per_s=M ratio=R
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
import torch

from stages.model import EOS_ID, PAD_ID, build_model
from stages.rollout.engines.base import SamplingParams
from stages.rollout.engines.torch_engine import TorchEngine

N_PROMPTS = 64
PROMPT_LEN = 7
DEFAULT_THREADS = 1
"""The tiny model's ops are overhead-bound; one thread avoids OpenMP barrier costs and is
what the supervisor gives each stage. ``--threads`` changes it for both methods."""


def budgets() -> list[int]:
    return [16 + (i * 7) % 113 for i in range(N_PROMPTS)]


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[1, *rng.integers(4, 40, PROMPT_LEN - 1).tolist()] for _ in range(N_PROMPTS)]


def counted(row: list[int], budget: int) -> int:
    row = row[:budget]
    return row.index(EOS_ID) + 1 if EOS_ID in row else len(row)


async def run_engine(model, seed: int) -> tuple[int, float]:
    engine = TorchEngine(model, max_batch=N_PROMPTS, sampling_seed=seed)
    t0 = time.perf_counter()
    outs = await asyncio.gather(*[
        engine.generate(f"r{i}", np.array(p), SamplingParams(max_tokens=b, stop_ids=[EOS_ID]))
        for i, (p, b) in enumerate(zip(prompts(), budgets()))])
    dt = time.perf_counter() - t0
    await engine.stop()
    return sum(counted(o[0].token_ids, b) for o, b in zip(outs, budgets())), dt


def run_hf(model, seed: int) -> tuple[int, float]:
    ps, bs = prompts(), budgets()
    ids = torch.tensor(ps)  # equal lengths: no padding needed
    mask = torch.ones_like(ids)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, max_new_tokens=max(bs), eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    dt = time.perf_counter() - t0
    return sum(counted(row, b) for row, b in zip(out[:, ids.shape[1]:].tolist(), bs)), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 alternating repeats (< 60 s)")
    ap.add_argument("--repeats", type=int, default=None, help="alternating repeats (default 5, quick 2)")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    args = ap.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    model = build_model("tiny", seed=0)
    asyncio.run(run_engine(model, 0))  # warm-up: allocations, lazy imports
    run_hf(model, 0)
    ours, hf = [], []
    for r in range(repeats):
        ours.append(asyncio.run(run_engine(model, r)))
        hf.append(run_hf(model, r))
        print(f"repeat {r}: engine {ours[-1][0]} tokens in {ours[-1][1]:.3f} s | "
              f"HF generate {hf[-1][0]} tokens in {hf[-1][1]:.3f} s")
    a = max(n / dt for n, dt in ours)
    b = max(n / dt for n, dt in hf)
    print(f"bench engine: tokens_per_s={a:.0f} hf_generate_tokens_per_s={b:.0f} ratio={a / b:.2f}")


if __name__ == "__main__":
    main()

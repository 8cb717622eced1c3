"""Engine benchmark: the torch engine's continuous batching against HF ``model.generate``.

    python ops/bench/engine.py [--quick]

Same model (the default ``tiny``), same 64 prompts, same sampling (temperature 1, no top-p),
same per-request budgets. Output lengths vary: request i may generate up to
``16 + (i * 7) % 113`` tokens (16..128) and stops at EOS. Our engine retires a sequence as
soon as it finishes and admits nothing else here, so the batch shrinks; HF ``generate``
runs the padded batch until its longest member is done (``max_new_tokens`` is one value per
call, so it gets the largest budget and we count, for each row, only the tokens up to that
row's own budget or EOS — the tokens each method actually returns to a caller).
Throughput = counted generated tokens / wall time, best of ``--repeats``. Last line:

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


def budgets() -> list[int]:
    return [16 + (i * 7) % 113 for i in range(N_PROMPTS)]


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[1, *rng.integers(4, 40, 6).tolist()] for _ in range(N_PROMPTS)]


async def ours(model) -> float:
    engine = TorchEngine(model, max_batch=N_PROMPTS, sampling_seed=0)
    t0 = time.perf_counter()
    outs = await asyncio.gather(*[
        engine.generate(f"r{i}", np.array(p), SamplingParams(max_tokens=b, stop_ids=[EOS_ID], n=1))
        for i, (p, b) in enumerate(zip(prompts(), budgets()))])
    dt = time.perf_counter() - t0
    await engine.stop()
    return sum(len(o[0].token_ids) for o in outs) / dt


def hf(model) -> float:
    ps, bs = prompts(), budgets()
    width = max(map(len, ps))
    ids = torch.full((len(ps), width), PAD_ID)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(ps):  # left padding, as generate() expects for decoder-only models
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, max_new_tokens=max(bs), eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    dt = time.perf_counter() - t0
    counted = 0
    for row, b in zip(out[:, width:].tolist(), bs):
        row = row[:b]
        counted += row.index(EOS_ID) + 1 if EOS_ID in row else len(row)
    return counted / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat (< 60 s)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model("tiny", seed=0)
    asyncio.run(ours(model))  # warm-up (allocations, kernels)
    hf(model)
    a = max(asyncio.run(ours(model)) for _ in range(repeats))
    b = max(hf(model) for _ in range(repeats))
    print(f"torch engine (continuous batching): {a:.0f} tok/s | HF generate (one padded batch): {b:.0f} tok/s")
    print(f"bench engine: tokens_per_s={a:.0f} hf_generate_tokens_per_s={b:.0f} ratio={a / b:.2f}")


if __name__ == "__main__":
    main()

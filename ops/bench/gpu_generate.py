"""Generation throughput of the rollout path (``VllmEngine``) against vLLM's offline ``generate``.

    python ops/bench/gpu_generate.py [--model qwen3-0.6b] [--prompts 64] [--n 8] [--prompt-len 64]
                                     [--max-tokens 256] [--passes 2]

Needs CUDA and vLLM. Both sides run the same model (built-in shape, ``load_format="dummy"``
random weights), the same engine arguments (``VllmEngine``'s: bf16, CUDA graphs, prefix
caching off, ``processed_logprobs``, ``max_num_seqs`` 256, 0.5 of the GPU), the same prompts
(random token ids) and the same sampling (temperature 1, ``n`` samples per prompt, the
sampled token's logprob, ``ignore_eos`` so every completion is ``--max-tokens`` long),
each in a fresh child process:
- ``engine``: what the rollout stage does: one ``VllmEngine.generate(request_id, prompt, n)``
  task per prompt group, all concurrent (``asyncio.gather``), outputs streamed back as deltas
  and collected into ``Completion``s (tokens, logprobs, version spans);
- ``offline``: ``vllm.LLM.generate`` of the same prompts with the same ``SamplingParams``.
Each side: one small warm-up generate, then ``--passes`` timed passes; tokens/s = completion
tokens / wall time of a pass (the best pass counts: start-up and compile caches are
excluded the same way on both sides). Target (issue 8): engine / offline ≥ 0.9. Last line:

    bench gpu_generate: engine_tok_s=E offline_tok_s=O ratio=R sequences=S tokens=T
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, size=(n, length)).tolist()


def engine_kwargs() -> dict:
    return dict(max_model_len=2048, max_num_seqs=256, gpu_memory_utilization=0.5, enforce_eager=False)


async def run_engine(a) -> dict:
    from stages.rollout.engines.base import SamplingParams
    from stages.rollout.engines.vllm_engine import VllmEngine

    eng = VllmEngine(a.model, init="dummy", seed=0, **engine_kwargs())
    t0 = time.perf_counter()
    await eng.start()
    start_s = time.perf_counter() - t0
    rows = prompts(a.prompts, a.prompt_len, eng.vocab)
    params = SamplingParams(temperature=1.0, max_tokens=a.max_tokens, n=a.n, stop_ids=[])
    await asyncio.gather(*(eng.generate(f"w{i}", r, SamplingParams(max_tokens=8, n=2)) for i, r in enumerate(rows[:8])))
    passes = []
    for p in range(a.passes):
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(eng.generate(f"p{p}-{i}", r, params) for i, r in enumerate(rows)))
        dt = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for o in outs for c in o)
        assert all(len(c.logprobs) == len(c.token_ids) == a.max_tokens for o in outs for c in o)
        passes.append({"tokens": tokens, "seconds": dt, "tok_s": tokens / dt})
    await eng.stop()
    return {"side": "engine", "start_s": start_s, "passes": passes}


def run_offline(a) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from stages.model import model_config
    from stages.rollout.engines.vllm_engine import VllmEngine, write_model_dir

    ref = VllmEngine(a.model, init="dummy", seed=0, **engine_kwargs())  # only for its engine arguments
    args = {k: v for k, v in ref.engine_args.items() if k != "worker_extension_cls"}
    t0 = time.perf_counter()
    llm = LLM(model=write_model_dir(a.model, "bfloat16"), load_format="dummy", **args)
    start_s = time.perf_counter() - t0
    rows = prompts(a.prompts, a.prompt_len, int(model_config(a.model).vocab_size))
    sp = SamplingParams(n=a.n, temperature=1.0, max_tokens=a.max_tokens, ignore_eos=True, logprobs=0,
                        detokenize=False, skip_special_tokens=False)
    llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows[:8]],
                 SamplingParams(n=2, max_tokens=8, detokenize=False), use_tqdm=False)
    passes = []
    for _ in range(a.passes):
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        passes.append({"tokens": tokens, "seconds": dt, "tok_s": tokens / dt})
    return {"side": "offline", "start_s": start_s, "passes": passes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--side", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        res = asyncio.run(run_engine(a)) if a.side == "engine" else run_offline(a)
        print("RESULT " + json.dumps(res), flush=True)
        os._exit(0)
    env = dict(os.environ)
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    got = {}
    for side in ("offline", "engine"):
        cmd = [sys.executable, __file__, "--side", side] + sys.argv[1:]
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(p.stdout[-6000:])
            print(f"bench gpu_generate: {side} FAILED rc={p.returncode}")
            sys.exit(1)
        got[side] = json.loads(line[7:])
        best = max(x["tok_s"] for x in got[side]["passes"])
        print(f"{side}: start {got[side]['start_s']:.1f} s, passes " +
              ", ".join(f"{x['tok_s']:.0f} tok/s ({x['seconds']:.2f} s)" for x in got[side]["passes"]) +
              f"; best {best:.0f} tok/s", flush=True)
    e = max(x["tok_s"] for x in got["engine"]["passes"])
    o = max(x["tok_s"] for x in got["offline"]["passes"])
    print(f"bench gpu_generate: engine_tok_s={e:.0f} offline_tok_s={o:.0f} ratio={e / o:.3f} "
          f"sequences={a.prompts * a.n} tokens={got['engine']['passes'][0]['tokens']} model={a.model}")


if __name__ == "__main__":
    main()

"""Learner throughput and MFU on one GPU: Qwen3-0.6B and Qwen3-1.7B shapes, world size 1.

    python ops/bench/gpu_learner.py [--models qwen3-0.6b,qwen3-1.7b] [--steps 5] [--groups 8]
                                    [--prompt-len 64] [--completion-len 448]
                                    [--micro-batch-tokens 8192] [--profile] [--peak-tflops 989]

Needs CUDA. Each model runs in a fresh child process that is rank 0 of a one-rank NCCL group
and builds ``stages.learner.trainer.Learner`` exactly as the learner stage does (FSDP2,
fp32 master weights, bf16 compute with fp32 reduction via ``MixedPrecisionPolicy``, AdamW,
GRPO loss); batches are synthetic ``TrainGroup``s of 16 samples, ``--prompt-len`` prompt
tokens and ``--completion-len`` completion tokens (random ids, random rewards). Two warm-up
steps, then ``--steps`` timed steps (``cuda.synchronize`` at both ends); step time = median.

FLOPs per step (the usual model-FLOPs convention, nothing counted for recompute, norms,
softmax or the loss): 6 × N × T + 6 × L × H × d_head × Σ s²  where N = matmul parameters
(every decoder Linear + the LM head, V × d; the embedding lookup is free), T = real tokens
(prompt + completion; padding not counted) and the second term is causal attention
(QKᵀ and PV, forward 2 × s² × d_head per head and layer, backward twice that) over each
sequence of length s. MFU = FLOPs / step time / peak, peak = H100 SXM bf16 dense
989 TFLOP/s (``--peak-tflops``; about 800 is what a large bf16 matmul reaches there).
``--profile`` prints the top CUDA kernels of one step (torch.profiler). Last line:

    bench gpu_learner: <model> tokens_per_s=X mfu=M step_s=S ... (per model)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
WARMUP_STEPS = 2


def model_flops(cfg, lengths: list[int]) -> tuple[float, int]:
    """(FLOPs of one training step over sequences of ``lengths``, matmul parameter count)."""
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // H
    inter = cfg.intermediate_size
    per_layer = d * H * hd + 2 * d * KV * hd + H * hd * d + 3 * d * inter
    n = L * per_layer + V * d
    tokens = sum(lengths)
    attn = 6 * L * H * hd * sum(s * s for s in lengths)
    return 6.0 * n * tokens + attn, n


def batch(step: int, groups: int, prompt_len: int, completion_len: int):
    import numpy as np

    from schemas.messages import Rollout, Sample, ScoredGroup, TrainGroup
    from stages.testing import make_prompt_group

    out = []
    for g in range(groups):
        rng = np.random.default_rng(step * 1000 + g)
        pg = make_prompt_group(f"s{step}g{g}", prompt_len, 16, seed=step * 1000 + g)
        samples = [Sample(token_ids=rng.integers(3, 95, completion_len, dtype=np.int32),
                          logprobs=-rng.random(completion_len, dtype=np.float32) - 5.0,
                          version_spans=np.array([[0, 0]], dtype=np.int32), finish_reason="length")
                   for _ in range(16)]
        out.append(TrainGroup(ScoredGroup(Rollout(pg, samples, "bench/0"), rng.random(16, dtype=np.float32)), None))
    return out


def child(a) -> dict:
    import torch
    import torch.distributed as dist

    from stages.learner.config import LearnerConfig
    from stages.learner.trainer import Learner
    from stages.model import model_config
    from stages.testing import free_port

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    torch.cuda.set_device(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = LearnerConfig(model=a.child, device="cuda", lr=1e-5, micro_batch_tokens=a.micro_batch_tokens,
                        groups_per_step=a.groups, max_staleness=100, run_dir=tempfile.mkdtemp(),
                        activation_checkpointing=a.activation_checkpointing)
    learner = Learner(cfg)
    lengths = [a.prompt_len + a.completion_len] * (16 * a.groups)
    flops, n_params = model_flops(model_config(a.child), lengths)
    for s in range(WARMUP_STEPS):
        learner.train_step(batch(s, a.groups, a.prompt_len, a.completion_len))
    batches = [batch(100 + s, a.groups, a.prompt_len, a.completion_len) for s in range(a.steps)]
    times = []
    for b in batches:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = learner.train_step(b)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        assert not r.skipped, "a benchmark step was skipped (non-finite gradient norm)"
    step_s = statistics.median(times)
    res = {"model": a.child, "matmul_params": n_params, "tokens_per_step": sum(lengths),
           "completion_tokens_per_step": a.completion_len * 16 * a.groups, "step_s": step_s,
           "step_times": times, "tflop_per_step": flops / 1e12, "tokens_per_s": sum(lengths) / step_s,
           "tflops": flops / step_s / 1e12, "mfu": flops / step_s / (a.peak_tflops * 1e12),
           "micro_batch_tokens": a.micro_batch_tokens, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        b = batch(999, a.groups, a.prompt_len, a.completion_len)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            learner.train_step(b)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
    dist.destroy_process_group()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-0.6b,qwen3-1.7b")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=448)
    ap.add_argument("--micro-batch-tokens", type=int, default=8192)
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one more step")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return
    results = []
    for model in a.models.split(","):
        argv = [x for x in sys.argv[1:]]
        p = subprocess.run([sys.executable, __file__, "--child", model] + argv, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if a.profile or line is None:
            print("\n".join(x for x in p.stdout.splitlines() if not x.startswith("RESULT "))[-8000:])
        if line is None:
            print(f"bench gpu_learner: {model} FAILED rc={p.returncode}")
            sys.exit(1)
        r = json.loads(line[7:])
        results.append(r)
        print(f"{model}: {r['tokens_per_step']} tokens/step ({r['completion_tokens_per_step']} trained), step "
              f"{r['step_s']:.3f} s (median of {len(r['step_times'])}), {r['tokens_per_s']:.0f} tokens/s, "
              f"{r['tflops']:.0f} TFLOP/s, MFU {r['mfu']:.1%} of {a.peak_tflops:.0f}, peak memory "
              f"{r['peak_mem_gb']:.1f} GB, micro-batch {r['micro_batch_tokens']} tokens", flush=True)
    print("bench gpu_learner: " + " ".join(
        f"{r['model']} tokens_per_s={r['tokens_per_s']:.0f} mfu={r['mfu']:.3f} tflops={r['tflops']:.0f} "
        f"step_s={r['step_s']:.3f};" for r in results))


if __name__ == "__main__":
    main()

"""Learner throughput and MFU on one GPU: Qwen3-0.6B and Qwen3-1.7B shapes, world size 1.

    python ops/bench/gpu_learner.py [--models qwen3-0.6b,qwen3-1.7b] [--steps 5] [--groups 8]
                                    [--prompt-len 64] [--completion-len 448]
                                    [--variants 8192,16384,32768,bestc] [--profile] [--peak-tflops 989]

Needs CUDA. Each model runs in a fresh child process that is rank 0 of a one-rank NCCL group
and builds ``stages.learner.trainer.Learner`` exactly as the learner stage does (FSDP2,
fp32 master weights, bf16 compute with fp32 reduction via ``MixedPrecisionPolicy``, AdamW,
GRPO loss, the fused chunked head of ``stages.learner.head``); batches are synthetic
``TrainGroup``s of 16 samples, ``--prompt-len`` prompt tokens and ``--completion-len``
completion tokens (random ids, random rewards). Each variant (``--variants``: a micro-batch
token budget, ``c`` = ``compile_layers``) gets two warm-up steps (compiles happen there),
then ``--steps`` timed steps (``cuda.synchronize`` at both ends); step time = median. A
variant that runs out of memory is reported as such and the next one runs.

FLOPs per step (the usual model-FLOPs convention, nothing counted for recompute, norms,
softmax or the loss): 6 × N_dec × T + 6 × V × d × T_c + 6 × L × H × d_head × Σ s², where
N_dec = matmul parameters of the decoder layers, T = real tokens (prompt + completion;
padding not counted), V × d the LM head, which only has to run where a token is trained
(T_c = completion tokens; the head never runs on prompt positions), and the last term is causal
attention (QKᵀ and PV, forward 2 × s² × d_head per head and layer, backward twice that)
over each sequence of length s. These are the FLOPs of a row per completion: where a group's
completions train behind one copy of their prompt (``--shared-row-tokens``, on by default for
rows up to 512 tokens: short completions), the prompt's share is not computed 16 times, and
tokens/s, TFLOP/s and MFU are effective figures (the plain layout's work per second).
MFU = FLOPs / step time / peak, peak = H100 SXM bf16 dense 989 TFLOP/s (``--peak-tflops``;
about 800 is what a large bf16 matmul reaches there).
``--profile`` prints the top CUDA kernels of one more step of the last variant
(torch.profiler) and how busy the GPU was: kernel time summed over the step's wall time
(well under 1: the GPU waits on Python, kernel launches or host syncs). Last line, the best variant of each model:

    bench gpu_learner: <model> tokens_per_s=X mfu=M tflops=F step_s=S variant=V; ...
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


def model_flops(cfg, lengths: list[int], head_tokens: int) -> tuple[float, int]:
    """(FLOPs of one training step over sequences of ``lengths`` with the head evaluated on
    ``head_tokens`` positions, matmul parameter count)."""
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // H
    inter = cfg.intermediate_size
    per_layer = d * H * hd + 2 * d * KV * hd + H * hd * d + 3 * d * inter
    tokens = sum(lengths)
    attn = 6 * L * H * hd * sum(s * s for s in lengths)
    return 6.0 * L * per_layer * tokens + 6.0 * V * d * head_tokens + attn, L * per_layer + V * d


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


def run_variant(learner, a, budget: int, flops: float, tokens: int) -> dict:
    import msgspec
    import torch

    cuda = a.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    learner.cfg = msgspec.structs.replace(learner.cfg, micro_batch_tokens=budget)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for s in range(WARMUP_STEPS):
        learner.train_step(batch(s, a.groups, a.prompt_len, a.completion_len))
    batches = [batch(100 + s, a.groups, a.prompt_len, a.completion_len) for s in range(a.steps)]
    times = []
    for b in batches:
        sync()
        t0 = time.perf_counter()
        r = learner.train_step(b)
        sync()
        times.append(time.perf_counter() - t0)
        assert not r.skipped, "a benchmark step was skipped (non-finite gradient norm)"
    step_s = statistics.median(times)
    return {"step_s": step_s, "step_times": times, "tokens_per_s": tokens / step_s, "tflops": flops / step_s / 1e12,
            "mfu": flops / step_s / (a.peak_tflops * 1e12),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0}


def child(a) -> dict:
    import gc

    import torch
    import torch.distributed as dist

    from stages.learner.config import LearnerConfig
    from stages.learner.trainer import Learner
    from stages.model import model_config
    from pipeline.endpoints import free_port

    cuda = a.device == "cuda"
    if cuda:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = True
    else:  # a smoke run of the bench itself (tiny model on CPU), not a figure
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    free = (lambda: (gc.collect(), torch.cuda.empty_cache())) if cuda else gc.collect
    lengths = [a.prompt_len + a.completion_len] * (16 * a.groups)
    head_tokens = a.completion_len * 16 * a.groups
    flops, n_params = model_flops(model_config(a.child), lengths, head_tokens)
    res = {"model": a.child, "matmul_params": n_params, "tokens_per_step": sum(lengths),
           "completion_tokens_per_step": head_tokens, "tflop_per_step": flops / 1e12, "variants": {}}
    learner, compiled = None, None
    for v in a.variants.split(","):
        want_compile = v.endswith("c")
        if v == "bestc":  # compiled, at the eager budget with the best MFU so far
            ran = {k: x for k, x in res["variants"].items() if "mfu" in x and not k.endswith("c")}
            if not ran:
                continue
            budget = int(max(ran, key=lambda k: ran[k]["mfu"]))
            v = f"{budget}c"
        else:
            budget = int(v.rstrip("c"))
        if learner is None or compiled != want_compile:
            learner = None
            free()
            cfg = LearnerConfig(model=a.child, device=a.device, lr=1e-5, micro_batch_tokens=budget,
                                groups_per_step=a.groups, max_staleness=100, run_dir=tempfile.mkdtemp(),
                                activation_checkpointing=a.activation_checkpointing, compile_layers=want_compile,
                                **({} if a.shared_row_tokens is None else {"shared_row_tokens": a.shared_row_tokens}))
            t0 = time.perf_counter()
            learner, compiled = Learner(cfg), want_compile
            print(f"{a.child}: built learner (compile_layers={want_compile}) in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        try:
            r = run_variant(learner, a, budget, flops, sum(lengths))
        except Exception as e:  # noqa: BLE001 -- out of memory, or a compile failure: report, go on
            # A step that died half-way may leave FSDP state half-done: the next variant rebuilds.
            r = {"oom" if isinstance(e, torch.OutOfMemoryError) else "error": f"{type(e).__name__}: "
                 + (str(e).splitlines() or [""])[0][:300]}
            learner = None
            free()
        res["variants"][v] = r
        print(f"{a.child} variant {v}: " + json.dumps({k: x for k, x in r.items() if k != "step_times"}), flush=True)
    if a.profile and learner is not None:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        b = batch(999, a.groups, a.prompt_len, a.completion_len)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            learner.train_step(b)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        rows = prof.key_averages()
        print(rows.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=25,
                         max_name_column_width=70))
        # Kernel rows only (as the table's "Self CUDA time total"): an op's row repeats its kernels' time.
        busy = sum(e.self_device_time_total for e in rows
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e6
        res["profile"] = {"wall_s": wall, "kernel_s": busy, "gpu_busy": busy / wall}
        print(f"profiled step: {wall:.3f} s wall (under the profiler), GPU kernels {busy:.3f} s: busy {busy / wall:.0%}")
    dist.destroy_process_group()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-0.6b,qwen3-1.7b")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=448)
    ap.add_argument("--variants", default="8192,16384,32768,bestc",
                    help="micro-batch token budgets to time, comma-separated; suffix c: compile_layers; "
                         "bestc: compiled at the best eager budget")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke-test the bench
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one more step")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--shared-row-tokens", type=int, default=None,
                    help="learner.shared_row_tokens: longest row of completions behind one prompt copy "
                         "(default: the config's); 0: a row per completion")
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
        print("\n".join(x for x in p.stdout.splitlines() if not x.startswith("RESULT "))[-8000:])
        if line is None:
            print(f"figures gpu_learner {model}: FAILED rc={p.returncode}")
            continue
        r = json.loads(line[7:])
        ran = {v: x for v, x in r["variants"].items() if "mfu" in x}
        for v, x in r["variants"].items():
            if "mfu" not in x:
                print(f"figures gpu_learner {model} [{v}]: {x.get('oom') or x.get('error')}")
                continue
            print(f"figures gpu_learner {model} [{v}]: {r['tokens_per_step']} tokens/step ({r['completion_tokens_per_step']} trained), "
                  f"step {x['step_s']:.3f} s (median of {len(x['step_times'])}), {x['tokens_per_s']:.0f} tokens/s, "
                  f"{x['tflops']:.0f} TFLOP/s, MFU {x['mfu']:.1%} of {a.peak_tflops:.0f}, peak memory "
                  f"{x['peak_mem_gb']:.1f} GB", flush=True)
        if not ran:
            print(f"figures gpu_learner {model}: no variant finished")
            continue
        best = max(ran, key=lambda v: ran[v]["mfu"])
        results.append(dict(ran[best], model=model, variant=best))
    if not results:
        print("bench gpu_learner: FAILED (no model finished a variant)")
        sys.exit(1)
    print("bench gpu_learner: " + " ".join(
        f"{r['model']} tokens_per_s={r['tokens_per_s']:.0f} mfu={r['mfu']:.3f} tflops={r['tflops']:.0f} "
        f"step_s={r['step_s']:.3f} variant={r['variant']};" for r in results))


if __name__ == "__main__":
    main()

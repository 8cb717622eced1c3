"""Weight update into vLLM over ``cuda_ipc`` against a device-to-device copy of the same bytes.

    python ops/bench/gpu_weights.py [--models qwen3-0.6b,qwen3-1.7b] [--reps 10]
    python ops/bench/gpu_weights.py --start-only [--flashinfer-sampler]   # engine start time alone

Needs CUDA and vLLM (the GPU machine: ops/gpu/run.sh). Each model runs in a fresh child
process (all GPU memory returns between models). In it, this process is the trainer: it holds
the model's weights (``build_model``, random init, bf16) and the publisher's persistent
bucket buffers (``CudaBuckets``, 256 MiB buckets); vLLM's worker is another process (the
engine core AsyncLLM spawns), so every update crosses processes through CUDA IPC handles sent
as plain fields, exactly the ``cuda_ipc`` path of the pipeline.

Timed, each the median of ``--reps`` updates after one warm-up (which opens the mappings):
- ``update``: ``start_weight_update`` (manifest check, pause keep) → ``update_weights_ipc``
  (copy plan, one batched copy) → ``finish_weight_update`` (version live, resume): what a
  live engine spends on an update. With ``g1`` digests (the default: the sender's digests are
  checked on the received bytes before anything is copied, and the loaded parameters are
  digested again for the acknowledgement) and without (``--digests`` off: copy and RPCs only).
- ``fill``: the trainer copying its state into the buckets (+ its digests), before the update.
- ``vllm_loader``: the same bytes through vLLM's own loader (``model.load_weights`` with
  layerwise reload), the path our copy plan replaces.
- ``floor``: one device-to-device copy of ``total_bytes`` (CUDA events), same process, same GPU.
Target (issue 8): update ≤ 2 × floor + 50 ms. Last line:

    bench gpu_weights: <model> update_ms=U update_nodigest_ms=N floor_ms=F target_ms=T ok=B ... (per model)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def d2d_floor_ms(nbytes: int, reps: int = 20) -> float:
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    del a, b
    torch.cuda.empty_cache()
    return statistics.median(times)


async def one_model(model: str, reps: int, start_only: bool) -> dict:
    import torch

    from stages.model import build_model
    from stages.rollout.engines.vllm_engine import CudaBuckets, VllmEngine

    eng = VllmEngine(model, init="dummy", enforce_eager=True, max_model_len=1024, max_num_seqs=64,
                     gpu_memory_utilization=0.4)
    t0 = time.perf_counter()
    await eng.start()
    res = {"model": model, "start_s": round(time.perf_counter() - t0, 2),
           "flashinfer_sampler": os.environ.get("VLLM_USE_FLASHINFER_SAMPLER")}
    if start_only:
        await eng.stop()
        return res
    state = {n: p.detach() for n, p in build_model(model, dtype=torch.bfloat16, device="cuda", seed=0)
             .named_parameters()}
    buckets = CudaBuckets(state)
    total = sum(b.nbytes for b in buckets.layout.buckets)
    res.update(bytes=total, buckets=len(buckets.layout.buckets), tensors=len(buckets.layout.entries))
    res["floor_ms"] = d2d_floor_ms(total)
    version = 0

    async def update(digests: bool, via_vllm_loader: bool = False) -> tuple[float, float, float]:
        nonlocal version
        version += 1
        eng.digests = digests
        t0 = time.perf_counter()
        manifest = buckets.fill(state, version, digests=digests)
        t1 = time.perf_counter()
        await eng.start_weight_update(version, manifest)
        got = await eng.update_weights_ipc(buckets.handles(), manifest, via_vllm_loader=via_vllm_loader)
        await eng.finish_weight_update(version)
        t2 = time.perf_counter()
        if digests:
            assert got == [b.digest for b in manifest.buckets], "engine digests differ from the sender's"
        return (t2 - t1) * 1e3, (t1 - t0) * 1e3, await eng.last_load_seconds() * 1e3

    for digests, key in ((True, "update"), (False, "update_nodigest")):
        await update(digests)  # warm-up: maps the buckets, builds the copy plan
        runs = [await update(digests) for _ in range(reps)]
        res[f"{key}_ms"] = statistics.median(r[0] for r in runs)
        res[f"{key}_min_ms"] = min(r[0] for r in runs)
        res[f"{key}_fill_ms"] = statistics.median(r[1] for r in runs)
        res[f"{key}_worker_ms"] = statistics.median(r[2] for r in runs)
    runs = [await update(False, via_vllm_loader=True) for _ in range(3)]
    res["vllm_loader_ms"] = statistics.median(r[0] for r in runs)
    # The engine holds exactly the sender's weights after the last (digest-checked) update.
    manifest = buckets.fill(state, version + 1)
    await eng.start_weight_update(version + 1, manifest)
    await eng.update_weights_ipc(buckets.handles(), manifest)
    await eng.finish_weight_update(version + 1)
    res["param_digests_match"] = await eng.param_digests(manifest) == [b.digest for b in manifest.buckets]
    res["target_ms"] = 2 * res["floor_ms"] + 50
    res["ok"] = res["update_ms"] <= res["target_ms"]
    await eng.stop()
    return res


def child(model: str, reps: int, start_only: bool) -> None:
    res = asyncio.run(one_model(model, reps, start_only))
    print("RESULT " + json.dumps(res), flush=True)
    os._exit(0)  # vLLM's background threads must not hold the exit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-0.6b,qwen3-1.7b")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--start-only", action="store_true", help="only time the engine start")
    ap.add_argument("--flashinfer-sampler", action="store_true",
                    help="start with VLLM_USE_FLASHINFER_SAMPLER=1 (the ~100 s JIT at every fresh start)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.reps, args.start_only)
        return
    env = dict(os.environ, VLLM_USE_FLASHINFER_SAMPLER="1" if args.flashinfer_sampler else "0")
    results = []
    for model in args.models.split(",") if not args.start_only else args.models.split(",")[:1]:
        cmd = [sys.executable, __file__, "--child", model, "--reps", str(args.reps)]
        if args.start_only:
            cmd.append("--start-only")
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(p.stdout[-6000:])
            print(f"bench gpu_weights: {model} FAILED rc={p.returncode}")
            sys.exit(1)
        r = json.loads(line[7:])
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.start_only:
        r = results[0]
        print(f"bench gpu_weights_start: {r['model']} start_s={r['start_s']} "
              f"VLLM_USE_FLASHINFER_SAMPLER={r['flashinfer_sampler']}")
        return
    for r in results:
        print(f"{r['model']}: {r['bytes'] / 1e9:.2f} GB in {r['buckets']} buckets ({r['tensors']} tensors); "
              f"update {r['update_ms']:.1f} ms (worker {r['update_worker_ms']:.1f}) with digests, "
              f"{r['update_nodigest_ms']:.1f} ms (worker {r['update_nodigest_worker_ms']:.1f}) without; "
              f"fill {r['update_fill_ms']:.1f} ms; vLLM's loader {r['vllm_loader_ms']:.1f} ms; "
              f"D2D floor {r['floor_ms']:.2f} ms; target {r['target_ms']:.1f} ms; start {r['start_s']} s")
    print("bench gpu_weights: " + " ".join(
        f"{r['model']} update_ms={r['update_ms']:.1f} update_nodigest_ms={r['update_nodigest_ms']:.1f} "
        f"vllm_loader_ms={r['vllm_loader_ms']:.1f} floor_ms={r['floor_ms']:.2f} target_ms={r['target_ms']:.1f} "
        f"ok={r['ok']} digests_match={r['param_digests_match']};" for r in results))


if __name__ == "__main__":
    main()

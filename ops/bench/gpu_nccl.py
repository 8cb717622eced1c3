"""Weight update into vLLM over ``nccl`` between two GPUs, against a raw NCCL broadcast.

    python ops/bench/gpu_nccl.py [--models qwen3-0.6b,qwen3-1.7b] [--reps 10]

Needs 2 GPUs and vLLM (kind ``nvidia-h200-x2``; NCCL_NVLS_ENABLE=0 is set, as that machine
requires). Each model runs in a fresh child process: it is the trainer on GPU 0 (the model's
bf16 weights in ``CudaBuckets``) and starts a ``VllmEngine`` whose engine core sees GPU 1
only (``CUDA_VISIBLE_DEVICES`` is narrowed just for that spawn). They join one NCCL group
(vLLM's ``StatelessProcessGroup`` + ``PyNcclCommunicator``: ``open_nccl_sender`` /
``VllmEngine.init_nccl``).

Timed (median of ``--reps`` after a warm-up), from the trainer's side:
- ``raw``: the trainer broadcasts every bucket and the vLLM worker receives them into reused
  buffers and does nothing else (``conveyor_nccl_raw``): the bytes alone, same communicator,
  same bucket sizes;
- ``update``: ``start_weight_update`` → (broadcast ∥ ``update_weights_nccl``: receive into
  staging, copy plan) → ``finish_weight_update``, with ``g1`` digests and without.
Target (issue 8): raw / update ≥ 0.8. Last line:

    bench gpu_nccl: <model> raw_ms=R update_ms=U update_nodigest_ms=N ratio=R/N ... (per model)
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


async def one_model(model: str, reps: int) -> dict:
    import torch

    torch.cuda.init()
    torch.cuda.set_device(0)
    from stages.model import build_model
    from stages.rollout.engines.vllm_engine import CudaBuckets, VllmEngine
    from stages.rollout.engines.vllm_worker import NcclRendezvous, broadcast_buckets, open_nccl_sender
    from pipeline.endpoints import free_port

    eng = VllmEngine(model, init="dummy", enforce_eager=True, max_model_len=1024, max_num_seqs=64,
                     gpu_memory_utilization=0.5)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = "1" if visible is None else visible.split(",")[1]
    try:
        await eng.start()  # the engine core is spawned now, seeing GPU 1 alone
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    state = {n: p.detach() for n, p in build_model(model, dtype=torch.bfloat16, device="cuda:0", seed=0)
             .named_parameters()}
    buckets = CudaBuckets(state)
    sizes = [b.nbytes for b in buckets.layout.buckets]
    res = {"model": model, "bytes": sum(sizes), "buckets": len(sizes),
           "engine_gpu": eng.describe["gpu_uuid"], "trainer_gpu": str(torch.cuda.get_device_properties(0).uuid)}
    assert res["engine_gpu"] != res["trainer_gpu"], "engine and trainer share a GPU"
    port = free_port()
    group = NcclRendezvous("127.0.0.1", port, 1, 2)
    comm, _ = await asyncio.gather(asyncio.to_thread(open_nccl_sender, "127.0.0.1", port, 2), eng.init_nccl(group))

    def send_rounds(n: int) -> list[float]:
        torch.cuda.set_device(0)
        out = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            broadcast_buckets(comm, buckets.buffers)
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    raw_times, _ = await asyncio.gather(asyncio.to_thread(send_rounds, reps + 2),
                                        eng.llm.collective_rpc("conveyor_nccl_raw", args=(sizes, reps + 2)))
    res["raw_ms"] = statistics.median(raw_times[2:])
    res["raw_gb_s"] = res["bytes"] / res["raw_ms"] / 1e6
    version = 0

    async def update(digests: bool) -> float:
        nonlocal version
        version += 1
        eng.digests = digests
        manifest = buckets.fill(state, version, digests=digests)
        t0 = time.perf_counter()
        await eng.start_weight_update(version, manifest)
        got, _ = await asyncio.gather(eng.update_weights_nccl(group, manifest),
                                      asyncio.to_thread(lambda: (torch.cuda.set_device(0),
                                                                 broadcast_buckets(comm, buckets.buffers))))
        await eng.finish_weight_update(version)
        dt = (time.perf_counter() - t0) * 1e3
        if digests:
            assert got == [b.digest for b in manifest.buckets], "engine digests differ from the sender's"
        return dt

    for digests, key in ((True, "update"), (False, "update_nodigest")):
        await update(digests)
        times = [await update(digests) for _ in range(reps)]
        res[f"{key}_ms"] = statistics.median(times)
        res[f"{key}_worker_ms"] = await eng.last_load_seconds() * 1e3
    res["ratio"] = res["raw_ms"] / res["update_nodigest_ms"]
    res["ratio_with_digests"] = res["raw_ms"] / res["update_ms"]
    await eng.stop()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-0.6b,qwen3-1.7b")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(asyncio.run(one_model(a.child, a.reps))), flush=True)
        os._exit(0)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    results = []
    for model in a.models.split(","):
        p = subprocess.run([sys.executable, __file__, "--child", model, "--reps", str(a.reps)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(p.stdout[-6000:])
            print(f"bench gpu_nccl: {model} FAILED rc={p.returncode}")
            sys.exit(1)
        r = json.loads(line[7:])
        results.append(r)
        print(f"{model}: {r['bytes'] / 1e9:.2f} GB in {r['buckets']} buckets; raw broadcast {r['raw_ms']:.2f} ms "
              f"({r['raw_gb_s']:.0f} GB/s); update {r['update_nodigest_ms']:.2f} ms without digests "
              f"(worker {r['update_nodigest_worker_ms']:.2f}), {r['update_ms']:.2f} ms with; ratio "
              f"{r['ratio']:.2f} ({r['ratio_with_digests']:.2f} with digests)", flush=True)
    print("bench gpu_nccl: " + " ".join(
        f"{r['model']} raw_ms={r['raw_ms']:.2f} update_ms={r['update_ms']:.2f} "
        f"update_nodigest_ms={r['update_nodigest_ms']:.2f} ratio={r['ratio']:.3f} "
        f"ratio_with_digests={r['ratio_with_digests']:.3f};" for r in results))


if __name__ == "__main__":
    main()

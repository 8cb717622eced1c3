"""Torch engine on CUDA: exact logprobs, CUDA IPC weight handles across processes, NCCL.

Skipped without CUDA (NCCL: without 2 GPUs). Run on the GPU machine with
``python -m pytest -q tests/unit/test_engine_gpu.py``.
"""

import asyncio

import numpy as np
import pytest
import torch

from stages.model import build_model
from stages.publisher.manifest import pack
from stages.rollout.engines.base import SamplingParams
from stages.rollout.engines.torch_engine import TorchEngine
from stages.testing import run_world

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BUCKET_BYTES = 128 * 1024
"""A few buckets for the tiny model, so per-bucket handles and offsets are exercised."""


def _differing(engine, expected_model) -> list[str]:
    got = dict(engine.model.named_parameters())
    return [n for n, p in expected_model.named_parameters() if not torch.equal(p.to(got[n].device), got[n])]


async def test_cuda_engine_logprobs_equal_teacher_forced_with_requests_in_flight():
    model = build_model("tiny", seed=0, device="cuda")
    engine = TorchEngine(model, max_batch=16)
    prompts = [[1, 5 + i, 6, 7][: 2 + i % 3] for i in range(8)]

    async def late(i):
        await asyncio.sleep(0.002 * i)
        return await engine.generate(f"r{i}", np.array(prompts[i]),
                                     SamplingParams(temperature=0.8, max_tokens=20 + i, n=2, seed=i))

    outs = await asyncio.gather(*[late(i) for i in range(8)])
    await engine.stop()
    for prompt, comps in zip(prompts, outs):
        for c in comps:
            with torch.inference_mode():
                full = torch.tensor([prompt + c.token_ids], device="cuda")
                lp = torch.log_softmax(model(full).logits[0].float() / 0.8, -1)
            ref = np.array([lp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(c.token_ids)])
            assert np.max(np.abs(ref - np.array(c.logprobs))) <= 1e-4


async def test_shm_payload_loads_into_a_cuda_bf16_engine():
    engine = TorchEngine("tiny", device="cuda", dtype="bfloat16", max_batch=2)
    man, payload = pack(dict(build_model("tiny", seed=13).named_parameters()), 2, BUCKET_BYTES)
    await engine.start_weight_update(2, man)
    assert await engine.update_weights_shm(payload, man) == [b.digest for b in man.buckets]
    await engine.finish_weight_update(2)
    [c] = await engine.generate("r", np.array([1, 5]), SamplingParams(max_tokens=4, seed=0))
    await engine.stop()
    assert len(c.token_ids) == 4 and c.version_spans == [(0, 2)]
    assert _differing(engine, build_model("tiny", seed=13).to(torch.bfloat16)) == []


def _ipc_sender(handles_q, done_q, seed):
    """Another process: packs a model into CUDA buckets and hands out IPC handles of them."""
    from torch.multiprocessing.reductions import reduce_tensor

    man, payload = pack(dict(build_model("tiny", seed=seed).named_parameters()), 3, BUCKET_BYTES)
    buckets = [torch.from_numpy(payload[b.offset : b.offset + b.nbytes].copy()).cuda() for b in man.buckets]
    handles_q.put((man.version, [reduce_tensor(b) for b in buckets]))
    done_q.get(timeout=120)  # keep the buckets alive until the engine has copied them


async def test_cuda_ipc_update_from_another_process():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    handles_q, done_q = ctx.Queue(), ctx.Queue()
    sender = ctx.Process(target=_ipc_sender, args=(handles_q, done_q, 21))
    sender.start()
    try:
        version, handles = handles_q.get(timeout=120)
        man, _ = pack(dict(build_model("tiny", seed=21).named_parameters()), 3, BUCKET_BYTES)
        engine = TorchEngine(build_model("tiny", seed=0, device="cuda"), max_batch=2)
        await engine.start_weight_update(version, man)
        assert await engine.update_weights_ipc(handles, man) == [b.digest for b in man.buckets]
        await engine.finish_weight_update(version)
        await engine.stop()
    finally:
        done_q.put(True)
        sender.join(30)
    assert engine.weight_version == 3 and _differing(engine, build_model("tiny", seed=21)) == []


def _nccl_world(seed):
    import torch.distributed as dist

    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    group = dist.new_group(backend="nccl")
    man, payload = pack(dict(build_model("tiny", seed=seed).named_parameters()), 5, BUCKET_BYTES)
    if rank == 0:
        for b in man.buckets:
            dist.broadcast(torch.from_numpy(payload[b.offset : b.offset + b.nbytes].copy()).cuda(), src=0, group=group)
        torch.cuda.synchronize()
        return None

    async def receive():
        engine = TorchEngine(build_model("tiny", seed=0, device="cuda:1"), device="cuda:1", max_batch=2)
        await engine.start_weight_update(5, man)
        await engine.update_weights_nccl(group, man, src=0)
        await engine.finish_weight_update(5)
        await engine.stop()
        return engine

    engine = asyncio.run(receive())
    return engine.weight_version, _differing(engine, build_model("tiny", seed=seed))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_update_from_rank_0_on_another_gpu():
    _, (version, differing) = run_world(_nccl_world, 2, 31, timeout=240)
    assert version == 5 and differing == []

"""Torch engine weight updates: shm mid-generation, refusals keep old weights, IPC, collective."""

import asyncio

import numpy as np
import pytest
import torch
from torch.multiprocessing.reductions import reduce_tensor

from pipeline.endpoints import free_port
from stages.model import build_model
from stages.publisher.manifest import DigestMismatch, ManifestMismatch, pack
from stages.rollout.engines.base import SamplingParams
from stages.rollout.engines.torch_engine import TorchEngine

SMALL_BUCKETS = 64 * 1024
"""Several buckets for the tiny model (~0.5 MB), so bucket offsets are exercised."""


@pytest.fixture(scope="module", autouse=True)
def one_compute_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_engine.py
    yield
    torch.set_num_threads(before)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_weights(engine, expected):
    got = params_of(engine.model)
    assert got.keys() == expected.keys()
    for n in got:
        assert torch.equal(got[n], expected[n]), n


async def test_two_shm_updates_mid_generation_finish_every_sequence_with_version_spans():
    engine = TorchEngine(build_model("tiny", seed=0), max_batch=64)
    reqs = [asyncio.ensure_future(engine.generate(f"g{i}", np.array([1, 5 + i]), SamplingParams(max_tokens=60, n=8)))
            for i in range(8)]
    for version, seed in ((1, 11), (2, 12)):
        target = len(engine.active[0].out.token_ids) + 10 if engine.active else 10
        while not engine.active or len(engine.active[0].out.token_ids) < target:
            await asyncio.sleep(0.002)
        man, payload = pack(dict(build_model("tiny", seed=seed).named_parameters()), version, SMALL_BUCKETS)
        await engine.start_weight_update(version, man)
        digests = await engine.update_weights_shm(memoryview(payload), man)
        assert digests == [b.digest for b in man.buckets]
        await engine.finish_weight_update(version)
    outs = await asyncio.gather(*reqs)
    await engine.stop()
    comps = [c for o in outs for c in o]
    assert len(comps) == 64 and all(c.finish_reason == "length" and len(c.token_ids) == 60 for c in comps)
    for c in comps:
        assert [v for _, v in c.version_spans] == [0, 1, 2]
        starts = [i for i, _ in c.version_spans]
        assert starts[0] == 0 and starts == sorted(set(starts)) and starts[-1] < 60
    assert engine.weight_version == 2 and not engine.paused
    assert_weights(engine, params_of(build_model("tiny", seed=12)))


async def test_tokens_after_an_update_come_from_the_new_weights():
    engine = TorchEngine(build_model("tiny", seed=0), max_batch=4)
    new = build_model("tiny", seed=3)
    man, payload = pack(dict(new.named_parameters()), 1)
    await engine.start_weight_update(1, man)
    await engine.update_weights_shm(payload, man)
    await engine.finish_weight_update(1)
    prompt = [1, 6, 7]
    [c] = await engine.generate("r", np.array(prompt), SamplingParams(max_tokens=20, seed=0))
    await engine.stop()
    with torch.inference_mode():
        lp = torch.log_softmax(new(torch.tensor([prompt + c.token_ids])).logits[0], -1)
    ref = [lp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(c.token_ids)]
    assert c.version_spans == [(0, 1)] and np.max(np.abs(np.array(ref) - c.logprobs)) <= 1e-4


async def test_fp32_payload_loads_into_a_bf16_engine():
    engine = TorchEngine("tiny", dtype="bfloat16", max_batch=2)
    man, payload = pack(dict(build_model("tiny", seed=14).named_parameters()), 1)
    await engine.start_weight_update(1, man)
    await engine.update_weights_shm(payload, man)
    await engine.finish_weight_update(1)
    [c] = await engine.generate("r", np.array([1, 5]), SamplingParams(max_tokens=4, seed=0))
    await engine.stop()
    assert len(c.token_ids) == 4 and c.version_spans == [(0, 1)]
    assert_weights(engine, params_of(build_model("tiny", seed=14).to(torch.bfloat16)))


async def test_mismatched_manifest_is_refused_with_names_and_old_weights_kept():
    engine = TorchEngine(build_model("tiny", seed=0), max_batch=4)
    before = params_of(engine.model)
    state = dict(build_model("tiny", seed=5).named_parameters())
    state["model.norm.weight"] = torch.zeros(3)
    del state["model.layers.1.mlp.up_proj.weight"]
    bad, bad_payload = pack(state, 1)
    with pytest.raises(ManifestMismatch, match="model.norm.weight: shape") as refused:
        await engine.start_weight_update(1, bad)
    assert "model.layers.1.mlp.up_proj.weight: missing" in str(refused.value)
    assert not engine.paused

    good, _ = pack(dict(build_model("tiny", seed=5).named_parameters()), 1)
    await engine.start_weight_update(1, good)  # a good start, then a bad payload manifest
    with pytest.raises(ManifestMismatch, match="model.norm.weight"):
        await engine.update_weights_shm(bad_payload, bad)
    await engine.abort_weight_update()
    [c] = await engine.generate("r", np.array([1, 5]), SamplingParams(max_tokens=4, seed=0))
    await engine.stop()
    assert engine.weight_version == 0 and c.version_spans == [(0, 0)]
    assert_weights(engine, before)


async def test_corrupt_payload_and_out_of_order_calls_are_refused():
    engine = TorchEngine(build_model("tiny", seed=0), max_batch=4)
    before = params_of(engine.model)
    man, payload = pack(dict(build_model("tiny", seed=6).named_parameters()), 1, SMALL_BUCKETS)
    with pytest.raises(RuntimeError, match="without start_weight_update"):
        await engine.update_weights_shm(payload, man)
    await engine.start_weight_update(1, man)
    corrupt = payload.copy()
    corrupt[man.buckets[2].offset + 5] ^= 0xFF
    with pytest.raises(DigestMismatch, match=r"bucket\(s\) \[2\]"):
        await engine.update_weights_shm(corrupt, man)
    with pytest.raises(ValueError, match="buffer of 10 bytes"):
        await engine.update_weights_shm(payload[:10], man)
    await engine.abort_weight_update()
    assert engine.weight_version == 0 and not engine.paused
    assert_weights(engine, before)
    await engine.stop()


async def test_ipc_update_rebuilds_the_senders_buckets():
    """CPU stand-in for CUDA IPC: ``reduce_tensor`` handles of shared-memory buckets, rebuilt
    in this process (across processes they travel through torch's reductions)."""
    engine = TorchEngine(build_model("tiny", seed=0), max_batch=4)
    new = build_model("tiny", seed=8)
    man, payload = pack(dict(new.named_parameters()), 1, SMALL_BUCKETS)
    buckets = [torch.from_numpy(payload[b.offset : b.offset + b.nbytes].copy()).share_memory_() for b in man.buckets]
    await engine.start_weight_update(1, man)
    with pytest.raises(ValueError, match="2 buckets received"):
        await engine.update_weights_ipc([reduce_tensor(b) for b in buckets[:2]], man)
    assert await engine.update_weights_ipc([reduce_tensor(b) for b in buckets], man) == [b.digest for b in man.buckets]
    await engine.finish_weight_update(1)
    await engine.stop()
    assert engine.weight_version == 1
    assert_weights(engine, params_of(new))


def _sender(port: int, seed: int) -> None:
    """Rank 0 of a gloo world: broadcasts a packed model's buckets (what learner rank 0 does)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
    man, payload = pack(dict(build_model("tiny", seed=seed).named_parameters()), 4, SMALL_BUCKETS)
    for b in man.buckets:
        dist.broadcast(torch.from_numpy(payload[b.offset : b.offset + b.nbytes].copy()), src=0)
    dist.destroy_process_group()


def _receiver(port: int, seed: int, results) -> None:
    """Rank 1: an engine that joins through ``init_weight_transfer`` and receives."""
    torch.set_num_threads(1)
    man, _ = pack(dict(build_model("tiny", seed=seed).named_parameters()), 4, SMALL_BUCKETS)

    async def receive():
        engine = TorchEngine(build_model("tiny", seed=0), max_batch=2)
        await engine.start_weight_update(4, man)
        try:
            await engine.update_weights_nccl(None, man)
            refused = ""
        except RuntimeError as e:
            refused = str(e)
        await engine.init_weight_transfer("gloo", {"master_address": "127.0.0.1", "master_port": port,
                                                   "rank": 1, "world_size": 2})
        digests = await engine.update_weights_nccl(None, man, src=0)
        await engine.finish_weight_update(4)
        await engine.stop()
        return engine, refused, digests

    engine, refused, digests = asyncio.run(receive())
    expected = dict(build_model("tiny", seed=seed).named_parameters())
    got = dict(engine.model.named_parameters())
    results.put((engine.weight_version, refused, digests == [b.digest for b in man.buckets],
                 [n for n in expected if not torch.equal(expected[n], got[n])]))


def test_collective_update_through_init_weight_transfer():
    """The NCCL path over gloo (same broadcast calls, host buffers), in two fresh processes."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_sender, args=(port, 9)), ctx.Process(target=_receiver, args=(port, 9, results))]
    for p in procs:
        p.start()
    try:
        version, refused, digests, differing = results.get(timeout=120)
    finally:
        for p in procs:
            p.join(20)
            if p.is_alive():
                p.kill()
    assert "call init_weight_transfer first" in refused
    assert version == 4 and digests and differing == []

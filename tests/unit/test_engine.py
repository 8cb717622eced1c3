"""Built-in torch engine: exact logprobs, in-flight batching, seeds, stops, abort, updates."""

import asyncio

import numpy as np
import pytest
import torch

from stages.model import EOS_ID, build_model
from stages.publisher.manifest import ManifestMismatch, pack
from stages.rollout.engines.base import SamplingParams
from stages.rollout.engines.torch_engine import TorchEngine


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


def teacher_forced_gap(model, prompt, completion, temperature=1.0):
    full = torch.tensor([list(prompt) + completion.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(full).logits[0].float() / temperature, -1)
    ref = [lp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(completion.token_ids)]
    return float(np.max(np.abs(np.array(ref) - np.array(completion.logprobs))))


async def test_logprobs_equal_teacher_forced_single_request(model):
    engine = TorchEngine(model, max_batch=8)
    prompt = [1, 5, 6, 7]
    [c] = await engine.generate("r", np.array(prompt), SamplingParams(max_tokens=30, n=1, seed=3))
    await engine.stop()
    assert len(c.token_ids) == len(c.logprobs) > 0
    assert teacher_forced_gap(model, prompt, c) <= 1e-4


async def test_logprobs_equal_teacher_forced_with_requests_joining_in_flight(model):
    engine = TorchEngine(model, max_batch=16)
    prompts = [[1, 5 + i, 6, 7 + (i % 3)][: 2 + i % 3] for i in range(10)]

    async def late(i):
        await asyncio.sleep(0.002 * i)  # join while others are mid-decode
        return await engine.generate(f"r{i}", np.array(prompts[i]),
                                     SamplingParams(temperature=0.7, max_tokens=12 + i, n=3, seed=i))

    outs = await asyncio.gather(*[late(i) for i in range(10)])
    await engine.stop()
    for prompt, comps in zip(prompts, outs):
        assert len(comps) == 3
        for c in comps:
            assert teacher_forced_gap(model, prompt, c, temperature=0.7) <= 1e-4


async def test_seeded_requests_reproduce_regardless_of_batch(model):
    params = SamplingParams(max_tokens=16, n=2, seed=42)
    a = TorchEngine(model, max_batch=8)
    alone = await a.generate("x", np.array([1, 9, 9]), params)
    b = TorchEngine(model, max_batch=8)
    crowd = await asyncio.gather(b.generate("x", np.array([1, 9, 9]), params),
                                 b.generate("y", np.array([1, 4]), SamplingParams(max_tokens=16, n=3, seed=1)))
    await a.stop()
    await b.stop()
    assert [c.token_ids for c in alone] == [c.token_ids for c in crowd[0]]


async def test_stop_ids_and_max_tokens(model):
    engine = TorchEngine(model, max_batch=16)
    comps = await engine.generate("r", np.array([1, 5]), SamplingParams(max_tokens=5, n=16, seed=0,
                                                                          stop_ids=list(range(3, 128))))
    await engine.stop()
    for c in comps:  # nearly every token stops: each completion ends at its first stop id
        assert c.finish_reason in ("stop", "length") and len(c.token_ids) <= 5
        if c.finish_reason == "stop":
            assert c.token_ids[-1] >= 3 and all(t < 3 for t in c.token_ids[:-1])


async def test_abort_returns_partial_completions(model):
    engine = TorchEngine(model, max_batch=4)
    task = asyncio.ensure_future(engine.generate("long", np.array([1, 5]), SamplingParams(max_tokens=400, n=2)))
    await asyncio.sleep(0.05)
    await engine.abort("long")
    comps = await asyncio.wait_for(task, 5)
    await engine.stop()
    assert [c.finish_reason for c in comps] == ["abort", "abort"]
    assert all(0 < len(c.token_ids) < 400 for c in comps)


async def test_two_updates_mid_generation_finish_every_sequence_with_version_spans(model):
    engine = TorchEngine(build_model("tiny", seed=0), max_batch=64)
    params = SamplingParams(max_tokens=60, n=8)
    reqs = [asyncio.ensure_future(engine.generate(f"g{i}", np.array([1, 5 + i]), params)) for i in range(8)]
    for version, seed in ((1, 11), (2, 12)):
        await asyncio.sleep(0.05)
        man, payload = pack(dict(build_model("tiny", seed=seed).named_parameters()), version)
        await engine.start_weight_update(version, man)
        await engine.update_weights_shm(payload, man)
        await engine.finish_weight_update(version)
    outs = await asyncio.gather(*reqs)
    await engine.stop()
    comps = [c for o in outs for c in o]
    assert len(comps) == 64 and all(c.finish_reason == "length" and len(c.token_ids) == 60 for c in comps)
    for c in comps:
        versions = [v for _, v in c.version_spans]
        assert versions == sorted(versions) and versions[0] == 0 and versions[-1] == 2
        starts = [i for i, _ in c.version_spans]
        assert starts[0] == 0 and starts == sorted(set(starts))
    assert engine.weight_version == 2
    new = build_model("tiny", seed=12)
    for (n, a), (_, b) in zip(engine.model.named_parameters(), new.named_parameters()):
        assert torch.equal(a, b), n


async def test_mismatched_manifest_is_refused_and_old_weights_kept(model):
    engine = TorchEngine(build_model("tiny", seed=0), max_batch=4)
    before = {n: p.clone() for n, p in engine.model.named_parameters()}
    state = dict(build_model("tiny", seed=5).named_parameters())
    state["model.norm.weight"] = torch.zeros(3)
    man, _ = pack(state, 1)
    with pytest.raises(ManifestMismatch, match="model.norm.weight"):
        await engine.start_weight_update(1, man)
    [c] = await engine.generate("r", np.array([1, 5]), SamplingParams(max_tokens=4, seed=0))
    await engine.stop()
    assert engine.weight_version == 0 and c.version_spans == [(0, 0)]
    assert all(torch.equal(before[n], p) for n, p in engine.model.named_parameters())


async def test_bad_prompt_fails_only_its_request(model):
    engine = TorchEngine(model, max_batch=4)
    with pytest.raises(ValueError, match="vocabulary"):
        await engine.generate("bad", np.array([1, 999]), SamplingParams())
    [c] = await engine.generate("ok", np.array([1, 5]), SamplingParams(max_tokens=3, stop_ids=[EOS_ID]))
    await engine.stop()
    assert c.finish_reason in ("stop", "length")

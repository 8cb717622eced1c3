"""Built-in torch engine: exact logprobs, in-flight batching, seeds, stops, abort, pause."""

import asyncio

import numpy as np
import pytest
import torch

from stages.model import EOS_ID, build_model
from stages.rollout.engines.base import Completion, SamplingParams
from stages.rollout.engines.torch_engine import TorchEngine


@pytest.fixture(scope="module", autouse=True)
def one_compute_thread():
    """The tiny model's ops are overhead-bound: on shared cores, OpenMP barriers of 2 threads
    cost 10-40x (as in the supervisor, which gives each stage one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


def teacher_forced(model, prompt, completion, temperature=1.0):
    full = torch.tensor([list(prompt) + completion.token_ids])
    with torch.inference_mode():
        lp = torch.log_softmax(model(full).logits[0].float() / temperature, -1)
    return np.array([lp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(completion.token_ids)])


def gap(model, prompt, completion, temperature=1.0):
    return float(np.max(np.abs(teacher_forced(model, prompt, completion, temperature) - np.array(completion.logprobs))))


async def test_logprobs_equal_teacher_forced_single_request(model):
    engine = TorchEngine(model, max_batch=8)
    prompt = [1, 5, 6, 7]
    [c] = await engine.generate("r", np.array(prompt), SamplingParams(max_tokens=40, seed=3))
    await engine.stop()
    assert len(c.token_ids) == len(c.logprobs) > 0 and c.version_spans == [(0, 0)]
    assert gap(model, prompt, c) <= 1e-4


async def test_logprobs_equal_teacher_forced_with_requests_joining_in_flight(model):
    engine = TorchEngine(model, max_batch=16)  # 10 requests x 3 samples > 16 slots: some wait
    prompts = [[1, 5 + i, 6, 7 + (i % 3), 9][: 2 + i % 4] for i in range(10)]
    joined_mid_decode = []

    async def late(i):
        await asyncio.sleep(0.003 * i)
        joined_mid_decode.append(len(engine.active) > 0)
        return await engine.generate(f"r{i}", np.array(prompts[i]),
                                     SamplingParams(temperature=0.7, top_p=0.9, max_tokens=10 + 2 * i, n=3, seed=i))

    outs = await asyncio.gather(*[late(i) for i in range(10)])
    await engine.stop()
    assert sum(joined_mid_decode) >= 3
    for i, (prompt, comps) in enumerate(zip(prompts, outs)):
        assert len(comps) == 3 and all(len(c.token_ids) <= 10 + 2 * i for c in comps)
        for c in comps:
            assert gap(model, prompt, c, temperature=0.7) <= 1e-4


async def test_moe_model_logprobs_equal_teacher_forced():
    moe = build_model("tiny-moe", seed=1)
    engine = TorchEngine(moe, max_batch=8)
    outs = await asyncio.gather(*[engine.generate(f"m{i}", np.array([1, 7 + i]), SamplingParams(max_tokens=12, n=2))
                                  for i in range(3)])
    await engine.stop()
    for i, comps in enumerate(outs):
        for c in comps:
            assert gap(moe, [1, 7 + i], c) <= 1e-4


async def test_greedy_takes_the_argmax_of_the_teacher_forced_logits(model):
    engine = TorchEngine(model, max_batch=4)
    prompt = [1, 8, 9]
    [c] = await engine.generate("g", np.array(prompt), SamplingParams(temperature=0.0, max_tokens=12))
    await engine.stop()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + c.token_ids])).logits[0]
    assert c.token_ids == logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    assert gap(model, prompt, c) <= 1e-4


async def test_seeded_requests_reproduce_regardless_of_batch(model):
    params = SamplingParams(max_tokens=16, n=2, seed=42)
    a = TorchEngine(model, max_batch=8)
    alone = await a.generate("x", np.array([1, 9, 9]), params)
    b = TorchEngine(model, max_batch=8)
    crowd = await asyncio.gather(b.generate("y", np.array([1, 4]), SamplingParams(max_tokens=16, n=3, seed=1)),
                                 b.generate("x", np.array([1, 9, 9]), params))
    other_seed = await b.generate("z", np.array([1, 9, 9]), SamplingParams(max_tokens=16, n=2, seed=43))
    await a.stop()
    await b.stop()
    assert [c.token_ids for c in alone] == [c.token_ids for c in crowd[1]]
    for x, y in zip(alone, crowd[1]):  # equal up to batched-matmul rounding
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
    assert alone[0].token_ids != alone[1].token_ids  # the n samples of one request differ
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in alone]


async def test_unseeded_runs_reproduce_for_the_same_sampling_seed(model):
    async def run(sampling_seed):
        engine = TorchEngine(model, max_batch=8, sampling_seed=sampling_seed)
        outs = await asyncio.gather(*[engine.generate(f"r{i}", np.array([1, 5 + i]), SamplingParams(max_tokens=8))
                                      for i in range(4)])
        await engine.stop()
        return [o[0].token_ids for o in outs]

    first = await run(7)
    assert first == await run(7)
    assert first != await run(8)


async def test_stop_ids_and_max_tokens(model):
    engine = TorchEngine(model, max_batch=16)
    stops = await engine.generate("s", np.array([1, 5]), SamplingParams(max_tokens=5, n=16, seed=0,
                                                                         stop_ids=list(range(3, 95))))
    capped = await engine.generate("c", np.array([1, 5]), SamplingParams(max_tokens=7, n=4, seed=0))
    await engine.stop()
    reasons = [c.finish_reason for c in stops]
    assert reasons.count("stop") >= 12  # nearly every id stops
    for c in stops:  # each completion ends at its first stop id, or at 5 tokens
        if c.finish_reason == "stop":
            assert c.token_ids[-1] >= 3 and all(t < 3 for t in c.token_ids[:-1])
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 5 and all(t < 3 for t in c.token_ids)
    assert all(c.finish_reason == "length" and len(c.token_ids) == 7 for c in capped)


async def test_cache_length_ends_a_completion_with_length(model):
    engine = TorchEngine(model, max_batch=2, max_seq_len=12)
    [c] = await engine.generate("r", np.array([1, 5, 6]), SamplingParams(max_tokens=100, seed=0))
    await engine.stop()
    assert c.finish_reason == "length" and 3 + len(c.token_ids) == 12


async def test_abort_returns_partial_completions_and_frees_slots(model):
    engine = TorchEngine(model, max_batch=4)
    running = asyncio.ensure_future(engine.generate("long", np.array([1, 5]), SamplingParams(max_tokens=400, n=2)))
    queued = asyncio.ensure_future(engine.generate("queued", np.array([1, 6]), SamplingParams(max_tokens=4, n=4)))
    while len(engine.active) == 0 or len(engine.active[0].out.token_ids) < 3:
        await asyncio.sleep(0.005)
    await engine.abort(["long", "queued", "unknown-id"])
    long_comps, queued_comps = await asyncio.wait_for(asyncio.gather(running, queued), 5)
    assert [c.finish_reason for c in long_comps] == ["abort", "abort"]
    assert all(3 <= len(c.token_ids) < 400 for c in long_comps)
    assert all(c.finish_reason == "abort" and c.token_ids == [] for c in queued_comps)
    assert engine.active == [] and engine.requests == {}
    [after] = await engine.generate("after", np.array([1, 5]), SamplingParams(max_tokens=3))
    await engine.stop()
    assert after.finish_reason == "length"


async def test_cancelled_generate_aborts_its_request(model):
    engine = TorchEngine(model, max_batch=4)
    task = asyncio.ensure_future(engine.generate("c", np.array([1, 5]), SamplingParams(max_tokens=400)))
    while not engine.active:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.active == [] and "c" not in engine.requests
    await engine.stop()


async def test_pause_keep_freezes_and_resume_continues_bit_exactly(model):
    params = SamplingParams(max_tokens=30, n=2, seed=5)
    ref_engine = TorchEngine(model, max_batch=4)
    reference = await ref_engine.generate("p", np.array([1, 5, 6]), params)
    await ref_engine.stop()
    engine = TorchEngine(model, max_batch=4)
    task = asyncio.ensure_future(engine.generate("p", np.array([1, 5, 6]), params))
    while not engine.active or len(engine.active[0].out.token_ids) < 5:
        await asyncio.sleep(0.002)
    await engine.pause("keep")
    assert engine.paused
    frozen = len(engine.active[0].out.token_ids)
    await asyncio.sleep(0.05)
    assert len(engine.active[0].out.token_ids) == frozen and not task.done()
    await engine.resume()
    comps = await task
    await engine.stop()
    assert [c.token_ids for c in comps] == [c.token_ids for c in reference]


async def test_pause_abort_and_pause_wait(model):
    engine = TorchEngine(model, max_batch=4)
    task = asyncio.ensure_future(engine.generate("a", np.array([1, 5]), SamplingParams(max_tokens=400)))
    while not engine.active:
        await asyncio.sleep(0.002)
    await engine.pause("abort")
    [aborted] = await task
    assert aborted.finish_reason == "abort" and engine.paused
    await engine.resume()

    running = asyncio.ensure_future(engine.generate("w", np.array([1, 5]), SamplingParams(max_tokens=20)))
    while not engine.active:
        await asyncio.sleep(0.002)
    await engine.pause("wait")  # returns once "w" finished on its own
    assert engine.requests == {} and engine.paused
    assert (await running)[0].finish_reason == "length"
    late = asyncio.ensure_future(engine.generate("late", np.array([1, 5]), SamplingParams(max_tokens=3)))
    await asyncio.sleep(0.05)
    assert not late.done()  # nothing is admitted while paused
    await engine.resume()
    assert (await late)[0].finish_reason == "length"
    await engine.stop()


async def test_bad_requests_fail_alone(model):
    engine = TorchEngine(model, max_batch=4, max_seq_len=16)
    with pytest.raises(ValueError, match="vocabulary"):
        await engine.generate("bad", np.array([1, 999]), SamplingParams())
    with pytest.raises(ValueError, match="prompt of 20 tokens"):
        await engine.generate("long", np.arange(20) % 50, SamplingParams())
    with pytest.raises(ValueError, match="n=5 > max_batch=4"):
        await engine.generate("wide", np.array([1, 5]), SamplingParams(n=5))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    [c] = await engine.generate("ok", np.array([1, 5]), SamplingParams(max_tokens=3, stop_ids=[EOS_ID]))
    await engine.stop()
    assert c.finish_reason in ("stop", "length")


def test_completion_converts_to_a_sample():
    c = Completion([5, 6, 2], [-0.5, -1.0, -0.25], [(0, 3), (2, 4)], "stop")
    s = c.to_sample()
    assert s.token_ids.dtype == np.int32 and s.token_ids.tolist() == [5, 6, 2]
    assert s.logprobs.dtype == np.float32 and s.logprobs.tolist() == [-0.5, -1.0, -0.25]
    assert s.version_spans.dtype == np.int32 and s.version_spans.tolist() == [[0, 3], [2, 4]]
    assert s.finish_reason == "stop" and s.routed_experts is None

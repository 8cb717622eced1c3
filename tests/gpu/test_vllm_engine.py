"""vLLM engine on the GPU: logprobs against teacher forcing, in-flight updates, greedy parity.

One engine (Qwen3-0.6B shape, bf16, eager) serves the whole module; the tests run in file
order and each pushes the weights it needs, so none depends on what an earlier one left
live. The learner side is a transformers model in this process (bf16, SDPA attention):
weights travel to vLLM's engine core process over CUDA IPC (``CudaBuckets``), exactly the
publisher's ``cuda_ipc`` path.

Weights: ``build_model`` random init with the embedding (tied to the LM head) scaled by
``EMBED_SCALE`` so the next-token distributions are peaked (mean entropy is reported);
with the plain init they are nearly uniform over 151,936 tokens and every logprob is about
-11.93, which would make a logprob comparison say nothing.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from stages.model import build_model
from stages.publisher.manifest import ManifestMismatch, plan
from stages.rollout.engines.base import SamplingParams
from stages.rollout.engines.vllm_engine import CudaBuckets, VllmEngine
from stages.rollout.engines.vllm_worker import gpu_digests
from tests.gpu.conftest import report

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]

MODEL = "qwen3-0.6b"
EMBED_SCALE = 5.0
"""Embedding std 0.02 → 0.1: logits std about 3, next-token entropy a few nats."""
NOISE_STD = 0.02
"""Perturbation that makes a different model out of the base weights (as large as the init)."""
PROMPT_LEN = 32
GPU_MEMORY_UTILIZATION = 0.35
"""vLLM's share; the rest holds the transformers model, its fp32 copy and the buckets."""
TIE_NATS = 0.5
"""A greedy token vLLM picks may trail the learner's argmax by this much (bf16 near-ties)."""


def run(loop, coro):
    return loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def engine(loop):
    eng = VllmEngine(MODEL, init="seeded", seed=0, enforce_eager=True, max_model_len=1024, max_num_seqs=128,
                     gpu_memory_utilization=GPU_MEMORY_UTILIZATION)
    run(loop, eng.start())
    yield eng
    run(loop, eng.stop())


@pytest.fixture(scope="module")
def learner(engine):
    """The learner's model (holds whichever state a test loads into it) and named states."""
    model = build_model(MODEL, dtype=torch.bfloat16, device="cuda", seed=1)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(EMBED_SCALE)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}

    def variant(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator(device="cuda").manual_seed(seed)
        return {n: (t + NOISE_STD * torch.randn(t.shape, generator=g, device="cuda", dtype=torch.float32)
                    .to(t.dtype)) if t.dim() == 2 else t.clone() for n, t in base.items()}

    states = {1: base, 2: variant(2), 3: variant(3)}
    return model, states, CudaBuckets(base)


def load_state(model, state) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


async def push(engine: VllmEngine, buckets: CudaBuckets, state, version: int) -> float:
    """One cuda_ipc update; asserts the engine's digests of what it loaded equal the sender's."""
    manifest = buckets.fill(state, version)
    t0 = time.perf_counter()
    await engine.start_weight_update(version, manifest)
    got = await engine.update_weights_ipc(buckets.handles(), manifest)
    await engine.finish_weight_update(version)
    seconds = time.perf_counter() - t0
    assert got == [b.digest for b in manifest.buckets]
    assert engine.weight_version == version and not engine.paused
    return seconds


def prompts(n: int, seed: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(n, PROMPT_LEN)).tolist()


@torch.no_grad()
def teacher_forced(model, prompt_rows, completion_rows, temperature: float = 1.0):
    """Per completion token: logprob of the token under ``model`` at ``temperature``, the
    model's max logprob there, and the entropy (all float32, from the model's logits)."""
    lps, maxes, ents = [], [], []
    for i in range(0, len(prompt_rows), 8):
        ids = torch.tensor([p + c for p, c in zip(prompt_rows[i : i + 8], completion_rows[i : i + 8])], device="cuda")
        p = len(prompt_rows[i])
        logits = model(ids).logits[:, p - 1 : -1].float()
        logp = torch.log_softmax(logits / max(temperature, 1e-5) if temperature > 0 else logits, dim=-1)
        tok = ids[:, p:]
        lps.append(logp.gather(-1, tok[..., None])[..., 0].cpu())
        maxes.append(logp.max(-1).values.cpu())
        ents.append(-(logp.exp() * logp).sum(-1).cpu())
    return torch.cat(lps).numpy(), torch.cat(maxes).numpy(), torch.cat(ents).numpy()


async def gather_rows(engine, rows, params, tag):
    outs = await asyncio.gather(*(engine.generate(f"{tag}-{i}", r, params) for i, r in enumerate(rows)))
    return outs


def test_seeded_start_holds_build_model_weights(loop, engine):
    """The engine's version 0 is ``build_model(MODEL, seed=0)``: the learner's initial weights."""
    ref = build_model(MODEL, dtype=torch.bfloat16, device="cuda", seed=0)
    state = {n: p.detach() for n, p in ref.named_parameters()}
    manifest = plan(state, 0)
    assert run(loop, engine.param_digests(manifest)) == gpu_digests(manifest, state)
    assert engine.describe["fast"] is True
    report("vllm_start", start_s=round(engine.start_seconds, 2), copy_plan=engine.describe["fast"])
    del ref, state
    torch.cuda.empty_cache()


def test_mismatched_manifest_is_refused_and_engine_keeps_serving(loop, engine):
    tiny = build_model("tiny", dtype=torch.bfloat16)
    manifest = plan(dict(tiny.named_parameters()), 99)
    version = engine.weight_version
    with pytest.raises(ManifestMismatch) as e:
        run(loop, engine.start_weight_update(99, manifest))
    assert "model.embed_tokens.weight: shape" in str(e.value)
    assert engine.weight_version == version and not engine.paused
    out = run(loop, engine.generate("after-refusal", [1, 2, 3], SamplingParams(max_tokens=4)))
    assert len(out[0].token_ids) == 4 and out[0].finish_reason == "length"


def test_logprobs_match_teacher_forced_learner(loop, engine, learner):
    model, states, buckets = learner
    version = engine.weight_version + 1
    run(loop, push(engine, buckets, states[1], version))
    rows = prompts(16, seed=10, vocab=engine.vocab)
    params = SamplingParams(temperature=1.0, max_tokens=64, n=2, seed=7)
    outs = run(loop, gather_rows(engine, rows, params, "lp"))
    p_rows = [r for r, o in zip(rows, outs) for _ in o]
    comps = [c for o in outs for c in o]
    assert all(len(c.token_ids) == 64 and len(c.logprobs) == 64 and c.finish_reason == "length" for c in comps)
    assert all(c.version_spans == [(0, version)] for c in comps)
    got = np.array([c.logprobs for c in comps], dtype=np.float32)
    c_rows = [c.token_ids for c in comps]

    load_state(model, states[1])
    lp_bf16, _, ent = teacher_forced(model, p_rows, c_rows)
    fp32 = build_model(MODEL, dtype=torch.float32, device="cuda", seed=0)
    load_state(fp32, states[1])
    lp_fp32, _, _ = teacher_forced(fp32, p_rows, c_rows)
    del fp32
    load_state(model, states[2])
    lp_other, _, _ = teacher_forced(model, p_rows, c_rows)
    torch.cuda.empty_cache()

    gap = np.abs(got - lp_bf16.reshape(got.shape))
    gap32 = np.abs(got - lp_fp32.reshape(got.shape))
    noise = np.abs(lp_bf16 - lp_fp32)
    control = np.abs(got - lp_other.reshape(got.shape))
    report("vllm_logprobs_vs_learner", tokens=int(gap.size), mean_gap=float(gap.mean()), max_gap=float(gap.max()),
           p99_gap=float(np.quantile(gap, 0.99)), mean_gap_vs_fp32=float(gap32.mean()),
           max_gap_vs_fp32=float(gap32.max()), learner_bf16_vs_fp32_mean=float(noise.mean()),
           learner_bf16_vs_fp32_max=float(noise.max()), other_weights_mean_gap=float(control.mean()),
           mean_entropy_nats=float(ent.mean()), mean_logprob=float(got.mean()))
    assert gap.mean() < 0.1 and gap.max() < 2.0
    assert gap.mean() * 5 < control.mean(), "logprobs do not single out the weights that were loaded"


def test_canary_on_vllm_matches_the_learners(loop, engine, learner):
    """The publisher's canary on the vLLM engine (prompt logprobs) against the learner's
    teacher-forced logprobs of the same ids on the same weights; other weights stand apart."""
    from stages.publisher.canary import canary_ids, teacher_forced_logprobs

    model, states, buckets = learner
    version = engine.weight_version + 1
    run(loop, push(engine, buckets, states[1], version))
    ids = canary_ids()
    got = run(loop, engine.teacher_forced_logprobs(ids))
    load_state(model, states[1])
    want = teacher_forced_logprobs(model, ids, "cuda")
    load_state(model, states[2])
    other = teacher_forced_logprobs(model, ids, "cuda")
    gap, control = np.abs(got - want), np.abs(got - other)
    report("vllm_canary_vs_learner", tokens=int(gap.size), mean_gap=float(gap.mean()), max_gap=float(gap.max()),
           other_weights_mean_gap=float(control.mean()))
    assert got.shape == want.shape == (len(ids) - 1,) and got.dtype == np.float32
    assert gap.mean() < 0.1 and gap.mean() * 5 < control.mean()


def test_updates_mid_generation_drop_nothing_and_record_versions(loop, engine, learner):
    _, states, buckets = learner
    v0 = engine.weight_version
    run(loop, push(engine, buckets, states[1], v0 + 1))
    rows = prompts(24, seed=11, vocab=engine.vocab)
    params = SamplingParams(temperature=1.0, max_tokens=160, n=2)

    async def scenario():
        tasks = [asyncio.ensure_future(engine.generate(f"mid-{i}", r, params)) for i, r in enumerate(rows)]

        async def progressed(k: int) -> None:
            while min((len(c.token_ids) for r in engine._requests.values() for c in r.completions), default=0) < k:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(progressed(8), 60)
        busy = len(engine._requests)
        t2 = await push(engine, buckets, states[2], v0 + 2)
        tokens_at_2 = min(len(c.token_ids) for r in engine._requests.values() for c in r.completions)
        await asyncio.wait_for(progressed(tokens_at_2 + 8), 60)
        t3 = await push(engine, buckets, states[3], v0 + 3)
        return await asyncio.gather(*tasks), busy, (t2, t3)

    outs, busy, seconds = run(loop, scenario())
    assert busy == len(rows) and len(outs) == len(rows)
    for o in outs:
        assert len(o) == 2
        for c in o:
            assert c.finish_reason == "length" and len(c.token_ids) == 160 == len(c.logprobs)
            assert [v for _, v in c.version_spans] == [v0 + 1, v0 + 2, v0 + 3], c.version_spans
            starts = [k for k, _ in c.version_spans]
            assert starts[0] == 0 and starts[0] < starts[1] < starts[2] < 160
    report("vllm_update_mid_generation", requests=len(rows), sequences=2 * len(rows),
           update_ms_while_generating=[round(s * 1e3, 1) for s in seconds])


def test_pause_keep_freezes_and_abort_finishes_with_partial_tokens(loop, engine):
    params = SamplingParams(temperature=1.0, max_tokens=400)

    async def scenario():
        tasks = [asyncio.ensure_future(engine.generate(f"pa-{i}", [5 + i] * 8, params)) for i in range(4)]
        while min((len(r.completions[0].token_ids) for r in engine._requests.values()), default=0) < 5:
            await asyncio.sleep(0.005)
        await engine.pause("keep")
        frozen = {k: len(r.completions[0].token_ids) for k, r in engine._requests.items()}
        await asyncio.sleep(0.3)
        still = {k: len(r.completions[0].token_ids) for k, r in engine._requests.items()}
        await engine.resume()
        await asyncio.sleep(0.2)
        await engine.abort(["pa-0", "pa-1"])
        return frozen, still, await asyncio.gather(*tasks)

    frozen, still, outs = run(loop, scenario())
    assert frozen == still and len(frozen) == 4
    for i, o in enumerate(outs):
        c = o[0]
        if i < 2:
            assert c.finish_reason == "abort" and frozen[f"pa-{i}"] < len(c.token_ids) < 400
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 400
        assert len(c.logprobs) == len(c.token_ids)


def test_greedy_after_update_matches_learner(loop, engine, learner):
    model, states, buckets = learner
    version = engine.weight_version + 1
    run(loop, push(engine, buckets, states[3], version))
    rows = prompts(8, seed=12, vocab=engine.vocab)
    steps = 48
    outs = run(loop, gather_rows(engine, rows, SamplingParams(temperature=0.0, max_tokens=steps), "greedy"))
    got = [o[0].token_ids for o in outs]
    assert all(len(g) == steps for g in got)

    load_state(model, states[3])
    lp, mx, _ = teacher_forced(model, rows, got, temperature=0.0)
    deficit = (mx - lp).reshape(len(rows), steps)
    agree = float((deficit == 0).mean())
    vllm_lp = np.array([o[0].logprobs for o in outs], dtype=np.float32)
    with torch.no_grad():  # the learner's own greedy decode, free-running
        ids = torch.tensor(rows, device="cuda")
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    hf = ids[:, PROMPT_LEN:].tolist()
    same = sum(a == b for a, b in zip(hf, got))
    first_diff = [next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), steps) for a, b in zip(hf, got)]
    load_state(model, states[2])
    lp2, mx2, _ = teacher_forced(model, rows, got, temperature=0.0)
    agree_other = float(((mx2 - lp2) == 0).mean())
    report("vllm_greedy_vs_learner", sequences=len(rows), tokens=steps, identical_sequences=same,
           first_divergence=first_diff, argmax_agreement=agree, max_deficit_nats=float(deficit.max()),
           greedy_logprob_mean_gap=float(np.abs(vllm_lp - lp.reshape(vllm_lp.shape)).mean()),
           argmax_agreement_other_weights=agree_other)
    assert agree >= 0.9 and float(deficit.max()) <= TIE_NATS
    assert agree_other < 0.5

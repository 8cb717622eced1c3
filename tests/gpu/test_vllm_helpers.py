"""The vLLM lane's pure parts, on any machine: digests, the copy plan, handle encoding.

The copy plan is checked against a module tree shaped like vLLM 0.26.0's Qwen3 (layer class
names, ``packed_modules_mapping``, ``output_sizes``, tied embedding); on the GPU the same
plan is checked against the real engine by digests (``test_vllm_engine``).
"""

from __future__ import annotations

import os

import msgspec
import pytest
import torch

from stages.model import build_model
from stages.publisher.manifest import DigestMismatch, pack, plan
from stages.rollout.engines.vllm_worker import (DIGEST_PREFIX, IpcBucketHandle, build_plan, bucket_views,
                                                check_digests, copy_and_digest, gpu_digests, layout_key,
                                                plan_problems)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in build_model("tiny", dtype=torch.bfloat16, seed=seed).named_parameters()}


def test_digest_is_layout_independent_and_sensitive():
    state = _state()
    manifest, payload = pack(state, 1, bucket_bytes=64 << 10)
    assert len(manifest.buckets) > 2
    buckets = [torch.from_numpy(payload[b.offset : b.offset + b.nbytes].copy()) for b in manifest.buckets]
    from_buckets = gpu_digests(manifest, bucket_views(manifest, buckets))
    from_params = gpu_digests(manifest, state)
    assert from_buckets == from_params and all(d.startswith(DIGEST_PREFIX) and len(d) == 35 for d in from_params)

    name = manifest.entries[3].name
    changed = dict(state, **{name: state[name].clone()})
    changed[name].view(-1)[7] += 1
    diff = gpu_digests(manifest, changed)
    b = manifest.entries[3].bucket
    assert diff[b] != from_params[b] and [d for i, d in enumerate(diff) if i != b] == \
        [d for i, d in enumerate(from_params) if i != b]

    swapped = dict(state, **{name: state[name].clone()})
    w = swapped[name].view(-1).view(torch.int32)
    w[0], w[1] = w[1].clone(), w[0].clone()
    assert bool(w[0] != w[1]) and gpu_digests(manifest, swapped)[b] != from_params[b]

    a, c = manifest.entries[1], manifest.entries[2]
    if a.shape == c.shape and a.bucket == c.bucket and not torch.equal(state[a.name], state[c.name]):
        exchanged = dict(state, **{a.name: state[c.name], c.name: state[a.name]})
        assert gpu_digests(manifest, exchanged)[a.bucket] != from_params[a.bucket]


def test_check_digests_names_bad_buckets_and_ignores_host_digests():
    state = _state()
    manifest = plan(state, 2, bucket_bytes=64 << 10)
    good = gpu_digests(manifest, state)
    signed = msgspec.structs.replace(manifest, buckets=[msgspec.structs.replace(b, digest=d)
                                                        for b, d in zip(manifest.buckets, good)])
    check_digests(signed, good)
    bad = list(good)
    bad[1] = DIGEST_PREFIX + "0" * 32
    with pytest.raises(DigestMismatch, match=r"bucket\(s\) \[1\]"):
        check_digests(signed, bad)
    blake, _ = pack(state, 2, bucket_bytes=64 << 10)  # host BLAKE2b digests: not ours to check
    check_digests(blake, bad)


# ---------------------------------------------------------------- a vLLM-shaped Qwen3 module tree
class QKVParallelLinear(torch.nn.Module):
    def __init__(self, hidden, q, kv, tp_size=1):
        super().__init__()
        self.output_sizes, self.tp_size = [q, kv, kv], tp_size
        self.weight = torch.nn.Parameter(torch.zeros(q + 2 * kv, hidden, dtype=torch.bfloat16))


class MergedColumnParallelLinear(torch.nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.output_sizes, self.tp_size = [inter, inter], 1
        self.weight = torch.nn.Parameter(torch.zeros(2 * inter, hidden, dtype=torch.bfloat16))


class RowParallelLinear(torch.nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.tp_size = 1
        self.weight = torch.nn.Parameter(torch.zeros(n_out, n_in, dtype=torch.bfloat16))


class RMSNorm(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16))


class VocabParallelEmbedding(torch.nn.Module):
    def __init__(self, vocab, hidden):
        super().__init__()
        self.tp_size = 1
        self.weight = torch.nn.Parameter(torch.zeros(vocab, hidden, dtype=torch.bfloat16))


class _Attn(torch.nn.Module):
    def __init__(self, cfg, tp_size):
        super().__init__()
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, q, kv, tp_size)
        self.o_proj = RowParallelLinear(q, cfg.hidden_size)
        self.q_norm, self.k_norm = RMSNorm(cfg.head_dim), RMSNorm(cfg.head_dim)


class _Mlp(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)


class _Layer(torch.nn.Module):
    def __init__(self, cfg, tp_size):
        super().__init__()
        self.self_attn, self.mlp = _Attn(cfg, tp_size), _Mlp(cfg)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(cfg.hidden_size), RMSNorm(cfg.hidden_size)


class _Body(torch.nn.Module):
    def __init__(self, cfg, tp_size):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = torch.nn.ModuleList(_Layer(cfg, tp_size) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size)


class FakeVllmQwen3(torch.nn.Module):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, cfg, tp_size=1):
        super().__init__()
        self.model = _Body(cfg, tp_size)
        self.lm_head = self.model.embed_tokens  # tied, as vLLM does


def test_copy_plan_loads_a_checkpoint_into_fused_parameters():
    hf = build_model("tiny", dtype=torch.bfloat16, seed=3)
    state = {n: p.detach() for n, p in hf.named_parameters()}
    fake = FakeVllmQwen3(hf.config)
    targets = build_plan(fake, tie_word_embeddings=True)
    assert targets is not None and set(targets) == set(state) | {"lm_head.weight"}
    assert targets["lm_head.weight"].alias
    manifest, payload = pack(state, 4, bucket_bytes=64 << 10)
    assert plan_problems(manifest, targets) == []
    buckets = [torch.from_numpy(payload[b.offset : b.offset + b.nbytes].copy()) for b in manifest.buckets]
    digests = copy_and_digest(manifest, targets, bucket_views(manifest, buckets), digests=True)
    assert digests == gpu_digests(manifest, state)

    attn = hf.model.layers[1].self_attn
    qkv = fake.model.layers[1].self_attn.qkv_proj.weight
    assert torch.equal(qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    mlp = hf.model.layers[0].mlp
    assert torch.equal(fake.model.layers[0].mlp.gate_up_proj.weight, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert torch.equal(fake.model.embed_tokens.weight, hf.model.embed_tokens.weight)


def test_copy_plan_refuses_what_it_cannot_copy():
    cfg = build_model("tiny").config
    assert build_plan(FakeVllmQwen3(cfg, tp_size=2), tie_word_embeddings=True) is None
    fake = FakeVllmQwen3(cfg)
    fake.model.extra = torch.nn.Linear(2, 2)  # a layer kind the plan does not know
    assert build_plan(fake, tie_word_embeddings=True) is None

    targets = build_plan(FakeVllmQwen3(cfg), tie_word_embeddings=True)
    state = _state()
    state.pop("model.norm.weight")
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    problems = plan_problems(plan(state, 1), targets)
    assert "model.norm.weight: missing from the manifest" in problems
    assert any(p.startswith("model.layers.0.mlp.up_proj.weight: shape [3, 3]") for p in problems)
    assert not any(p.startswith("lm_head.weight") for p in problems)  # a tied alias is optional


def test_plain_wire_types_round_trip_and_layout_key_ignores_version():
    h = IpcBucketHandle("GPU-1234", [1024], [1], 0, "uint8", b"\x00" * 64, 1 << 20, 4096, b"/torch_1", 3, b"\x01" * 64, True)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode([h]), type=list[IpcBucketHandle]) == [h]
    state = _state()
    assert layout_key(plan(state, 1)) == layout_key(plan(state, 9))
    assert layout_key(plan(state, 1)) != layout_key(plan(state, 1, bucket_bytes=64 << 10))


def test_pin_cuda_device_narrows_visibility(monkeypatch):
    from stages.rollout.engines.vllm_engine import pin_cuda_device

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    pin_cuda_device("cuda")
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    pin_cuda_device("cuda:1")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    pin_cuda_device("cuda:1")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    with pytest.raises(ValueError, match="has no device 3"):
        pin_cuda_device("cuda:3")
    with pytest.raises(ValueError, match="needs a cuda device"):
        pin_cuda_device("cpu")

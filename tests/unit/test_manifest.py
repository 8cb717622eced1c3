"""Weight payloads: bit-exact pack/unpack, refusal of mismatched manifests and digests."""

import pytest
import torch

from stages.model import build_model
from stages.publisher.manifest import (
    DigestMismatch, ManifestMismatch, check_compatible, load_into, pack, unpack,
)


def params(model):
    return dict(model.named_parameters())


def test_pack_unpack_load_is_bit_exact_across_buckets():
    src, dst = build_model("tiny", seed=1), build_model("tiny", seed=2)
    man, payload = pack(params(src), version=5, bucket_bytes=64 * 1024)
    assert len(man.buckets) > 3 and man.version == 5
    check_compatible(man, params(dst))
    tensors, digests = unpack(man, payload)
    assert digests == [b.digest for b in man.buckets]
    load_into(dst, tensors)
    for (n, a), (_, b) in zip(src.named_parameters(), dst.named_parameters()):
        assert torch.equal(a, b), n


def test_bf16_payload_round_trips():
    state = {"w": torch.randn(3, 5).to(torch.bfloat16)}
    man, payload = pack(state, 1)
    tensors, _ = unpack(man, payload)
    assert tensors["w"].dtype == torch.bfloat16 and torch.equal(tensors["w"], state["w"])


def test_mismatched_manifest_names_every_offender():
    model = build_model("tiny")
    state = dict(params(model))
    state["model.norm.weight"] = torch.zeros(7)
    state["not.a.param"] = torch.zeros(1)
    del state["model.layers.0.mlp.up_proj.weight"]
    man, _ = pack(state, 1)
    with pytest.raises(ManifestMismatch) as e:
        check_compatible(man, params(model))
    text = str(e.value)
    assert "model.norm.weight: shape [7]" in text
    assert "not.a.param: not a parameter" in text
    assert "model.layers.0.mlp.up_proj.weight: missing" in text


def test_corrupted_bucket_is_refused():
    man, payload = pack({"a": torch.ones(100), "b": torch.ones(100)}, 1, bucket_bytes=256)
    payload = payload.copy()
    payload[-70] ^= 1
    with pytest.raises(DigestMismatch, match=r"bucket\(s\) \[1\]"):
        unpack(man, payload)

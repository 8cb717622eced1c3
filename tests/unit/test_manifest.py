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


def c1_by_definition(words) -> str:
    mask = (1 << 64) - 1
    s = sum(int(w) for w in words) & mask
    w = sum((i + 1) * int(x) for i, x in enumerate(words)) & mask
    return f"c1:{s:016x}{w:016x}"


@pytest.mark.parametrize("step_rows", [3, 256])  # several steps with a short last one; one step
def test_c1_digest_matches_its_definition_on_host_and_torch(step_rows, monkeypatch):
    import numpy as np

    from stages.publisher import manifest
    from stages.publisher.manifest import c1_digests_torch, compute_digests

    monkeypatch.setattr(manifest, "C1_STEP_ROWS", step_rows)

    state = {"a": torch.randn(3, 5), "b": torch.randn(1001).to(torch.bfloat16), "c": torch.randn(1024 * 40 + 3),
             "d": torch.arange(3, dtype=torch.int16)}
    man, payload = pack(state, 1, bucket_bytes=4096)
    assert len(man.buckets) == 2
    for b in man.buckets:  # padding is zero in a packed payload, so whole-bucket words match
        assert b.digest == c1_by_definition(payload[b.offset : b.offset + b.nbytes].view(np.uint64))
    buckets = [torch.from_numpy(payload[b.offset : b.offset + b.nbytes].copy()) for b in man.buckets]
    assert c1_digests_torch(man, buckets) == compute_digests(man, buckets) == [b.digest for b in man.buckets]


def test_c1_digest_sees_swapped_words_and_ignores_padding_garbage():
    import numpy as np

    from stages.publisher.manifest import bucket_digests

    man, payload = pack({"a": torch.randn(5000), "b": torch.randn(3)}, 1)
    swapped = payload.copy()
    w = swapped.view(np.uint64)
    w[[10, 1500]] = w[[1500, 10]]
    assert bucket_digests(man, swapped) != bucket_digests(man, payload)
    gap = man.entries[0].offset + man.entries[0].nbytes
    assert man.entries[1].offset > gap
    garbage = payload.copy()
    garbage[gap] = 7  # between entries: not part of any tensor
    assert bucket_digests(man, garbage) == bucket_digests(man, payload)


def test_threaded_pieces_give_the_same_payload_and_digests(monkeypatch):
    import numpy as np

    import stages.publisher.manifest as m

    state = {"a": torch.randn(50_000), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(3000, 11)}
    serial, payload = pack(state, 1, bucket_bytes=100_000)
    monkeypatch.setattr(m, "HOST_THREADS", 3)
    monkeypatch.setattr(m, "THREADED_MIN_BYTES", 0)
    monkeypatch.setattr(m, "PIECE_BYTES", 8 * m.C1_ROW_WORDS * 3)  # several pieces per large tensor
    threaded, again = pack(state, 1, bucket_bytes=100_000)
    assert threaded == serial and np.array_equal(payload, again)
    assert m.bucket_digests(threaded, again) == [b.digest for b in serial.buckets]
    dst = build_model("tiny", seed=3)
    src = build_model("tiny", seed=4)
    load_into(dst, dict(src.named_parameters()))
    assert all(torch.equal(a, b) for a, b in zip(src.parameters(), dst.parameters()))

"""Codec: every message type round-trips; bad input is refused with a reason."""

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from schemas import messages as m
from stages.testing import make_rollout, make_train_group, messages_equal
from transport.codec import INLINE_MAX_BYTES, OWN_FRAME_MIN_BYTES, Codec, DecodeError

DTYPES = [np.int32, np.float32, np.uint16, np.int64, np.float64]


def arrays(dtype=None, ndim=1):
    dt = st.sampled_from(DTYPES) if dtype is None else st.just(dtype)
    # Empty, inline, pooled and own-frame sizes (in elements of up to 8 bytes).
    length = st.one_of(st.integers(0, 8), st.integers(INLINE_MAX_BYTES // 4, 4 * INLINE_MAX_BYTES),
                       st.just(OWN_FRAME_MIN_BYTES // 4 + 3))
    return st.builds(lambda d, n, seed: np.random.default_rng(seed).integers(0, 1000, n).astype(d),
                     dt, length, st.integers(0, 2**16))


texts = st.text(max_size=20)
ints = st.integers(-(2**31), 2**31)


def samples():
    return st.builds(
        m.Sample, arrays(np.int32), arrays(np.float32),
        st.builds(lambda k: np.arange(2 * k, dtype=np.int32).reshape(k, 2), st.integers(0, 4)),
        st.sampled_from(["stop", "length", "abort"]),
        st.one_of(st.none(), st.builds(lambda n: np.zeros((n, 2, 2), np.uint16), st.integers(0, 50))),
    )


def groups():
    return st.builds(m.PromptGroup, texts, arrays(np.int32), texts, texts, ints, ints, ints, texts)


def rollouts():
    return st.builds(m.Rollout, groups(), st.lists(samples(), max_size=4), texts, st.floats(0, 10))


def scored():
    return st.builds(m.ScoredGroup, rollouts(), arrays(np.float32), st.lists(texts, max_size=3))


MESSAGES = st.one_of(
    groups(),
    rollouts(),
    scored(),
    st.builds(m.TrainGroup, scored(), st.one_of(st.none(), st.lists(arrays(np.float32), max_size=3)), ints),
    st.builds(m.GroupFailed, texts, texts, texts),
    st.builds(m.Progress, ints, ints, st.lists(texts, max_size=5),
              st.lists(st.builds(m.DroppedGroup, texts, texts), max_size=3)),
    st.builds(m.WeightsReady, ints, texts, texts, ints, st.floats(0, 1e3)),
    st.builds(m.Control, st.sampled_from(list(m.ControlCommand)), texts, texts),
    st.builds(m.Heartbeat, texts, ints, ints, texts, ints, ints, ints),
    st.builds(m.Metrics, texts, ints, st.dictionaries(texts, st.floats(allow_nan=False), max_size=4)),
    st.builds(m.Hello, texts),
    st.builds(m.Welcome, texts, ints),
    st.builds(m.SnapshotRequest, texts),
    st.builds(m.Credit, ints, texts),
    st.builds(m.ScaleRequest, texts, ints),
    st.builds(m.StatusRequest),
    st.builds(m.StatusReply, st.booleans(), texts,
              st.lists(st.builds(m.StageStatus, texts, ints, ints, ints, ints, ints), max_size=3),
              ints, ints, st.floats(allow_nan=False), st.floats(allow_nan=False), st.floats(allow_nan=False)),
    st.builds(m.WeightsOffer, st.builds(
        m.WeightManifest, ints,
        st.lists(st.builds(m.TensorEntry, texts, texts, st.lists(ints, max_size=3), ints, ints, ints), max_size=3),
        st.lists(st.builds(m.WeightBucket, ints, ints, texts), max_size=3), ints), texts, texts, st.floats(0, 100),
        st.lists(st.builds(m.CudaIpcHandle, texts, st.lists(ints, max_size=2), st.lists(ints, max_size=2), ints, texts,
                           st.binary(max_size=64), ints, ints, st.binary(max_size=16), ints, st.binary(max_size=8),
                           st.booleans()), max_size=2),
        st.one_of(st.none(), st.builds(m.WeightGroup, texts, ints, texts, st.lists(texts, max_size=3), texts, texts)),
        st.floats(0, 2e9), st.one_of(st.none(), arrays(np.int32)), st.one_of(st.none(), arrays(np.float32))),
    st.builds(m.WeightsLoaded, ints, texts, st.booleans(), st.lists(texts, max_size=3), texts, st.floats(0, 9)),
    st.builds(m.CanaryReport, ints, texts, arrays(np.float32)),
)


def test_every_message_type_is_covered():
    covered = {"prompt_group", "rollout", "scored_group", "train_group", "group_failed", "progress",
               "weights_ready", "control", "heartbeat", "metrics", "hello", "welcome", "snapshot_request",
               "credit", "scale_request", "status_request", "status_reply",
               "weights_offer", "weights_loaded", "canary_report"}
    assert covered | {"snapshot"} == set(m.TAGS)  # Snapshot is covered by the PUB/SUB tests


@settings(max_examples=200, deadline=None)
@given(MESSAGES)
def test_round_trip(msg):
    codec = Codec("test/0")
    frames = codec.encode(msg)
    env, back = codec.decode([bytes(memoryview(f).cast("B")) for f in frames])
    assert env.sender == "test/0" and env.tag == type(msg).__struct_config__.tag
    assert messages_equal(msg, back)


def test_arrays_decode_as_zero_copy_views_of_pool_and_own_frames():
    tg = make_train_group(length=4096, with_ref=True)
    tg.ref_logprobs[0] = np.arange(OWN_FRAME_MIN_BYTES // 4, dtype=np.float32)  # own frame
    frames = Codec("a").encode(tg)
    assert len(frames) == 4  # envelope, body, pool (16 KiB arrays), one large array
    wire = [bytes(memoryview(f).cast("B")) for f in frames]
    _, back = Codec("b").decode(wire)
    base = lambda a: a.__array_interface__["data"][0]  # noqa: E731
    pooled, large = back.scored.rollout.samples[1].token_ids, back.ref_logprobs[0]
    assert not pooled.flags.writeable and not pooled.flags.owndata and pooled.flags.aligned
    assert base(np.frombuffer(wire[2], np.uint8)) <= base(pooled) < base(np.frombuffer(wire[2], np.uint8)) + len(wire[2])
    assert base(large) == base(np.frombuffer(wire[3], np.uint8))
    assert messages_equal(tg, back)


def test_msg_ids_increase_per_sender():
    c = Codec("s/0")
    ids = [c.decode(c.encode(m.Hello("x")))[0].msg_id for _ in range(3)]
    assert ids == [1, 2, 3]


@pytest.mark.parametrize("frames, reason", [
    ([b"garbage"], "malformed"),
    ([b"\x95garbage", b""], "malformed"),
    ([msgspec.msgpack.encode(m.Envelope(1, 1, "x/0", 0.0, "hello")), b"\xc1"], "malformed"),
    ([msgspec.msgpack.encode(m.Envelope(1, 1, "x/0", 0.0, "nope")), b"\x90"], "unknown_tag"),
    ([msgspec.msgpack.encode(m.Envelope(m.SCHEMA_VERSION + 1, 1, "x/0", 0.0, "hello")), b"\x90"], "newer_schema"),
])
def test_bad_input_is_refused_with_reason(frames, reason):
    with pytest.raises(DecodeError) as e:
        Codec("r").decode(frames)
    assert e.value.reason == reason


def test_oversize_is_refused_naming_sender():
    frames = Codec("big/3").encode(make_rollout(length=4096))
    with pytest.raises(DecodeError) as e:
        Codec("r", max_message_bytes=10_000).decode(frames)
    assert e.value.reason == "oversize" and e.value.sender == "big/3"


def test_array_frame_reference_out_of_range_is_malformed():
    frames = Codec("s").encode(make_train_group(length=OWN_FRAME_MIN_BYTES // 4))
    with pytest.raises(DecodeError) as e:
        Codec("r").decode(frames[:4])
    assert e.value.reason == "malformed"

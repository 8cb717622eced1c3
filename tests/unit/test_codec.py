"""Codec: every message type round-trips; bad input is refused with a reason."""

import struct

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from schemas import messages as m
from stages.testing import make_rollout, make_train_group, messages_equal
from transport.codec import INLINE_MAX_BYTES, OWN_FRAME_MIN_BYTES, POOL_RETAIN_MAX_BYTES, Codec, DecodeError

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


def train_groups():
    return st.builds(m.TrainGroup, scored(), st.one_of(st.none(), st.lists(arrays(np.float32), max_size=3)), ints)


MESSAGES = st.one_of(
    groups(),
    rollouts(),
    scored(),
    train_groups(),
    st.builds(m.RolloutBatch, st.lists(rollouts(), max_size=3)),
    st.builds(m.ScoredBatch, st.lists(scored(), max_size=3)),
    st.builds(m.TrainBatch, st.lists(st.one_of(train_groups(), st.builds(m.GroupFailed, texts, texts, texts)),
                                     max_size=3)),
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
               "weights_offer", "weights_loaded", "canary_report", "rollout_batch", "scored_batch", "train_batch"}
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
    assert len(frames) == 2  # head + pool (16 KiB arrays) in one frame, one large array
    wire = [bytes(memoryview(f).cast("B")) for f in frames]
    _, back = Codec("b").decode(wire)
    base = lambda a: a.__array_interface__["data"][0]  # noqa: E731
    pooled, large = back.scored.rollout.samples[1].token_ids, back.ref_logprobs[0]
    assert not pooled.flags.writeable and not pooled.flags.owndata and pooled.flags.aligned
    assert base(np.frombuffer(wire[0], np.uint8)) <= base(pooled) < base(np.frombuffer(wire[0], np.uint8)) + len(wire[0])
    assert base(large) == base(np.frombuffer(wire[1], np.uint8))
    assert messages_equal(tg, back)


def _first_layout(frames):
    """The same message in the codec's first frame layout: envelope, body, pool, large arrays."""
    head = bytes(memoryview(frames[0]).cast("B"))
    _, _, env_len, body_len = struct.unpack_from("<BBHI", head)
    end = 8 + env_len + body_len
    return [head[8:8 + env_len], head[8 + env_len:end], head[end + (-end % 16):],
            *[bytes(memoryview(f).cast("B")) for f in frames[1:]]]


def test_first_layout_recordings_still_decode():
    tg = make_train_group(length=4096, with_ref=True)
    tg.ref_logprobs[0] = np.arange(OWN_FRAME_MIN_BYTES // 4, dtype=np.float32)
    for msg in (tg, m.Hello("x"), make_rollout(length=4096)):
        env, back = Codec("b").decode(_first_layout(Codec("a").encode(msg)))
        assert env.sender == "a" and messages_equal(msg, back)


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
    ([b"\xc1\x01\x10\x00\x02\x00\x00\x00short"], "malformed"),  # head declares more than the frame has
    ([b"\xc1\x07\x00\x00\x00\x00\x00\x00"], "malformed"),  # unknown layout
    ([struct.pack("<BBHI", 0xC1, 1, 3, 0) + b"abc"], "malformed"),  # envelope bytes that are not one
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
        Codec("r").decode(frames[:1])
    assert e.value.reason == "malformed"


def _wire(frames):
    return [bytes(memoryview(f).cast("B")) for f in frames]


def _addr(frame):
    return np.frombuffer(frame, np.uint8).__array_interface__["data"][0]


def test_pool_buffer_is_reused_only_once_nothing_references_its_frame():
    codec = Codec("s")
    a, b = make_rollout("a", length=4096), make_rollout("b", length=4096)
    fa = codec.encode(a)
    wire_a = _wire(fa)
    fb = codec.encode(b)  # fa still held: b must get another buffer
    assert _addr(fb[0]) != _addr(fa[0])
    assert _wire(fa) == wire_a and messages_equal(codec.decode(fa)[1], a)
    held = np.frombuffer(fa[0], np.uint8)  # a view of the frame keeps the buffer too
    buf_a = _addr(fa[0])
    del fa
    fc = codec.encode(make_rollout("c", length=4096))
    assert _addr(fc[0]) != buf_a and bytes(held) == wire_a[0]
    del held
    fd = codec.encode(b)  # a's buffer is the only one nobody references: reused
    assert _addr(fd[0]) == buf_a and messages_equal(codec.decode(fd)[1], b)
    assert _first_layout(fb)[2] == _first_layout(fd)[2] and messages_equal(codec.decode(fc)[1], make_rollout("c", length=4096))
    addrs = {_addr(f[0]) for f in (fb, fc, fd)}
    del fb, fc, fd
    assert _addr(codec.encode(a)[0]) in addrs  # released buffers are reused, none allocated


def test_pool_buffers_retained_are_bounded():
    codec = Codec("s")
    msg = make_rollout(length=4096)
    held = [codec.encode(msg) for _ in range(2 * POOL_RETAIN_MAX_BYTES // (4096 * 8 * 4) + 8)]
    assert codec._pool_bytes <= POOL_RETAIN_MAX_BYTES
    assert all(messages_equal(codec.decode(f)[1], msg) for f in held)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(MESSAGES, st.booleans()), min_size=1, max_size=8))
def test_frames_kept_while_others_are_encoded_still_decode(msgs):
    """One codec, frames of some messages kept alive across later encodes (pool reuse)."""
    codec, kept = Codec("s"), []
    for msg, keep in msgs:
        frames = codec.encode(msg)
        if keep:
            kept.append((msg, frames))
        else:
            assert messages_equal(codec.decode(frames)[1], msg)
    for msg, frames in kept:
        assert messages_equal(codec.decode(frames)[1], msg)


class _WritableFrame:
    """Stands in for a received zmq.Frame, whose ``buffer`` is a writable memoryview."""

    def __init__(self, data: bytes) -> None:
        self.buffer = memoryview(bytearray(data))


def test_arrays_decoded_from_writable_frames_are_read_only():
    tg = make_train_group(length=4096, with_ref=True)
    tg.ref_logprobs[0] = np.arange(OWN_FRAME_MIN_BYTES // 4, dtype=np.float32)  # own frame
    frames = [_WritableFrame(w) for w in _wire(Codec("a").encode(tg))]
    _, back = Codec("b").decode(frames)
    for arr in (back.ref_logprobs[0], back.scored.rollout.samples[0].token_ids, back.scored.rewards):
        assert not arr.flags.writeable
    assert messages_equal(tg, back)


def _body(*array_fields):
    """A PromptGroup body whose prompt_ids field is the given raw [dtype, shape, ref]."""
    return msgspec.msgpack.encode(["prompt_group", "g", *array_fields, "", "t", 1, 0])


def _env():
    return msgspec.msgpack.encode(m.Envelope(m.SCHEMA_VERSION, 1, "x/0", 0.0, "prompt_group"))


@pytest.mark.parametrize("array, extra, why", [
    (["|O", [2], [0]], [bytes(16)], "object dtype: bytes read as pointers"),
    (["<i4", [2], -1], [b"", bytes(8)], "negative frame reference"),
    (["<i4", [8], [16]], [bytes(32)], "pool slice past the end"),
    (["<i4", [2], [-16]], [bytes(32)], "negative pool offset"),
    (["<i4", [-2, 2], [0]], [bytes(32)], "negative dimension"),
    (["<i4", [2], [0, 1]], [bytes(32)], "pool ref with two offsets"),
    (["|S0", [2], [0]], [bytes(32)], "zero-size dtype"),
    (["<i4", [2**62], b"\x00" * 8], [], "count past any buffer (overflow)"),
    (["<i4", [2**62], [0]], [bytes(32)], "pool count past any buffer"),
    (["not a dtype", [2], [0]], [bytes(32)], "unknown dtype"),
])
def test_bad_array_references_are_malformed(array, extra, why):
    with pytest.raises(DecodeError) as e:
        Codec("r").decode([_env(), _body(array), *extra])
    assert e.value.reason == "malformed", why


def test_unaligned_pool_offsets_still_decode():
    """Frames from other encoders may put arrays off element boundaries: copy-free, correct."""
    pool = bytes(3) + np.arange(4, dtype=np.int32).tobytes()
    _, back = Codec("r").decode([_env(), _body(["<i4", [2, 2], [3]]), pool])
    assert back.prompt_ids.tolist() == [[0, 1], [2, 3]] and not back.prompt_ids.flags.writeable


def test_small_inline_arrays_are_decoded_once_and_shared_read_only():
    """Version spans repeat in every sample: equal small arrays decode to one read-only array
    (per dtype, shape and bytes); a different value, dtype or shape does not share it."""
    import transport.codec as codec

    ro = make_rollout("g", n_samples=4)  # every sample's version_spans is [[0, 0]]
    ro.samples[3].version_spans = np.array([[0, 1]], np.int32)
    dec = Codec("b")
    back = dec.decode(Codec("a").encode(ro))[1]
    again = dec.decode(Codec("a").encode(ro))[1]
    spans = [s.version_spans for s in back.samples]
    assert spans[0] is spans[1] is spans[2] is again.samples[0].version_spans
    assert spans[3] is not spans[0] and spans[3].tolist() == [[0, 1]]
    assert not spans[0].flags.writeable and messages_equal(ro, back)
    flat = m.Rollout(ro.group, [m.Sample(s.token_ids, s.logprobs, np.array([0, 0], np.int32), s.finish_reason)
                                for s in ro.samples], "rollout/0")
    assert dec.decode(Codec("a").encode(flat))[1].samples[0].version_spans.shape == (2,)  # shape is in the key
    for i in range(codec.SMALL_CACHE_ENTRIES + 5):  # bounded: emptied when full
        dec.decode(Codec("a").encode(m.PromptGroup(f"p{i}", np.array([i], np.int64), "", "t", 1, 0)))
    assert len(dec._small) <= codec.SMALL_CACHE_ENTRIES

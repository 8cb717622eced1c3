"""Record → replay reproduces the same typed messages, in order."""

import asyncio

import pytest

import transport
from schemas import messages as m
from stages.testing import make_rollout, messages_equal
from transport.record import StreamRecorder, read_messages, read_stream, replay_into


async def test_record_then_replay_reproduces_typed_messages(tmp_path):
    path = tmp_path / "rollouts.stream"
    sent = [make_rollout(f"g{i}", length=300 + i, seed=i) for i in range(5)] + [m.Progress(3, 3, ["g1"])]
    pull = transport.pull("tcp://127.0.0.1:*", bind=True, sender="reward/0", name="rollouts")
    push = transport.push(pull.address, bind=False, sender="rollout/0")
    rec = StreamRecorder(path)
    pull.taps.append(rec)
    with push, pull:
        for msg in sent:
            await push.send(msg)
        live = [await asyncio.wait_for(pull.recv(), 5) for _ in sent]
    rec.close()

    records = list(read_stream(path))
    assert [r.socket for r in records] == ["rollouts"] * len(sent)
    assert all(a.recv_time <= b.recv_time for a, b in zip(records, records[1:]))
    replayed = [msg for _, _, msg in read_messages(path)]
    assert [type(x) for x in replayed] == [type(x) for x in sent]
    for a, b in zip(live, replayed):
        assert messages_equal(a, b)

    # Feed the recording into a fresh receiver, as `pipeline replay --into` does.
    target = transport.pull("mem://replayed", bind=True, sender="reward/0")
    feeder = transport.push("mem://replayed", bind=False, sender="replayer")
    n = await replay_into(path, feeder.send_frames, speed=None)
    again = [await target.recv() for _ in range(n)]
    assert n == len(sent) and all(messages_equal(a, b) for a, b in zip(live, again))


async def test_replay_at_recorded_pace(tmp_path):
    path = tmp_path / "paced.stream"
    rec = StreamRecorder(path)
    codec = transport.Codec("x/0")
    rec("s", codec.encode(m.Hello("a")))
    await asyncio.sleep(0.2)
    rec("s", codec.encode(m.Hello("b")))
    rec.close()
    got = []

    async def sink(frames):
        got.append(asyncio.get_running_loop().time())

    await replay_into(path, sink, speed=1.0)
    assert got[1] - got[0] == pytest.approx(0.2, abs=0.08)


def test_truncated_last_record_is_dropped(tmp_path):
    path = tmp_path / "cut.stream"
    rec = StreamRecorder(path)
    codec = transport.Codec("x/0")
    for i in range(3):
        rec("s", codec.encode(m.Hello(str(i))))
    rec.close()
    path.write_bytes(path.read_bytes()[:-3])
    assert [msg.nonce for _, _, msg in read_messages(path)] == ["0", "1"]


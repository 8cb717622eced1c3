"""Bus benchmark: our channels (codec + zero-copy frames) against raw pyzmq, TCP loopback.

    python ops/bench/bus.py [--quick]

Two processes: this one sends, a spawned one receives. Three payloads:
(a) 64-byte control messages, (b) a Rollout of 8 samples × 4096 tokens with logprobs,
(c) a 16 MB array payload. For each, "ours" sends the typed message through
``transport.push``/``transport.pull`` (encode on every send, decode on every receive), and
"raw" sends pre-serialized bytes of the same total size through the same pyzmq asyncio
socket type with the same HWM. Throughput is measured at the receiver from the first to the
last message of a timed batch (after a warm-up batch). Each pair runs ``--repeats`` times
(7; ``--quick``: 1), interleaved; the ratio is the median over pairs of ours / the raw run
right after it. Last line:

    bench bus: control_ratio=X rollout_ratio=Y large_ratio=Z rollout_msgs_per_s=N
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import numpy as np
import zmq
import zmq.asyncio

import transport
from schemas import messages as m

HWM = 64
WARMUP_FRACTION = 0.1
FULL_REPEATS = 7
"""Interleaved ours/raw pairs per case. On 2 shared cores (sender, receiver and two ZeroMQ
IO threads) one pair's ratio moves by ±20 %; the median of 7 pairs is what is reported."""
QUICK_REPEATS = 1


def control_msg() -> m.Message:
    return m.Control(m.ControlCommand.PAUSE, "rollout/12", "weights v123456 incoming")


def rollout_msg() -> m.Message:
    rng = np.random.default_rng(0)
    group = m.PromptGroup("run-0-12345", rng.integers(0, 1000, 256, dtype=np.int32), "42", "math", 8, 3)
    samples = [
        m.Sample(rng.integers(0, 150000, 4096, dtype=np.int32), -rng.random(4096, dtype=np.float32),
                 np.array([[0, 3]], np.int32), "length")
        for _ in range(8)
    ]
    return m.Rollout(group, samples, "rollout/0", 1.5)


def large_msg() -> m.Message:
    return m.PromptGroup("big", np.zeros(4 * 1024 * 1024, np.int32), "", "bulk", 1, 0)


CASES = {"control": control_msg, "rollout": rollout_msg, "large": large_msg}
COUNTS = {"control": (60000, 15000), "rollout": (4000, 1000), "large": (240, 60)}  # (full, quick)


def _receiver(mode: str, n: int, conn) -> None:
    async def main() -> None:
        if mode == "ours":
            ch = transport.pull("tcp://127.0.0.1:*", bind=True, sender="bench/recv", hwm=HWM)
            conn.send(ch.address)
            warm = int(n * WARMUP_FRACTION)
            for _ in range(warm):
                await ch.recv()
            t0 = time.perf_counter()
            for _ in range(n - warm):
                await ch.recv()
            t1 = time.perf_counter()
            ch.close()
        else:
            sock = zmq.asyncio.Context.instance().socket(zmq.PULL)
            sock.setsockopt(zmq.RCVHWM, HWM)
            sock.bind("tcp://127.0.0.1:*")
            conn.send(sock.getsockopt(zmq.LAST_ENDPOINT).decode())
            warm = int(n * WARMUP_FRACTION)
            for _ in range(warm):
                await sock.recv_multipart(copy=False)
            t0 = time.perf_counter()
            for _ in range(n - warm):
                await sock.recv_multipart(copy=False)
            t1 = time.perf_counter()
            sock.close(0)
        conn.send((n - warm, t1 - t0))

    transport.run(main())


def _send(mode: str, msg: m.Message, n: int, address: str) -> None:
    async def main() -> None:
        if mode == "ours":
            ch = transport.push(address, bind=False, sender="bench/send", hwm=HWM)
            for _ in range(n):
                await ch.send(msg)
            ch.close()
        else:
            payload = [b"".join(bytes(memoryview(f).cast("B")) for f in transport.Codec("x").encode(msg))]
            sock = zmq.asyncio.Context.instance().socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, HWM)
            sock.setsockopt(zmq.LINGER, 5000)
            sock.connect(address)
            for _ in range(n):
                await sock.send_multipart(payload, copy=False)
            sock.close()

    transport.run(main())


def measure(mode: str, case: str, n: int) -> tuple[float, float]:
    """(messages/s, MB/s) at the receiver."""
    msg = CASES[case]()
    size = sum(len(memoryview(f).cast("B")) for f in transport.Codec("x").encode(msg))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(mode, n, child), daemon=True)
    proc.start()
    address = parent.recv()
    _send(mode, msg, n, address)
    count, seconds = parent.recv()
    proc.join(30)
    rate = count / seconds
    return rate, rate * size / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller batches, one repeat (< 60 s)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    repeats = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS)
    ratios, ours_rates = {}, {}
    for case in CASES:
        n = COUNTS[case][1 if args.quick else 0]
        ours, raw = [], []
        for _ in range(repeats):
            ours.append(measure("ours", case, n))
            raw.append(measure("raw", case, n))
        o = statistics.median(r for r, _ in ours)
        r = statistics.median(r for r, _ in raw)
        ob = statistics.median(b for _, b in ours)
        rb = statistics.median(b for _, b in raw)
        # Each "ours" run is paired with the "raw" run right after it (same machine state);
        # the ratio is the median over pairs, its spread printed beside it.
        pair = sorted(a[0] / b[0] for a, b in zip(ours, raw))
        ratios[case], ours_rates[case] = statistics.median(pair), o
        print(f"{case:8s} ours {o:10.0f} msg/s {ob:9.1f} MB/s | raw pyzmq {r:10.0f} msg/s {rb:9.1f} MB/s"
              f" | ratio {ratios[case]:.2f} (pairs {pair[0]:.2f}-{pair[-1]:.2f})", flush=True)
    print(f"bench bus: control_ratio={ratios['control']:.2f} rollout_ratio={ratios['rollout']:.2f} "
          f"large_ratio={ratios['large']:.2f} rollout_msgs_per_s={ours_rates['rollout']:.0f}")


if __name__ == "__main__":
    main()

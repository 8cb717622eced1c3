"""Bus benchmark: our channels (codec + zero-copy frames) against raw pyzmq, TCP loopback.

    python ops/bench/bus.py [--quick] [--rounds N] [--sessions S]

Two processes: this one sends, a spawned one receives. Three payloads:
(a) 64-byte control messages, (b) a Rollout of 8 samples × 4096 tokens with logprobs,
(c) a 16 MB array payload. For each, "ours" sends the typed message through
``transport.push``/``transport.pull`` (encode on every send, decode on every receive), and
"raw" sends pre-serialized bytes of the same total size through a pyzmq asyncio PUSH/PULL
pair with the same HWM. Both socket pairs live in the same two processes, and the modes
alternate in short batches (~0.1 s), each going first in every other round: the sender
sends a batch on one pair, the receiver times it from its first to its last message and
reports back, then the other mode goes; a warm-up batch of each is left out. On a shared VM the machine's speed drifts within
seconds (separate 0.5 s runs per mode, in fresh processes, gave ratios from 0.55 to 1.4
for identical work); consecutive short batches see the same machine. Each case runs in
``--sessions`` fresh receiver processes (thread placement holds for a process's life and can
favour either mode). Rate of a mode = its messages / its batches' time in a session; ratio =
the median over sessions of ours / raw, each session's beside it. Last line:

    bench bus: control_ratio=X rollout_ratio=Y large_ratio=Z rollout_msgs_per_s=N
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time

import numpy as np
import zmq
import zmq.asyncio

import transport
from schemas import messages as m

HWM = 64
BATCH_S = 0.1
"""Target length of one batch: short enough that consecutive ours/raw batches see the same
machine, long enough (hundreds of messages) that a batch's start-up is noise."""
FULL_ROUNDS, QUICK_ROUNDS = 8, 4
"""Ours/raw batch pairs per session after the warm-up pair."""
FULL_SESSIONS, QUICK_SESSIONS = 5, 2
"""Fresh receiver processes per case. Where the scheduler puts the two processes' threads
(sender, receiver, two zmq IO threads on 2 cores) holds for a process's life and favours
one mode or the other by up to ±30 %; the ratio is the median over sessions."""


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
RATE_GUESS = {"control": 60000, "rollout": 6000, "large": 150}
"""Messages/s the first batch is sized from; then the slower mode's last rate."""


def _receiver(conn) -> None:
    """Binds ours and raw; for each (mode, n) from ``conn``: receive n messages on that pair
    and report (n - 1, seconds from the first to the last); None ends it."""
    async def receive() -> None:
        ours = transport.pull("tcp://127.0.0.1:*", bind=True, sender="bench/recv", hwm=HWM)
        raw = zmq.asyncio.Context.instance().socket(zmq.PULL)
        raw.setsockopt(zmq.RCVHWM, HWM)
        raw.bind("tcp://127.0.0.1:*")
        conn.send((ours.address, raw.getsockopt(zmq.LAST_ENDPOINT).decode()))
        while (job := conn.recv()) is not None:
            mode, n = job
            recv = ours.recv if mode == "ours" else (lambda: raw.recv_multipart(copy=False))
            await recv()
            t0 = time.perf_counter()
            for _ in range(n - 1):
                await recv()
            conn.send((n - 1, time.perf_counter() - t0))
        ours.close()
        raw.close(0)

    transport.run(receive())


def measure_case(case: str, rounds: int) -> tuple[float, float, list[float], int]:
    """(ours msg/s, raw msg/s, per-round ratios, bytes per message) over ``rounds``
    alternating batch pairs after a warm-up pair."""
    msg = CASES[case]()
    frames = transport.Codec("x").encode(msg)
    size = sum(len(memoryview(f).cast("B")) for f in frames)
    payload = [b"".join(bytes(memoryview(f).cast("B")) for f in frames)]
    del frames
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child,), daemon=True)
    proc.start()
    ours_addr, raw_addr = parent.recv()
    totals = {"ours": [0, 0.0], "raw": [0, 0.0]}
    ratios: list[float] = []

    async def send() -> None:
        ours = transport.push(ours_addr, bind=False, sender="bench/send", hwm=HWM)
        raw = zmq.asyncio.Context.instance().socket(zmq.PUSH)
        raw.setsockopt(zmq.SNDHWM, HWM)
        raw.setsockopt(zmq.LINGER, 5000)
        raw.connect(raw_addr)
        n = max(20, int(RATE_GUESS[case] * BATCH_S))
        for r in range(rounds + 1):
            rates = {}
            for mode in ("ours", "raw") if r % 2 else ("raw", "ours"):  # either may go first
                parent.send((mode, n))
                if mode == "ours":
                    for _ in range(n):
                        await ours.send(msg)
                else:
                    for _ in range(n):
                        await raw.send_multipart(payload, copy=False)
                count, seconds = await asyncio.to_thread(parent.recv)
                rates[mode] = count / seconds
                if r:  # round 0 warms both up
                    totals[mode][0] += count
                    totals[mode][1] += seconds
            if r:
                ratios.append(rates["ours"] / rates["raw"])
            n = max(20, int(min(rates.values()) * BATCH_S))
        parent.send(None)
        ours.close()
        raw.close()

    transport.run(send())
    proc.join(30)
    return totals["ours"][0] / totals["ours"][1], totals["raw"][0] / totals["raw"][1], ratios, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sessions and rounds (< 60 s)")
    ap.add_argument("--rounds", type=int, default=None, help=f"ours/raw batch pairs per session (default {FULL_ROUNDS})")
    ap.add_argument("--sessions", type=int, default=None, help=f"receiver processes per case (default {FULL_SESSIONS})")
    args = ap.parse_args()
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else FULL_ROUNDS)
    sessions = args.sessions or (QUICK_SESSIONS if args.quick else FULL_SESSIONS)
    ratios, ours_rates = {}, {}
    for case in CASES:
        runs = [measure_case(case, rounds) for _ in range(sessions)]
        per_session = sorted(o / r for o, r, _, _ in runs)
        o = statistics.median(x[0] for x in runs)
        r = statistics.median(x[1] for x in runs)
        size = runs[0][3]
        ratios[case], ours_rates[case] = statistics.median(per_session), o
        print(f"{case:8s} ours {o:10.0f} msg/s {o * size / 1e6:9.1f} MB/s | raw pyzmq {r:10.0f} msg/s "
              f"{r * size / 1e6:9.1f} MB/s | ratio {ratios[case]:.2f} (sessions: "
              f"{', '.join(f'{x:.2f}' for x in per_session)})", flush=True)
    print(f"bench bus: control_ratio={ratios['control']:.2f} rollout_ratio={ratios['rollout']:.2f} "
          f"large_ratio={ratios['large']:.2f} rollout_msgs_per_s={ours_rates['rollout']:.0f}")


if __name__ == "__main__":
    main()

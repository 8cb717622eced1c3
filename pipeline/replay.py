"""``pipeline replay FILE --into STAGE``: one stage alone, fed a recorded stream.

A temporary run: the supervisor starts only the chosen stage (one replica) with its
brokers; the recording's frames are pushed, unchanged, into the stage's input stream and
whatever the stage emits on its output stream is counted by message tag and optionally
recorded to ``out``. It stops once the input is fed and the output has been quiet for
``quiet_s`` seconds (the first output may take up to ``STARTUP_S``).
"""

from __future__ import annotations

import asyncio
import collections
import tempfile
from pathlib import Path

import zmq
import zmq.asyncio

from schemas.stack import Stack
from transport.record import StreamRecorder, replay_into
from transport.workqueue import WorkPuller

STARTUP_S = 120.0
"""Longest wait for the stage's first output (imports, model build, worker start)."""
STREAMS = {"rollout": ("prompts", "rollouts"), "reward": ("rollouts", "scored"),
           "logprob": ("scored", "train"), "learner": ("train", None)}


async def replay_into_stage(stack: Stack, recording: Path, stage: str, out: Path | None,
                            quiet_s: float) -> dict[str, int]:
    from pipeline.supervisor import Supervisor

    if stage not in STREAMS:
        raise ValueError(f"--into {stage!r}: one of {', '.join(STREAMS)}")
    if not Path(recording).exists():
        raise ValueError(f"{recording}: no such file")
    src, dst = STREAMS[stage]
    stack.rollout.replicas = stack.reward.replicas = stack.logprob.replicas = 1
    stack.learner.world_size = 1
    run_dir = Path(tempfile.mkdtemp(prefix=f"replay-{stage}-"))
    sup = Supervisor(stack, run_dir, only={stage}, shutdown_timeout=10.0)
    counts: collections.Counter[str] = collections.Counter()
    recorder = StreamRecorder(out) if out else None

    async def drive(sup: Supervisor) -> None:
        while not sup.endpoints or src not in sup.brokers:
            await asyncio.sleep(0.05)
        push = zmq.asyncio.Context.instance().socket(zmq.PUSH)
        push.connect(sup.endpoints[f"{src}.front"])
        puller = WorkPuller(sup.endpoints[f"{dst}.back"], sender="replay", credit=64) if dst else None
        if puller is not None and recorder is not None:
            puller.taps.append(recorder)
        counts["input"] = await replay_into(recording, push.send_multipart)
        loop = asyncio.get_running_loop()
        last = loop.time() + STARTUP_S  # the stage needs time to start before its first output
        while loop.time() - last < quiet_s:
            if puller is None:
                await asyncio.sleep(0.2)
                continue
            try:
                env, _ = await asyncio.wait_for(puller.recv_envelope(), 0.2)
                counts[env.tag] += 1
                last = loop.time()
            except asyncio.TimeoutError:
                pass
        push.close(0)
        if puller is not None:
            puller.close()
        sup.stop.set()

    await sup.run(on_tick=drive)
    if recorder is not None:
        recorder.close()
    return dict(counts)

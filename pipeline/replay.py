"""``pipeline replay FILE --into STAGE``: one stage alone, fed a recorded stream.

A temporary run directory and a supervisor restricted to the chosen stage (one replica)
with its in-process brokers; the recording's frames are pushed, unchanged, into the front
of the stage's input stream (rollout←prompts, reward←rollouts, logprob←scored,
learner←train) and whatever the stage emits on its output stream (rollout→rollouts,
reward→scored, logprob→train) is counted by message tag and, with ``out``, recorded to a
stream file. The learner has no output stream: its optimizer steps are counted instead.

It stops once every input item has been handed to the stage by its broker and the output
has then been quiet for ``quiet_s`` seconds; the first output may take up to ``STARTUP_S``
(imports, model build); the learner, which may never complete a step on a short
recording, gets ``quiet_s`` after it took the last item. The stage is shut down like any stack (drain,
then bounded kill), so a replay never leaves a process behind.
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
POLL_S = 0.2
STREAMS = {"rollout": ("prompts", "rollouts"), "reward": ("rollouts", "scored"),
           "logprob": ("scored", "train"), "learner": ("train", None)}
"""Stage → (input stream, output stream)."""


async def replay_into_stage(stack: Stack, recording: Path, stage: str, out: Path | None,
                            quiet_s: float) -> dict[str, int]:
    """Returns counts: ``input`` (frames fed), then one entry per output message tag
    (``learner_steps`` for the learner)."""
    from pipeline.supervisor import Supervisor

    if stage not in STREAMS:
        raise ValueError(f"--into {stage!r}: one of {', '.join(STREAMS)}")
    if not Path(recording).exists():
        raise ValueError(f"{recording}: no such file")
    src, dst = STREAMS[stage]
    stack.rollout.replicas = stack.reward.replicas = stack.logprob.replicas = 1
    stack.learner.world_size = 1
    run_dir = Path(tempfile.mkdtemp(prefix=f"replay-{stage}-"))
    stack.run.dir = str(run_dir)
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
        try:
            counts["input"] = await replay_into(recording, push.send_multipart)
            loop = asyncio.get_running_loop()
            started = loop.time()
            last_output = None  # loop time of the latest output (or learner step)
            consumed_at = None
            while True:
                if sup.failure:
                    return
                if puller is not None:
                    try:
                        env, _ = await asyncio.wait_for(puller.recv_envelope(), POLL_S)
                        counts[env.tag] += 1
                        last_output = loop.time()
                        continue
                    except asyncio.TimeoutError:
                        pass
                else:
                    await asyncio.sleep(POLL_S)
                    if sup.step > counts["learner_steps"]:
                        counts["learner_steps"] = sup.step
                        last_output = loop.time()
                if sup.brokers[src].depth or sup.brokers[src].forwarded < counts["input"]:
                    continue  # the stage has not taken every input item yet
                consumed_at = consumed_at or loop.time()
                if last_output is not None:
                    quiet_since = last_output
                elif puller is None:  # the learner may never step (fewer groups than a step)
                    quiet_since = consumed_at
                else:  # no output yet: allow for the stage's start-up
                    quiet_since = started + STARTUP_S
                if loop.time() - quiet_since >= quiet_s:
                    return
        finally:
            push.close(0)
            if puller is not None:
                puller.close()
            sup.stop.set()

    await sup.run(on_tick=drive)
    if recorder is not None:
        recorder.close()
    if sup.failure:
        raise RuntimeError(f"the {stage} stage failed: {sup.failure}")
    return dict(counts)

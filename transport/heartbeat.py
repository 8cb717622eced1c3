"""Heartbeats: every process tells the supervisor it is alive; the supervisor notices who
stopped.

Invariants:
- ``beat_forever`` sends one ``Heartbeat`` every ``interval`` seconds built by a callable
  (so it always reports current counters); a failed send is logged and retried next tick,
  never raised — a slow supervisor must not kill a stage.
- ``HealthTracker`` is pure: it is fed heartbeats and a clock, and says which senders have
  been silent for longer than ``timeout`` (``starting_timeout`` while the newest heartbeat
  said ``starting``: an engine or model build may hold a stage's event loop for minutes, and
  killing it mid-start only starts the same long build again).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from schemas.messages import Heartbeat
from transport.base import Sender, log

HEARTBEAT_INTERVAL_S = 1.0
"""Once a second: cheap (one ~60-byte message) and detects a hung stage within seconds."""
HEARTBEAT_TIMEOUT_S = 10.0
"""Ten missed beats: long enough to ride out a GC pause or a long learner step."""
STARTING_TIMEOUT_S = 300.0
"""Silence allowed to a replica still starting (vLLM: imports, torch.compile and CUDA-graph
capture on a cold cache took 46-120 s on an H200, more beside a compiling learner)."""


async def beat_forever(channel: Sender, make: Callable[[], Heartbeat],
                       interval: float = HEARTBEAT_INTERVAL_S) -> None:
    while True:
        try:
            await asyncio.wait_for(channel.send(make()), timeout=interval)
        except (asyncio.TimeoutError, OSError) as e:
            log.warning("heartbeat not sent", socket=channel.name, error=repr(e))
        await asyncio.sleep(interval)


class HealthTracker:
    """Last heartbeat per ``stage/replica``; reports the silent ones."""

    def __init__(self, timeout: float = HEARTBEAT_TIMEOUT_S, clock: Callable[[], float] = time.monotonic,
                 starting_timeout: float = STARTING_TIMEOUT_S):
        self.timeout = timeout
        self.starting_timeout = max(starting_timeout, timeout)
        self.clock = clock
        self.last_seen: dict[str, float] = {}
        self.latest: dict[str, Heartbeat] = {}

    def observe(self, hb: Heartbeat) -> None:
        key = f"{hb.stage}/{hb.replica}"
        self.last_seen[key] = self.clock()
        self.latest[key] = hb

    def forget(self, key: str) -> None:
        self.last_seen.pop(key, None)
        self.latest.pop(key, None)

    def silent(self) -> list[str]:
        now = self.clock()
        return sorted(k for k, t in self.last_seen.items()
                      if now - t > (self.starting_timeout if self.latest[k].state == "starting" else self.timeout))

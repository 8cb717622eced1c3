"""Socket addresses of a run: assigned once by ``pipeline up``, written to ``endpoints.json``.

Names (every stage finds its sockets by these):
- work streams, each a credit broker in the supervisor: ``<stream>.front`` (producers
  PUSH-connect) and ``<stream>.back`` (workers DEALER-connect), for ``WORK_STREAMS``;
- broadcasts, each with its sync socket for the ready handshake: ``<topic>`` and
  ``<topic>.sync``, for ``BROADCASTS`` (``progress``: learner rank 0; ``weights``: publisher;
  ``control``: supervisor);
- ``telemetry``: supervisor PULL for heartbeats and metrics; ``supervisor``: ROUTER for
  ``pipeline status``/``scale``; ``learner.dist``: torch.distributed rendezvous (tcp);
  ``publish``: the publisher's PULL for ``WeightsOffer`` (learner) and ``WeightsLoaded``
  (engines); ``weights.dist``: the rendezvous store of the ``nccl`` weight group (served
  by learner rank 0, tcp).

Invariants: addresses given in the stack's ``[addresses]`` win; the rest are free ports on
``run.bind_host`` at assignment time, picked *below* the kernel's ephemeral range
(``free_port``). The stages bind them seconds later; a port from the ephemeral range could be
taken meanwhile as the local port of any outgoing connection (the stages open dozens), and
the stage that binds it would fail with EADDRINUSE, again on every restart. Below that range
only an explicit bind by another program can take it. A restarted stack reuses ``endpoints.json`` only if
asked (``pipeline up`` on an existing run dir reassigns, since old ports may be taken).
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

from schemas.stack import Stack

WORK_STREAMS = ("prompts", "rollouts", "scored", "train")
"""source → rollout → reward → logprob → learner."""
BROADCASTS = ("progress", "weights", "control")
ENDPOINTS_FILE = "endpoints.json"


def names() -> list[str]:
    out = []
    for s in WORK_STREAMS:
        out += [f"{s}.front", f"{s}.back"]
    for b in BROADCASTS:
        out += [b, f"{b}.sync"]
    return out + ["telemetry", "supervisor", "learner.dist", "publish", "weights.dist"]


EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
PORT_SPAN = 12000
"""Ports are drawn from the ``PORT_SPAN`` ports just below the ephemeral range (Linux default
32768: 20768-32767), clear of the well-known ports below 1024."""
PORT_TRIES = 200


def _ephemeral_low() -> int:
    try:
        return int(Path(EPHEMERAL_RANGE_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1", taken: set[int] | None = None) -> int:
    """A TCP port on ``host`` that is free now and lies outside the ephemeral range (see the
    module docstring); ``taken``: ports already handed out (not bound yet) to avoid. Falls
    back to a kernel-chosen port when no candidate binds."""
    low = _ephemeral_low()
    lo, hi = max(1024, low - PORT_SPAN), low - 1
    taken = taken if taken is not None else set()
    for _ in range(PORT_TRIES if hi > lo else 0):
        port = random.randint(lo, hi)
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        taken.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    taken.add(port)
    return port


def assign(stack: Stack) -> dict[str, str]:
    host = stack.run.bind_host
    unknown = set(stack.addresses) - set(names())
    if unknown:
        raise ValueError(f"addresses: unknown socket name(s) {sorted(unknown)}; known: {names()}")
    taken: set[int] = set()
    return {n: stack.addresses.get(n) or f"tcp://{host}:{free_port(host, taken)}" for n in names()}


def save(run_dir: Path, endpoints: dict[str, str]) -> Path:
    path = Path(run_dir) / ENDPOINTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(endpoints, indent=1))
    tmp.replace(path)
    return path


def load(run_dir: Path) -> dict[str, str]:
    return json.loads((Path(run_dir) / ENDPOINTS_FILE).read_text())

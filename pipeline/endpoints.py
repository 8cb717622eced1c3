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
``run.bind_host`` at assignment time. A restarted stack reuses ``endpoints.json`` only if
asked (``pipeline up`` on an existing run dir reassigns, since old ports may be taken).
"""

from __future__ import annotations

import json
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


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def assign(stack: Stack) -> dict[str, str]:
    host = stack.run.bind_host
    unknown = set(stack.addresses) - set(names())
    if unknown:
        raise ValueError(f"addresses: unknown socket name(s) {sorted(unknown)}; known: {names()}")
    return {n: stack.addresses.get(n) or f"tcp://{host}:{_free_port(host)}" for n in names()}


def save(run_dir: Path, endpoints: dict[str, str]) -> Path:
    path = Path(run_dir) / ENDPOINTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(endpoints, indent=1))
    tmp.replace(path)
    return path


def load(run_dir: Path) -> dict[str, str]:
    return json.loads((Path(run_dir) / ENDPOINTS_FILE).read_text())

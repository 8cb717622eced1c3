"""Child-process side of the reward stage's worker pool (runs user code, may be killed).

Started by the scorer as a fresh interpreter running ``serve_fd(FD)`` (a fresh interpreter: nothing
of the stage's threads, sockets or main module is inherited), where ``FD`` is one end of a
``multiprocessing.Pipe`` passed down. Protocol over that pipe (pickled tuples of str/float
between two local processes of the same stage; nothing here crosses the network), one
request at a time, one reply per request:

- on start the child sends ``("ready", pid)``;
- ``("load", spec)`` → ``("ok", None)`` or ``("error", text)``: resolve a reward spec
  (imports happen here, outside any per-sample time limit);
- ``("score", spec, completion_text, answer)`` → ``("ok", reward)`` or ``("error", text)``;
- ``("score_many", spec, [completion_text, ...], answer)`` → one such reply per text, in
  order, each sent as soon as it is computed (the parent times every sample separately,
  and one request per group saves a pipe round trip per sample);
- ``None`` or a closed pipe → the child exits.

Invariants: every request gets exactly one reply unless the child is killed or dies; any
exception (including ``SystemExit`` raised by user code) becomes an ``("error", text)``
reply; a reward that is not a finite real number is an error, never a value. The child
imports only ``stages.tasks`` (no torch), so it starts in well under a second.
"""

from __future__ import annotations

import math
import numbers
import os
from multiprocessing.connection import Connection

from stages.tasks import RewardFn, resolve_reward_fn


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` (message truncated to keep logs and messages small)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text[:500]}" if text else type(exc).__name__


def check_reward_value(value: object) -> float:
    """``value`` as a float, or ``ValueError`` if it is not a finite real number."""
    if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"reward function returned {type(value).__name__} {value!r:.60}, "
                         "expected a finite float")
    return float(value)


def serve(conn: Connection) -> None:
    """Worker main loop: serve requests on ``conn`` until told to stop or the pipe closes."""
    functions: dict[str, RewardFn] = {}
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            if request[0] == "load":
                functions[request[1]] = resolve_reward_fn(request[1])
                conn.send(("ok", None))
            elif request[0] == "score_many":
                _, spec, texts, answer = request
                function = functions.get(spec)
                if function is None:
                    function = functions[spec] = resolve_reward_fn(spec)
                for text in texts:
                    try:
                        conn.send(("ok", check_reward_value(function(text, answer))))
                    except BaseException as exc:  # one sample's failure is that sample's reply
                        conn.send(("error", describe_exception(exc)))
            else:
                _, spec, completion_text, answer = request
                function = functions.get(spec)
                if function is None:
                    function = functions[spec] = resolve_reward_fn(spec)
                conn.send(("ok", check_reward_value(function(completion_text, answer))))
        except BaseException as exc:  # user code: everything becomes a reply, nothing kills the loop
            conn.send(("error", describe_exception(exc)))



def serve_fd(fd: int) -> None:
    """Entry point of the worker interpreter: serve on the inherited pipe end ``fd``."""
    serve(Connection(fd))

"""Keep a stage's tensor-sized allocations in the heap: no page faults on every step.

glibc serves an allocation above its mmap threshold with a fresh ``mmap`` and unmaps it on
free; its threshold starts at 128 KiB and only adapts as blocks are freed, and the heap top
is handed back to the kernel past the trim threshold. A CPU training step allocates and frees
activations of 0.5-3 MiB dozens of times, so every step faults its memory in anew: on the
default stack's learner 6.4k page faults and 12.8 ms of system time per step, with the step
at 94 ms (measured with ``resource.getrusage`` around 20 steps; 0.5 faults and 0.4 ms with
the thresholds below, step 85 ms). Fixed thresholds keep that memory in the process.

Invariants and failure behaviour:
- Only glibc is tuned (``mallopt``); elsewhere (musl, macOS) ``tune_allocator`` does nothing
  and says so in its return value. It never raises.
- A user's own glibc malloc settings (``GLIBC_TUNABLES`` naming malloc, or the older
  ``MALLOC_*_`` variables) win: nothing is changed then.
- Memory a process keeps without returning it is bounded by ``TRIM_THRESHOLD_BYTES`` per
  arena beyond what it uses; blocks of ``MMAP_THRESHOLD_BYTES`` and more are still mapped and
  unmapped one by one (weights, checkpoints), so they never pin memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD_BYTES = 32 << 20
"""Allocations below this come from the heap: every activation of the CPU default stack
(a few MiB at most) does; model-sized buffers above it are still mapped on their own so
freeing them gives the memory back. 32 MiB is glibc's own ceiling for its adaptive threshold."""
TRIM_THRESHOLD_BYTES = 128 << 20
"""Free memory at the heap top kept for reuse rather than trimmed: a few steps' worth of
activations on the CPU default stack."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
"""``mallopt`` parameter numbers (glibc's malloc.h)."""

state = "default"
"""What ``tune_allocator`` did in this process (logged when a stage starts)."""


def _user_tuned(env: dict[str, str]) -> bool:
    return "malloc" in env.get("GLIBC_TUNABLES", "") or any(
        k in env for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))


def tune_allocator(env: dict[str, str] | None = None) -> str:
    """Set glibc's mmap and trim thresholds for this process; returns what was done (also
    kept in ``state``): ``tuned``, ``user settings kept``, ``not glibc`` or ``mallopt refused``."""
    global state
    state = _tune(os.environ if env is None else env)
    return state


def _tune(env: dict[str, str]) -> str:
    if _user_tuned(env):
        return "user settings kept"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return "not glibc"
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):  # musl's mallopt does nothing
        return "not glibc"
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return "tuned" if ok else "mallopt refused"

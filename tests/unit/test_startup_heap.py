"""pipeline.runtime.freeze_startup_heap: a stage's start-up heap leaves the cyclic
collector's full passes, its start-up garbage is freed first, and a stage does it once,
when it opens its first channel."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline import runtime
from schemas.stack import load_stack

ROOT = Path(__file__).resolve().parents[2]

# A start-up heap of 200k tracked objects (a stage with torch and transformers loaded has
# ~380k) and one cycle that became garbage during the start; the collector stays off until
# the freeze so only its own collection can free the cycle.
_FREEZE = textwrap.dedent("""
    import gc, weakref
    gc.disable()
    from pipeline.runtime import freeze_startup_heap
    class Node:
        pass
    heap = [[i] for i in range(200_000)]
    cycle = Node(); cycle.me = cycle
    dead = weakref.ref(cycle)
    del cycle
    freeze_startup_heap()
    gc.enable()
    print(dead() is None, gc.get_freeze_count(), len(gc.get_objects()))
""")


def test_startup_garbage_is_freed_and_the_rest_leaves_full_collections():
    out = subprocess.run([sys.executable, "-c", _FREEZE], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    freed, frozen, tracked = out[0] == "True", int(out[1]), int(out[2])
    assert freed, "a cycle that was garbage at the freeze was kept (frozen objects are never collected)"
    assert frozen > 200_000
    assert tracked < 20_000, f"{tracked} objects still in the generations a full collection walks"


def test_a_stage_freezes_once_when_it_opens_its_first_channel(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(runtime, "freeze_startup_heap", lambda: calls.append(1))
    ctx = runtime.StageContext("reward", 0, tmp_path, load_stack(ROOT / "ops" / "stack.toml"), {})
    assert not ctx.started and calls == []
    ctx._keep(object(), "scored")
    ctx._keep(object(), "rewards")
    assert ctx.started and calls == [1]

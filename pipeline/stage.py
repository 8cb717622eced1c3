"""Process entry point of one stage replica: ``python -m pipeline.stage KIND --run-dir D --replica I``.

``KIND`` is a stage kind (``source``, ``rollout``, ``reward``, ``logprob``, ``learner``,
``publisher``) whose ``stages/<kind>/main.py`` defines ``async run(ctx)``, or a
``module:function`` naming such a coroutine (tests use this for fake stages).

``CONVEYOR_PROFILE_DIR=D`` (environment) runs the replica under cProfile and writes
``D/<name>-<replica>.prof`` when it exits normally (drain). By wall time; with
``CONVEYOR_PROFILE_TIMER=cpu`` by the main thread's CPU time, which is what to read where
stages share few cores (wall time there is mostly waiting to be scheduled). Either way only
the main thread is profiled: work a stage hands to a thread (the learner's steps) is not.

glibc's malloc thresholds are fixed first (``pipeline.malloc``): without it a CPU learner
step faults its activations in anew every step.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import os
import sys
import time
from pathlib import Path

import transport
from pipeline.malloc import tune_allocator
from pipeline.runtime import run_stage

STAGE_KINDS = ("source", "rollout", "reward", "logprob", "learner", "publisher")


def resolve(kind: str):
    if ":" in kind:
        module, func = kind.split(":", 1)
        return getattr(importlib.import_module(module), func)
    if kind not in STAGE_KINDS:
        raise SystemExit(f"unknown stage kind {kind!r}; known: {', '.join(STAGE_KINDS)} or module:function")
    return importlib.import_module(f"stages.{kind}.main").run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pipeline.stage")
    ap.add_argument("kind")
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--replica", type=int, default=0)
    ap.add_argument("--name", default=None, help="stage name in logs (default: kind)")
    args = ap.parse_args(argv)
    tune_allocator()  # before the stage is imported and allocates: every tensor it makes sees it
    body = resolve(args.kind)
    name = args.name or (args.kind if ":" not in args.kind else args.kind.split(":")[1])
    profile_dir = os.environ.get("CONVEYOR_PROFILE_DIR")
    if not profile_dir:
        return transport.run(run_stage(name, args.replica, args.run_dir, body))
    timer = os.environ.get("CONVEYOR_PROFILE_TIMER", "wall")
    if timer not in ("wall", "cpu"):
        raise SystemExit(f"CONVEYOR_PROFILE_TIMER={timer!r}: expected wall or cpu")
    profiler = cProfile.Profile(time.thread_time) if timer == "cpu" else cProfile.Profile()
    try:
        return profiler.runcall(transport.run, run_stage(name, args.replica, args.run_dir, body))
    finally:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(Path(profile_dir) / f"{name.replace('/', '-')}-{args.replica}.prof")


if __name__ == "__main__":
    sys.exit(main())

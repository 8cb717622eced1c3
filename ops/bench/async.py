"""Async against sync: the default stack with ``max_staleness = 0`` and with 2.

    python ops/bench/async.py [--quick] [--steps N] [--stack ops/stack.toml] [--pairs P]

Both runs use ``ops/stack.toml`` with the same seed and the same number of learner steps;
only ``run.max_staleness`` differs. With 0 the source issues one step's worth of groups
and waits for the learner (generation waits for training: synchronous RL); with 2 it keeps
up to three steps' worth in flight. Each run is a real ``pipeline up`` (all processes).

Also printed per run: seconds from launch until the 10-step mean reward first reaches 0.8,
and how many cores the stack kept busy between its first and last step (CPU time of every
process of the stack, from ``/proc``, over that window; Linux only). On a machine of ``C``
cores no schedule beats sync by more than ``C / (sync's cores busy)`` at equal CPU per
sample, which bounds the speedup this bench can show there. Per stage kind, the CPU time
and the minor page faults per step over the same window. And the learner's mean step split
into training and waiting for data (its ``train_s`` and ``wait_s`` metrics, the first step
left out): where async's learner hardly waits, async is bound by the learner and gains at
most sync's step over the learner's training time; where it waits, it is bound by the CPU
the rest of the stack needs, and the cores-busy bound above is the one that counts.
The same split per phase: learning (before the 10-step mean reward first reaches 0.8) and
converged (after), each with its wall time per step; where a phase's two runs both have
one, the pair's speedup in that phase (sync's ms per step over async's). The learner's step
shrinks several-fold once most groups have equal rewards (zero advantage, skipped), so the
two phases are bound by different things. From the sync run alone, each pair also gets the
speedup no schedule of the same work could beat on these cores at sync's CPU per step
(``equal_cpu_bound``): per phase, sync's step over max(the learner's training, the stack's
CPU per step / cores), then over the whole run; a pair above it had a machine that ran
faster during its async run.
samples/s = completions trained between the first and the last step / wall time between
them (start-up excluded); final reward = mean reward of the last 10% of steps. With
``--pairs P`` the two runs are repeated P times, one pair after the other, and the last line
gives medians, the speedup being the median of the pairs' own ratios: on a shared VM the
machine's speed drifts by up to ±20 % within minutes, and a pair run back to back sees
the least of it. Even pairs run sync first, odd pairs async first, so that a steady drift
favours neither mode. Last line:

    bench async: sync_samples_per_s=A async_samples_per_s=B speedup=S sync_final_reward=R0 async_final_reward=R1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

from pipeline.supervisor import usable_cores
from schemas.stack import write_stack_toml

ROOT = Path(__file__).resolve().parents[2]
TARGET_REWARD = 0.8
"""The default stack's promise: mean reward ≥ 0.8 within 10 minutes on 2 CPU cores."""


MIN_PHASE_STEPS = 10
"""A phase of fewer steps gets no figures: a few steps' wall time is mostly noise."""
CPU_POLL_S = 1.0
"""How often the CPU of the stack's processes is read while it runs. A read scans all of
``/proc`` (~2.3 ms of CPU with ~70 processes, at nice 0 beside the stack): every 0.2 s it
took ~1 % of a core from the stack it measured, which costs async (both cores busy) more
than sync; once a second the window still spans all but the run's first and last second."""
CPU_S, FAULTS = 0, 1
"""Indices into a stage kind's (CPU seconds, minor page faults) usage pair."""


def _stage_of(pid: int) -> str:
    """The stage kind a process of the stack runs (``python -m pipeline.stage KIND``), else
    ``supervisor`` (the ``pipeline up`` process and anything else below it)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "supervisor"
    if b"pipeline.stage" in argv:
        i = argv.index(b"pipeline.stage")
        if i + 1 < len(argv):
            return argv[i + 1].decode(errors="replace")
    return "supervisor"


def tree_usage_by_stage(root: int) -> dict[str, tuple[float, int]]:
    """(utime + stime in seconds, minor page faults) of ``root`` and every process below
    it, from ``/proc``, summed by stage kind."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, usage = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d)] = int(fields[1])
        usage[int(d)] = ((int(fields[11]) + int(fields[12])) / tick, int(fields[7]))
    by_stage: dict[str, tuple[float, int]] = {}
    todo = [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        if pid in usage:
            kind = _stage_of(pid)
            cpu, faults = by_stage.get(kind, (0.0, 0))
            by_stage[kind] = (cpu + usage[pid][0], faults + usage[pid][1])
        todo += children.get(pid, [])
    return by_stage


class StepCpu(threading.Thread):
    """Reads the stack's CPU time whenever ``metrics.jsonl`` gains a step: (time, cpu) at
    the first and the latest step before the last one. Processes that exited take their CPU
    with them, so the window must end before the stack stops: the last step starts the
    shutdown, and a read up to ``CPU_POLL_S`` after it can miss stages already gone."""

    def __init__(self, root: int, metrics: Path, steps: int) -> None:
        super().__init__(daemon=True)
        self.root, self.metrics, self.steps = root, metrics, steps
        self.first: tuple[float, dict[str, tuple[float, int]], int] | None = None
        self.last: tuple[float, dict[str, tuple[float, int]], int] | None = None
        """(time, (CPU seconds, page faults) by stage kind, steps logged) at the first and the
        latest read."""
        self.done = threading.Event()

    def run(self) -> None:
        seen = 0
        while not self.done.is_set():
            try:
                n = self.metrics.read_bytes().count(b"\n")
            except OSError:
                n = 0
            if seen < n < self.steps:
                seen = n
                sample = (time.time(), tree_usage_by_stage(self.root), n)
                self.first = self.first or sample
                self.last = sample
            self.done.wait(CPU_POLL_S)

    def usage_by_stage(self, i: int) -> dict[str, float]:
        """``CPU_S`` or ``FAULTS`` (``i``) of each stage kind between the first and the latest
        step."""
        if not self.first or not self.last:
            return {}
        return {k: v[i] - self.first[1].get(k, (0.0, 0))[i] for k, v in self.last[1].items()}

    def per_step(self, i: int) -> dict[str, float]:
        steps = self.last[2] - self.first[2] if self.first and self.last else 0
        return {k: v / steps for k, v in sorted(self.usage_by_stage(i).items())} if steps else {}

    def cores_busy(self) -> float | None:
        if not self.first or not self.last or self.last[0] <= self.first[0]:
            return None
        return sum(self.usage_by_stage(CPU_S).values()) / (self.last[0] - self.first[0])


def target_index(rows: list[dict]) -> int | None:
    """Index of the first metrics row whose 10-step mean reward reaches ``TARGET_REWARD``
    (from the 10th row on), None if none does."""
    rolling = [sum(r["reward_mean"] for r in rows[max(0, i - 9): i + 1]) / min(10, i + 1) for i in range(len(rows))]
    return next((i for i, v in enumerate(rolling) if v >= TARGET_REWARD and i >= 9), None)


def phases(rows: list[dict]) -> dict[str, dict | None]:
    """``learning``: the steps after the first up to the one reaching the target (all but the
    first if none does); ``converged``: the steps after that one. Each as ``_phase``."""
    at = target_index(rows)
    return {"learning": _phase(rows if at is None else rows[: at + 1]),
            "converged": _phase([] if at is None else rows[at:])}


def _phase(rows: list[dict]) -> dict | None:
    """Wall ms per step and the learner's mean training and waiting ms over consecutive
    metrics rows (the first row's step only marks the start); None under ``MIN_PHASE_STEPS``."""
    if len(rows) < MIN_PHASE_STEPS + 1:
        return None
    body = rows[1:]
    return {"steps": (rows[0]["step"] + 1, rows[-1]["step"]),
            "ms_per_step": 1e3 * (rows[-1]["time"] - rows[0]["time"]) / len(body),
            "train_ms": 1e3 * statistics.fmean(r["train_s"] for r in body),
            "wait_ms": 1e3 * statistics.fmean(r["wait_s"] for r in body)}


def equal_cpu_bound(sync: dict, cores: int) -> dict[str, float] | None:
    """The best speedup over the sync run ``sync`` (a ``run`` result) that any schedule of
    the same work could reach on ``cores`` cores spending sync's CPU per step: per phase,
    sync's ms per step over max(sync's learner training per step, the phase's CPU per step /
    ``cores``), and over the whole run (``run``: the phases' step-weighted times). A phase's
    CPU per step is the run's with the learner's training replaced by the phase's (the other
    stages' CPU per step does not depend on how many groups the learner skips: same samples
    per step). None without CPU figures or with a phase lacking figures."""
    total = sum(sync["cpu_ms_per_step"].values())
    if not total or not all(sync["phases"].values()):
        return None
    out, sync_ms, best_ms = {}, 0.0, 0.0
    for name, ph in sync["phases"].items():
        cpu = total - sync["learner_train_ms"] + ph["train_ms"]
        best = max(ph["train_ms"], cpu / cores)
        out[name] = ph["ms_per_step"] / best
        n = ph["steps"][1] - ph["steps"][0] + 1
        sync_ms, best_ms = sync_ms + n * ph["ms_per_step"], best_ms + n * best
    out["run"] = sync_ms / best_ms
    return out


def run(stack: Path, run_dir: Path, steps: int) -> dict:
    cmd = [sys.executable, "-m", "pipeline.cli", "up", str(stack), "--max-steps", str(steps), "--run-dir", str(run_dir)]
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    watch = StepCpu(proc.pid, run_dir / "metrics.jsonl", steps)
    if Path("/proc/self/stat").exists():
        watch.start()
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    watch.done.set()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][:steps]
    at = target_index(rows)
    reached = None if at is None else rows[at]["time"] - started
    elapsed = rows[-1]["time"] - rows[0]["time"]
    trained = sum(r["samples"] for r in rows[1:])
    tail = rows[-max(1, len(rows) // 10):]
    steady = rows[1:] or rows  # the first step's wait is the stack's start-up
    return {"samples_per_s": trained / elapsed, "final_reward": sum(r["reward_mean"] for r in tail) / len(tail),
            "learner_train_ms": 1e3 * statistics.fmean(r["train_s"] for r in steady),
            "learner_wait_ms": 1e3 * statistics.fmean(r["wait_s"] for r in steady),
            "phases": phases(rows),
            "steps": len(rows), "seconds": elapsed, "time_to_target_s": reached, "cores_busy": watch.cores_busy(),
            "cpu_ms_per_step": {k: 1e3 * v for k, v in watch.per_step(CPU_S).items()},
            "faults_per_step": watch.per_step(FAULTS)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30 steps each (< 2 minutes in all)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--stack", type=Path, default=ROOT / "ops" / "stack.toml", help="the stack file both runs start from")
    ap.add_argument("--pairs", type=int, default=1,
                    help="sync/async pairs, run one after the other; the last line gives medians")
    args = ap.parse_args()
    steps = args.steps or (30 if args.quick else 300)
    base = tomllib.loads(args.stack.read_text())
    pairs: list[dict[int, dict]] = []
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:
        for pair in range(args.pairs):
            out = {}
            tag = f"pair {pair}: " if args.pairs > 1 else ""
            # Odd pairs run async first: a machine that drifts one way over a pair then
            # favours neither mode across pairs.
            for staleness in ((0, 2) if pair % 2 == 0 else (2, 0)):
                run_dir = Path(tmp) / f"p{pair}-s{staleness}"
                stack = write_stack_toml(base, Path(tmp) / f"stack-p{pair}-s{staleness}.toml", max_staleness=staleness)
                r = out[staleness] = run(stack, run_dir, steps)
                ttt = f"{r['time_to_target_s']:.0f}s" if r["time_to_target_s"] is not None else "not reached"
                print(f"{tag}max_staleness={staleness}: {r['steps']} steps in "
                      f"{r['seconds']:.1f}s, {r['samples_per_s']:.1f} samples/s, final reward {r['final_reward']:.3f}, "
                      f"reward (10-step mean) >= {TARGET_REWARD} after {ttt} from launch; "
                      f"cores busy between the first and last step: "
                      f"{'n/a' if r['cores_busy'] is None else format(r['cores_busy'], '.2f')} of {usable_cores()}",
                      flush=True)
                busy = r["learner_train_ms"] / max(r["learner_train_ms"] + r["learner_wait_ms"], 1e-9)
                print(f"  learner per step: training {r['learner_train_ms']:.1f} ms, waiting for data "
                      f"{r['learner_wait_ms']:.1f} ms (training {100 * busy:.0f} % of the time)", flush=True)
                if any(r["phases"].values()):
                    print("  per phase: " + "; ".join(
                        f"{name} (steps {ph['steps'][0]}-{ph['steps'][1]}) {ph['ms_per_step']:.1f} ms a step, learner "
                        f"training {ph['train_ms']:.1f} ms and waiting {ph['wait_ms']:.1f} ms"
                        for name, ph in r["phases"].items() if ph is not None), flush=True)
                if r["cpu_ms_per_step"]:
                    print("  CPU ms per step by stage: " + ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_ms_per_step"].items())
                          + f"; total {sum(r['cpu_ms_per_step'].values()):.1f}", flush=True)
                    print("  page faults per step by stage: " + ", ".join(f"{k} {v:.0f}" for k, v in r["faults_per_step"].items())
                          + f"; total {sum(r['faults_per_step'].values()):.0f}", flush=True)
            pairs.append(out)
            by_phase = {name: out[0]["phases"][name]["ms_per_step"] / out[2]["phases"][name]["ms_per_step"]
                        for name in ("learning", "converged") if out[0]["phases"][name] and out[2]["phases"][name]}
            if by_phase:
                print(f"{tag}speedup by phase: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in by_phase.items()), flush=True)
            bound = equal_cpu_bound(out[0], usable_cores())
            if bound:
                print(f"{tag}best speedup at sync's CPU per step: "
                      f"{bound['run']:.2f} (learning {bound['learning']:.2f}, converged {bound['converged']:.2f}); "
                      f"this pair {out[2]['samples_per_s'] / out[0]['samples_per_s']:.2f}", flush=True)
    med = statistics.median
    sync, asyn = med(p[0]["samples_per_s"] for p in pairs), med(p[2]["samples_per_s"] for p in pairs)
    ratios = [p[2]["samples_per_s"] / p[0]["samples_per_s"] for p in pairs]
    if len(pairs) > 1:
        print("speedup of each pair: " + ", ".join(f"{x:.2f}" for x in ratios))
    print(f"bench async: sync_samples_per_s={sync:.1f} async_samples_per_s={asyn:.1f} speedup={med(ratios):.2f} "
          f"sync_final_reward={med(p[0]['final_reward'] for p in pairs):.3f} "
          f"async_final_reward={med(p[2]['final_reward'] for p in pairs):.3f}")


if __name__ == "__main__":
    main()

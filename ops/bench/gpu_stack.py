"""The GPU stack (``ops/gpu.toml``: vLLM + learner on one GPU) for N steps: async against sync.

    python ops/bench/gpu_stack.py [--stack ops/gpu.toml] [--steps 20] [--timeout 240]

Needs CUDA and vLLM. Two real ``pipeline up`` runs (every stage a process) of the same stack
and seed, differing only in ``run.max_staleness``: 0 (the source issues one step's worth of
groups and waits for the learner: synchronous RL) and 2 (up to three steps in flight).
samples/s = completions trained between step ``--warmup`` and the last step / wall time
between them: start-up (vLLM's start, the learner's build) and the first steps are left out,
since they hold one-time costs (on an H200 the first compiled learner step took 114 s and the
gap to the second 11.8 s, against ~1.1 s later; a window that kept them made the sync run
look 3.8x slower than async). ``step_s_median`` is the median time between steps in that
window; ``wait_s``/``train_s``/``publish_s_median`` split the learner's step (its own
metrics). Each run is bounded by ``--timeout`` seconds; a run that does not finish reports
how many steps it made. Each run's stage logs (the last ``LOG_TAIL_BYTES`` of each, in one file
per run: the GPU lane brings back few files) are kept in ``--logs`` (default ``$OUT`` on the
GPU lane), so a failed run can be read afterwards. Last line:

    bench gpu_stack: sync_samples_per_s=A async_samples_per_s=B speedup=S steps=N warmup=W stack=...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the GPU lane runs it with no install
from schemas.stack import write_stack_toml  # noqa: E402

BENCH_SHUTDOWN_S = 20.0
"""Stop budget of each run (``pipeline up --shutdown-timeout``): the stack files give the
learner time for its final checkpoint, which this bench does not need."""
LOG_TAIL_BYTES = 256 * 1024
"""Per stage log kept: the end holds the failure; whole logs of a long run would not all
come back from the GPU machine (its files travel under a size limit)."""


LEARNER_TIMES = ("wait_s", "train_s", "publish_s")
"""The learner's per-step split (``stages/learner/main.py``), reported as medians: async on
one GPU ran only 1.3x sync (~1.0 s a step against ~1.3 s); the split says whether the learner
or its supply of data set that pace."""


def keep_logs(run_dir: Path, dest: Path) -> None:
    """The tail of every stage log of ``run_dir``, one after another, each under a header."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        for f in sorted((run_dir / "logs").glob("*")):
            if f.is_file():
                size = f.stat().st_size
                out.write(f"===== {f.name} ({size} bytes; the last {min(size, LOG_TAIL_BYTES)})\n".encode())
                with open(f, "rb") as src:
                    src.seek(max(0, size - LOG_TAIL_BYTES))
                    out.write(src.read())


def run(stack: Path, run_dir: Path, steps: int, timeout: float, per_step: int, warmup: int) -> dict:
    # The final checkpoint is not part of what is measured: a short stop keeps the run inside
    # its time limit.
    cmd = [sys.executable, "-m", "pipeline.cli", "up", str(stack), "--max-steps", str(steps), "--run-dir", str(run_dir),
           "--shutdown-timeout", str(BENCH_SHUTDOWN_S)]
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGINT)  # the supervisor drains and stops every stage
        try:
            out, _ = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        rc = "timeout"
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    rows = [r for r in rows if "step" in r and "time" in r][:steps]
    res = {"rc": rc, "steps": len(rows), "wall_s": time.time() - t0}
    if rows:
        res.update(first_step_after_s=rows[0]["time"] - t0)
    window = rows[warmup:]
    if len(window) >= 2:
        elapsed = window[-1]["time"] - window[0]["time"]
        gaps = sorted(b["time"] - a["time"] for a, b in zip(window, window[1:]))
        res.update(samples_per_s=sum(r.get("samples", per_step) for r in window[1:]) / elapsed, seconds=elapsed,
                   step_s_median=gaps[len(gaps) // 2],
                   staleness_mean=sum(r.get("staleness_mean", 0.0) for r in window) / len(window))
        # Where the learner's step went (its own metrics): waiting for data (overlapping the
        # previous publish), training, and the previous step's weight publish.
        for key in LEARNER_TIMES:
            vals = sorted(r[key] for r in window if key in r)
            if vals:
                res[f"{key}_median"] = round(vals[len(vals) // 2], 4)
    if rc != 0 or len(window) < 2:
        res["tail"] = out[-3000:]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", default=str(ROOT / "ops" / "gpu.toml"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per run at most")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the measured window")
    ap.add_argument("--only", type=int, choices=(0, 2), default=None,
                    help="run one mode only (max_staleness 0 or 2): its figures, no bench line")
    ap.add_argument("--logs", type=Path, default=Path(os.environ["OUT"]) if "OUT" in os.environ else None,
                    help="keep each run's stage logs here (stack-logs-s<staleness>.txt)")
    a = ap.parse_args()
    base = tomllib.loads(Path(a.stack).read_text())
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-stack-") as tmp:
        for staleness in (0, 2) if a.only is None else (a.only,):
            run_dir = Path(tmp) / f"s{staleness}"
            stack = write_stack_toml(base, Path(tmp) / f"stack-s{staleness}.toml", max_staleness=staleness)
            per_step = base["learner"].get("groups_per_step", 8) * base["source"].get("group_size", 8)
            r = out[staleness] = run(stack, run_dir, a.steps, a.timeout, per_step, a.warmup)
            if a.logs is not None:
                keep_logs(run_dir, a.logs / f"stack-logs-s{staleness}.txt")
            if "tail" in r:
                print(r.pop("tail"))
            print(f"max_staleness={staleness}: " + json.dumps(r), flush=True)
    if a.only is not None:
        sys.exit(0 if "samples_per_s" in out[a.only] else 1)
    s, x = out[0], out[2]
    if "samples_per_s" in s and "samples_per_s" in x:
        print(f"bench gpu_stack: sync_samples_per_s={s['samples_per_s']:.1f} async_samples_per_s={x['samples_per_s']:.1f} "
              f"speedup={x['samples_per_s'] / s['samples_per_s']:.2f} steps={a.steps} warmup={a.warmup} "
              f"stack={Path(a.stack).name}")
    else:
        print(f"bench gpu_stack: FAILED sync_steps={s['steps']} async_steps={x['steps']} "
              f"sync_rc={s['rc']} async_rc={x['rc']} stack={Path(a.stack).name}")
        sys.exit(1)


if __name__ == "__main__":
    main()

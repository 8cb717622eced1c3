"""Runs named GPU-lane steps (tests, benchmarks) one after another within a time budget.

    python3 ops/gpu/driver.py [--budget S] STEP [STEP ...]     (normally via ops/gpu/run.sh)
    python3 ops/gpu/driver.py --list

Each step is a subprocess in its own process group, killed at its time limit (its own limit
or what is left of ``--budget``, whichever is smaller). Everything it prints goes to
``$OUT/log.txt``; lines starting with ``bench `` (benchmarks' last lines), ``figures ``
(figures a GPU test measured) and pytest's summary lines are collected into
``$OUT/summary.txt``, and the JSON figures of tests into ``$OUT/report.jsonl``
(``CONVEYOR_GPU_REPORT``). The summary is printed last, so the `run` tool's reply (the last
12,000 characters) carries it. Three files in ``$OUT`` at most: the tool brings back 8.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PY = sys.executable
# faulthandler_timeout: a test stuck for 120 s dumps every thread's stack into the log (the vLLM
# tests hung once after the engine core started, with nothing in the log to say where).
GPU_TESTS = [PY, "-m", "pytest", "-m", "gpu", "tests", "-q", "-rA", "-p", "no:cacheprovider", "-s",
             "-o", "faulthandler_timeout=120"]

STEPS: dict[str, tuple[list[str], int, str]] = {
    # name: (command, time limit in seconds, what it is)
    "env": ([ "bash", "-c", "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; "
              f"{PY} -c 'import torch, vllm, transformers; print(\"torch\", torch.__version__, \"vllm\", "
              "vllm.__version__, \"transformers\", transformers.__version__, \"gpus\", torch.cuda.device_count())'"],
            60, "GPU, driver and package versions"),
    "tests": (GPU_TESTS, 420, "every test marked gpu (vLLM engine, torch engine on CUDA, senders)"),
    "tests-vllm": (GPU_TESTS[:5] + ["tests/gpu"] + GPU_TESTS[6:], 300, "tests/gpu only (vLLM engine)"),
    "tests-other": (GPU_TESTS + ["--ignore=tests/gpu"], 360, "tests marked gpu outside tests/gpu (torch engine, senders)"),
    "weights": ([PY, "ops/bench/gpu_weights.py"], 300, "bench 1: cuda_ipc update into vLLM vs D2D copy"),
    "nccl": ([PY, "ops/bench/gpu_nccl.py"], 300, "bench 2: nccl update into vLLM vs raw broadcast (2 GPUs)"),
    "generate": ([PY, "ops/bench/gpu_generate.py"], 360, "bench 3: rollout path vs vLLM offline generate"),
    "learner": ([PY, "ops/bench/gpu_learner.py", "--profile"], 420,
                "bench 4: learner tokens/s and MFU per micro-batch budget, eager and compiled; kernel profile"),
    "stack": ([PY, "ops/bench/gpu_stack.py", "--steps", "20", "--timeout", "245"], 540, "bench 5: GPU stack, async vs sync samples/s"),
    "stack-tiny": ([PY, "ops/bench/async.py", "--stack", "ops/gpu-tiny.toml", "--steps", "150"], 300,
                   "the default stack on one GPU (torch engine, cuda_ipc; no vLLM), async vs sync"),
    "learner-profile": ([PY, "ops/bench/gpu_learner.py", "--models", "qwen3-0.6b", "--steps", "3", "--profile"], 200,
                        "bench 4 for 0.6B with the top CUDA kernels of one step"),
    "weights-transports": ([PY, "ops/bench/weights.py", "--transport", "cuda_ipc", "--quick"], 200,
                           "the publisher's cuda_ipc sender into engines (ops/bench/weights.py)"),
    "start-flashinfer": ([PY, "ops/bench/gpu_weights.py", "--start-only", "--flashinfer-sampler"], 300,
                         "engine start with FlashInfer's sampler (the ~100 s JIT)"),
}
KEEP = ("bench ", "figures ", "PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "= ", "step ")


def kill_gpu_leftovers() -> list[int]:
    """Processes a step left on the GPU (stages that started their own sessions, orphaned
    vLLM engine cores) hold its memory for the next step: end them by pid. Everything on the
    GPU machine is this lane's own; this driver's pid is spared."""
    try:
        q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    pids = [int(x) for x in q.split() if x.strip().isdigit() and int(x) != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if pids:
        time.sleep(2)
    return pids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("steps", nargs="*")
    ap.add_argument("--budget", type=float, default=570.0, help="seconds for all steps (the call's limit is 600)")
    ap.add_argument("--list", action="store_true")
    args, extra = ap.parse_known_args()
    if args.list or not args.steps:
        for k, (cmd, limit, what) in STEPS.items():
            print(f"{k:18s} {limit:4d}s  {what}")
        return 0
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        print(f"unknown step(s) {unknown}; known: {', '.join(STEPS)}")
        return 2
    out = Path(os.environ.get("OUT", "/tmp/conveyor-out"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CONVEYOR_GPU_REPORT=str(out / "report.jsonl"), PYTHONUNBUFFERED="1")
    deadline = time.monotonic() + args.budget
    summary: list[str] = []
    rc_all = 0
    with open(out / "log.txt", "a") as log:
        for name in args.steps:
            cmd, limit, what = STEPS[name]
            left = deadline - time.monotonic()
            if left < 20:
                summary.append(f"step {name}: NOT RUN (budget spent)")
                continue
            limit = min(limit, left - 5)
            head = f"\n===== step {name}: {what} (limit {limit:.0f}s) $ {' '.join(cmd)}\n"
            log.write(head)
            log.flush()
            print(head.strip(), flush=True)
            t0 = time.monotonic()
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                 start_new_session=True, bufsize=1)
            lines: list[str] = []
            fired = threading.Event()

            def kill(pid=p.pid):
                fired.set()
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

            timer = threading.Timer(limit, kill)
            timer.start()
            try:
                assert p.stdout is not None
                for line in p.stdout:  # EOF once the step and every child holding the pipe ended
                    log.write(line)
                    lines.append(line.rstrip("\n"))
                    if line.startswith(("bench ", "figures ")):
                        print(line.rstrip(), flush=True)
                p.wait()
            finally:
                timer.cancel()
                try:  # leftovers of the step (vLLM engine cores, spawned ranks)
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            timed_out = fired.is_set()
            left = kill_gpu_leftovers()
            if left:
                lines.append(f"killed leftover GPU processes of this step: {left}")
            rc = p.returncode
            secs = time.monotonic() - t0
            status = "TIMEOUT" if timed_out else ("ok" if rc == 0 else f"rc={rc}")
            if status != "ok":
                rc_all = 1
            summary.append(f"step {name}: {status} in {secs:.0f}s")
            summary += [f"  {x}" for x in lines if x.startswith(KEEP)][-60:]
            if status != "ok":
                summary += ["  last lines:"] + [f"    {x}" for x in lines[-25:]]
            log.flush()
    text = "\n".join(summary)
    (out / "summary.txt").open("a").write(text + "\n")
    print("\n===== summary\n" + text, flush=True)
    return rc_all


if __name__ == "__main__":
    sys.exit(main())

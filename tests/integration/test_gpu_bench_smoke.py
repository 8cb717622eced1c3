"""The GPU benches' own logic, run on the CPU: the learner bench with the tiny model
(variants, the compiled rebuild, FLOP accounting, its last line) and the stack bench on
``ops/stack.toml``. A broken bench should fail here, not after a GPU machine was started
for it. The figures of these runs mean nothing."""

import json
import re
from pathlib import Path

from stages.testing import run_bench

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_learner_bench_runs_its_variants_and_prints_its_line():
    out = run_bench("gpu_learner.py", "--device", "cpu", "--models", "tiny", "--steps", "1", "--groups", "1",
                    "--prompt-len", "4", "--completion-len", "12", "--variants", "64,256,bestc", timeout=600)
    assert len(re.findall(r"^figures gpu_learner tiny \[(64|256|256c|64c)\]: 256 tokens/step \(192 trained\)",
                          out, re.M)) == 3, out[-3000:]
    assert re.search(r"^bench gpu_learner: tiny tokens_per_s=\d+ mfu=[\d.]+ tflops=\d+ step_s=[\d.]+ variant=\w+;$",
                     out, re.M), out[-3000:]


def test_gpu_stack_bench_runs_both_modes_on_the_cpu_stack(tmp_path):
    """The stack bench takes any stack file; on ``ops/stack.toml`` it needs no GPU. Each
    run's stage logs are kept."""
    out = run_bench("gpu_stack.py", "--stack", str(ROOT / "ops/stack.toml"), "--steps", "4", "--warmup", "1",
                    "--timeout", "120", "--logs", str(tmp_path), timeout=400)
    m = re.search(r"^bench gpu_stack: sync_samples_per_s=([\d.]+) async_samples_per_s=([\d.]+) speedup=[\d.]+ "
                  r"steps=4 warmup=1 stack=stack\.toml$", out, re.M)
    assert m and float(m[1]) > 0 and float(m[2]) > 0, out[-3000:]
    for staleness in (0, 2):  # the learner's step split, from its own metrics
        run = json.loads(re.search(rf"^max_staleness={staleness}: (.*)$", out, re.M)[1])
        assert run["train_s_median"] > 0 and run["wait_s_median"] >= 0 and run["publish_s_median"] >= 0, run
    for mode in ("s0", "s2"):
        kept = (tmp_path / f"stack-logs-{mode}.txt").read_text()
        assert "===== rollout-0.jsonl" in kept and "stage started" in kept

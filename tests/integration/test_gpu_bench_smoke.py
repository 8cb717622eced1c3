"""The GPU learner bench's own logic (variants, the compiled rebuild, FLOP accounting, the
last line) on the CPU with the tiny model: a broken bench should fail here, not after a
GPU machine was started for it. The figures of this run mean nothing."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_learner_bench_runs_its_variants_and_prints_its_line():
    p = subprocess.run([sys.executable, str(ROOT / "ops/bench/gpu_learner.py"), "--device", "cpu", "--models", "tiny",
                        "--steps", "1", "--groups", "1", "--prompt-len", "4", "--completion-len", "12",
                        "--variants", "64,256,bestc"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert len(re.findall(r"^figures gpu_learner tiny \[(64|256|256c|64c)\]: 256 tokens/step \(192 trained\)",
                          out, re.M)) == 3, out[-3000:]
    assert re.search(r"^bench gpu_learner: tiny tokens_per_s=\d+ mfu=[\d.]+ tflops=\d+ step_s=[\d.]+ variant=\w+;$",
                     out, re.M), out[-3000:]

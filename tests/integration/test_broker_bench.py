"""``ops/bench/broker.py`` end to end with few items (its figures mean nothing here)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_broker_bench_prints_its_line():
    p = subprocess.run([sys.executable, str(ROOT / "ops/bench/broker.py"), "--items", "500"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    m = re.search(r"^bench broker: items_per_s=(\d+) broker_cpu_us_per_item=([\d.]+) items=500$", out, re.M)
    assert m and int(m[1]) > 0 and float(m[2]) > 0, out[-3000:]

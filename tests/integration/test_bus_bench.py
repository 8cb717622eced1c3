"""``ops/bench/bus.py`` end to end with one short session per case (its figures mean nothing here)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bus_bench_prints_its_line_with_every_case_measured():
    p = subprocess.run([sys.executable, str(ROOT / "ops/bench/bus.py"), "--rounds", "1", "--sessions", "1"],
                       capture_output=True, text=True, timeout=180, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    for case in ("control", "rollout", "large"):  # each case reports its one session
        assert re.search(rf"^{case} +ours +\d+ msg/s .* ratio [\d.]+ \(sessions: [\d.]+\)$", out, re.M), out[-3000:]
    m = re.search(r"^bench bus: control_ratio=([\d.]+) rollout_ratio=([\d.]+) large_ratio=([\d.]+) "
                  r"rollout_msgs_per_s=(\d+)$", out, re.M)
    assert m and all(float(x) > 0 for x in m.groups()), out[-3000:]

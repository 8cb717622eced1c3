"""``ops/bench/bus.py`` end to end with one short session per case (its figures mean nothing here)."""

import re

from stages.testing import run_bench


def test_bus_bench_prints_its_line_with_every_case_measured():
    out = run_bench("bus.py", "--rounds", "1", "--sessions", "1", timeout=180)
    for case in ("control", "rollout", "large"):  # each case reports its one session
        assert re.search(rf"^{case} +ours +\d+ msg/s .* ratio [\d.]+ \(sessions: [\d.]+\)$", out, re.M), out[-3000:]
    m = re.search(r"^bench bus: control_ratio=([\d.]+) rollout_ratio=([\d.]+) large_ratio=([\d.]+) "
                  r"rollout_msgs_per_s=(\d+)$", out, re.M)
    assert m and all(float(x) > 0 for x in m.groups()), out[-3000:]

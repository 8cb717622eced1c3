"""``ops/bench/broker.py`` end to end with few items (its figures mean nothing here)."""

import re

from stages.testing import run_bench


def test_broker_bench_prints_its_line():
    out = run_bench("broker.py", "--items", "500", timeout=120)
    m = re.search(r"^bench broker: items_per_s=(\d+) broker_cpu_us_per_item=([\d.]+) "
                  r"worker_cpu_us_per_item=([\d.]+) items=500$", out, re.M)
    assert m and int(m[1]) > 0 and float(m[2]) > 0 and float(m[3]) > 0, out[-3000:]

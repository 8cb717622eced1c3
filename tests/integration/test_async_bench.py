"""``ops/bench/async.py`` end to end on a few steps and two pairs (its figures mean nothing here)."""

import re
import statistics

from stages.testing import run_bench


def test_async_bench_reports_the_median_of_its_pairs():
    out = run_bench("async.py", "--steps", "6", "--pairs", "2", timeout=300)
    runs = re.findall(r"^pair (\d): max_staleness=(\d): 6 steps in .*? ([\d.]+) samples/s", out, re.M)
    # the second pair runs async first (drift favours neither mode)
    assert [(a, b) for a, b, _ in runs] == [("0", "0"), ("0", "2"), ("1", "2"), ("1", "0")], out[-3000:]
    rate = {(a, b): float(r) for a, b, r in runs}
    split = re.findall(r"^  learner per step: training ([\d.]+) ms, waiting for data ([\d.]+) ms "
                       r"\(training (\d+) % of the time\)$", out, re.M)
    assert len(split) == 4 and all(float(t) > 0 for t, _, _ in split), out[-3000:]
    pairs = re.search(r"^speedup of each pair: ([\d.]+), ([\d.]+)$", out, re.M)
    last = re.search(r"^bench async: sync_samples_per_s=([\d.]+) async_samples_per_s=([\d.]+) speedup=([\d.]+) "
                     r"sync_final_reward=[\d.]+ async_final_reward=[\d.]+$", out, re.M)
    assert pairs and last, out[-3000:]
    assert abs(float(last[1]) - statistics.median([rate["0", "0"], rate["1", "0"]])) < 0.11
    assert abs(float(last[2]) - statistics.median([rate["0", "2"], rate["1", "2"]])) < 0.11
    assert abs(float(pairs[2]) - rate["1", "2"] / rate["1", "0"]) < 0.006  # async over sync, whatever ran first
    assert abs(float(last[3]) - statistics.median([float(pairs[1]), float(pairs[2])])) < 0.011

"""``ops/bench/async.py`` end to end on a few steps and two pairs (its figures mean nothing here)."""

import re
import statistics

from stages.testing import load_bench, run_bench


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


def _rows(rewards, step_s=0.1, train_s=0.06):
    return [{"step": i + 1, "time": 100.0 + step_s * i, "reward_mean": r, "train_s": train_s, "wait_s": step_s - train_s}
            for i, r in enumerate(rewards)]


def test_phases_split_at_the_step_the_10_step_mean_reaches_the_target():
    bench = load_bench("async.py")
    rows = _rows([0.0] * 15 + [1.0] * 40)  # the 10-step mean first reaches 0.8 at row 22 (step 23)
    assert bench.target_index(rows) == 22
    got = bench.phases(rows)
    assert got["learning"]["steps"] == (2, 23) and got["converged"]["steps"] == (24, 55)
    assert abs(got["learning"]["ms_per_step"] - 100.0) < 1e-6 and abs(got["converged"]["train_ms"] - 60.0) < 1e-6
    # never reached: all of it is learning; a phase of fewer than MIN_PHASE_STEPS steps has no figures
    assert bench.phases(_rows([0.0] * 30))["converged"] is None
    assert bench.phases(_rows([0.0] * 30))["learning"]["steps"] == (2, 30)
    assert bench.phases(_rows([0.0] * 15 + [1.0] * 12))["converged"] is None


def test_equal_cpu_bound_takes_the_learner_or_the_cpu_per_core_whichever_binds():
    bench = load_bench("async.py")
    # learning: 50 steps of 120 ms, the learner training 80 ms; converged: 100 steps of 70 ms,
    # training 20 ms. The run's learner mean is 40 ms and its CPU 100 ms a step, so the
    # other stages take 60 ms a step: learning 140 ms of CPU, converged 80.
    sync = {"cpu_ms_per_step": {"learner": 45.0, "rollout": 55.0}, "learner_train_ms": 40.0,
            "phases": {"learning": {"steps": (2, 51), "ms_per_step": 120.0, "train_ms": 80.0, "wait_ms": 40.0},
                       "converged": {"steps": (52, 151), "ms_per_step": 70.0, "train_ms": 20.0, "wait_ms": 50.0}}}
    got = bench.equal_cpu_bound(sync, cores=2)
    assert abs(got["learning"] - 120 / 80) < 1e-9  # the learner binds (80 > 140 / 2)
    assert abs(got["converged"] - 70 / 40) < 1e-9  # the CPU binds (80 / 2 > 20)
    assert abs(got["run"] - (50 * 120 + 100 * 70) / (50 * 80 + 100 * 40)) < 1e-9
    assert bench.equal_cpu_bound(dict(sync, cpu_ms_per_step={}), cores=2) is None
    assert bench.equal_cpu_bound(dict(sync, phases={"learning": sync["phases"]["learning"], "converged": None}), 2) is None

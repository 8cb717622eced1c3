"""``ops/bench/hops.py``: per-hop latencies add up to each group's whole life, end to end."""

import math
import subprocess
import sys
from pathlib import Path

from schemas.messages import RolloutBatch, ScoredBatch, ScoredGroup, TrainBatch, TrainGroup
from stages.testing import load_bench, make_rollout

ROOT = Path(__file__).resolve().parents[2]


def test_hops_split_a_groups_life_and_skip_groups_not_seen_everywhere():
    hops = load_bench("hops.py")
    rollout = make_rollout("g1")
    rollout.gen_seconds = 0.5
    scored = ScoredGroup(rollout, rollout.group.prompt_ids[:4].astype("float32"))
    received = {"rollouts": [(11.2, 11.0, rollout), (20.0, 19.0, make_rollout("g2"))],
                "scored": [(11.6, 11.4, scored)], "train": [(13.0, 11.7, TrainGroup(scored))]}
    out = hops.hop_latencies({"g1": 10.0, "g2": 18.0}, {"g1": 13.5}, received)
    got = {k: [round(x, 6) for x in v] for k, v in out.items()}
    assert got == {"issue_to_generate": [0.5], "generate": [0.5], "to_reward": [0.2], "reward": [0.2],
                   "to_logprob": [0.2], "logprob": [0.1], "wait_for_learner": [1.3], "train": [0.5], "total": [3.5]}
    assert math.isclose(sum(out[h][0] for h in hops.HOPS[:-1]), out["total"][0])


def test_hops_follow_each_group_through_batches():
    hops = load_bench("hops.py")
    rollouts = [make_rollout("g1"), make_rollout("g2")]
    for r in rollouts:
        r.gen_seconds = 0.5
    scored = [ScoredGroup(r, r.group.prompt_ids[:4].astype("float32")) for r in rollouts]
    received = {"rollouts": [(11.2, 11.0, RolloutBatch(rollouts))], "scored": [(11.6, 11.4, ScoredBatch(scored))],
                "train": [(13.0, 11.7, TrainBatch([TrainGroup(g) for g in scored]))]}
    out = hops.hop_latencies({"g1": 10.0, "g2": 10.2}, {"g1": 13.5, "g2": 13.5}, received)
    assert [round(x, 6) for x in out["to_reward"]] == [0.2, 0.2]
    assert [round(x, 6) for x in out["total"]] == [3.5, 3.3]
    # A logprob stage without a reference model relays the ScoredBatch unread (reward's envelope).
    received["train"] = [(13.0, 11.4, ScoredBatch(scored))]
    out = hops.hop_latencies({"g1": 10.0, "g2": 10.2}, {"g1": 13.5, "g2": 13.5}, received)
    assert [round(x, 6) for x in out["logprob"]] == [0.0, 0.0]
    assert [round(x, 6) for x in out["wait_for_learner"]] == [1.4, 1.4]


def test_hops_bench_runs_the_stack_and_prints_its_line():
    p = subprocess.run([sys.executable, str(ROOT / "ops/bench/hops.py"), "--steps", "12"],
                       capture_output=True, text=True, timeout=230, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("bench hops: ")
    figures = dict(kv.split("=") for kv in last.removeprefix("bench hops: ").split())
    assert int(figures["groups"]) > 0
    assert all(math.isfinite(float(figures[f"{h}_ms"])) for h in load_bench("hops.py").HOPS)

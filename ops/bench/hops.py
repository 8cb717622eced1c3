"""Where a group's time goes: per-hop latency of the default stack, from its own recordings.

    python ops/bench/hops.py [--steps N] [--stack FILE] [--staleness S] [--run-dir DIR]

Runs the stack (``ops/stack.toml``, ``max_staleness = 2`` unless told otherwise) for N steps
(default 200) with ``run.record = ["rollouts", "scored", "train"]``. From the source's
``issued.jsonl``, the learner's ``consumed.jsonl`` and the three recordings it then splits
each trained group's life into hops (medians and 90th percentiles, groups of the first
``SKIP_FRACTION`` of the run left out as warm-up):

- ``issue_to_generate``: issued → its generation starts (``Rollout.gen_seconds`` before the
  rollout's send): time in the broker and in the rollout's queue;
- ``generate``: ``Rollout.gen_seconds``;
- ``to_reward``, ``reward``, ``to_logprob``, ``logprob``: each stage's queue and its work;
- ``wait_for_learner``: sent by the logprob stage → taken by the learner's ``collect``
  (a recording is written when a stage takes a message, not when it lands in its socket).
  A logprob stage without a reference model passes messages on unread, under the reward
  stage's envelope: its ``logprob`` hop is then 0 (sent when taken);
- ``train``: taken → its step's end (``consumed.jsonl``).

A stack whose groups wait mostly in ``wait_for_learner`` is learner-bound: more generation
would not make it faster. Last line::

    bench hops: issue_to_generate_ms=.. generate_ms=.. ... train_ms=.. total_ms=.. groups=N

Times mix clocks of one machine (envelope ``sent_at`` of the sender, ``recv_time`` of the
recorder): fine on one host, not across hosts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable
from pathlib import Path

from schemas.messages import (
    GroupFailed, Message, PromptGroup, Rollout, RolloutBatch, ScoredBatch, ScoredGroup, TrainBatch, TrainGroup,
)
from schemas.stack import write_stack_toml
from transport.record import read_messages

ROOT = Path(__file__).resolve().parents[2]
HOPS = ("issue_to_generate", "generate", "to_reward", "reward", "to_logprob", "logprob", "wait_for_learner",
        "train", "total")
RECORDED = ("rollouts", "scored", "train")
"""Streams recorded (at their receiving stage: reward, logprob, learner)."""
SKIP_FRACTION = 0.2
"""Share of the run (by issue order) left out: the first steps compile and warm caches."""


def groups_in(msg: Message) -> list[tuple[str, Message]]:
    """(group id, the group's own message) for each group a work message carries: one, or
    every group of a batch; [] for any other message."""
    match msg:
        case PromptGroup() | GroupFailed():
            return [(msg.group_id, msg)]
        case Rollout():
            return [(msg.group.group_id, msg)]
        case ScoredGroup():
            return [(msg.rollout.group.group_id, msg)]
        case TrainGroup():
            return [(msg.scored.rollout.group.group_id, msg)]
        case RolloutBatch():
            return [g for r in msg.rollouts for g in groups_in(r)]
        case ScoredBatch() | TrainBatch():
            return [g for x in msg.groups for g in groups_in(x)]
    return []


def hop_latencies(issued: dict[str, float], consumed: dict[str, float],
                  received: dict[str, Iterable[tuple[float, float, Message]]]) -> dict[str, list[float]]:
    """Seconds per hop for every group seen on all three streams and trained.
    ``issued``/``consumed``: group id → time of its latest issue / its step's end;
    ``received``: stream (``RECORDED``) → (recv_time, sent_at, message)."""
    seen: dict[str, dict[str, float]] = {}
    for stream in RECORDED:
        for recv_time, sent_at, msg in received.get(stream, ()):
            for gid, group in groups_in(msg):
                d = seen.setdefault(gid, {})
                d[f"{stream}_sent"], d[f"{stream}_recv"] = sent_at, recv_time
                if stream == "rollouts":
                    d["gen"] = group.gen_seconds
                elif stream == "train" and isinstance(group, ScoredGroup):
                    d["relayed"] = 1.0
    for d in seen.values():  # relayed: the envelope is the reward stage's; the logprob stage
        if d.pop("relayed", None) and "scored_recv" in d:  # passed it on when it took it
            d["train_sent"] = d["scored_recv"]
    out: dict[str, list[float]] = {h: [] for h in HOPS}
    for gid, d in seen.items():
        if gid not in issued or gid not in consumed or len(d) != 7:
            continue
        gen_start = d["rollouts_sent"] - d["gen"]
        for hop, value in (("issue_to_generate", gen_start - issued[gid]), ("generate", d["gen"]),
                           ("to_reward", d["rollouts_recv"] - d["rollouts_sent"]),
                           ("reward", d["scored_sent"] - d["rollouts_recv"]),
                           ("to_logprob", d["scored_recv"] - d["scored_sent"]),
                           ("logprob", d["train_sent"] - d["scored_recv"]),
                           ("wait_for_learner", d["train_recv"] - d["train_sent"]),
                           ("train", consumed[gid] - d["train_recv"]), ("total", consumed[gid] - issued[gid])):
            out[hop].append(value)
    return out


def quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def read_run(run_dir: Path) -> dict[str, list[float]]:
    """``hop_latencies`` of a run directory recorded as this module's docstring says."""
    issued_rows = [json.loads(x) for x in (run_dir / "issued.jsonl").read_text().splitlines()]
    issued = {r["group_id"]: r["time"] for r in issued_rows}
    order = list(dict.fromkeys(r["group_id"] for r in issued_rows))
    warm = set(order[: int(SKIP_FRACTION * len(order))])
    consumed = {}
    for line in (run_dir / "consumed.jsonl").read_text().splitlines():
        row = json.loads(line)
        consumed.update({g: row["time"] for g in row.get("consumed", []) if g not in warm})
    received = {}
    for stream in RECORDED:
        recs = []
        for path in sorted((run_dir / "recordings").glob(f"{stream}-*.stream")):
            recs += [(rec.recv_time, env.sent_at, msg) for rec, env, msg in read_messages(path)]
        received[stream] = recs
    return hop_latencies(issued, consumed, received)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--stack", type=Path, default=ROOT / "ops" / "stack.toml")
    ap.add_argument("--staleness", type=int, default=2)
    ap.add_argument("--run-dir", type=Path, default=None, help="keep the run here (default: a temporary dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hops-") as tmp:
        run_dir = args.run_dir or Path(tmp) / "run"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        stack = write_stack_toml(tomllib.loads(args.stack.read_text()), run_dir.parent / "stack.toml",
                                 max_staleness=args.staleness, record=list(RECORDED))
        subprocess.run([sys.executable, "-m", "pipeline.cli", "up", str(stack), "--max-steps", str(args.steps),
                        "--run-dir", str(run_dir)], cwd=ROOT, stdout=subprocess.DEVNULL, check=True)
        hops = read_run(run_dir)
    n = len(hops["total"])
    for hop in HOPS:
        print(f"{hop:18s} median {1e3 * quantile(hops[hop], 0.5):7.1f} ms   p90 {1e3 * quantile(hops[hop], 0.9):7.1f} ms")
    print("bench hops: " + " ".join(f"{h}_ms={1e3 * quantile(hops[h], 0.5):.1f}" for h in HOPS) + f" groups={n}")


if __name__ == "__main__":
    main()

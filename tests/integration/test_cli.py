"""CLI paths against real processes: check, up with fake stages (--max-steps, metrics,\nreward.png), replay one stage on a recording, status and scale."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

from schemas.messages import RolloutBatch, ScoredBatch, ScoredGroup, TrainBatch, TrainGroup
from schemas.stack import write_stack_toml
from transport.codec import Codec
from transport.record import StreamRecorder, read_messages, read_stream

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"


def _replay(stream: Path, stage: str, out: Path, stack: Path = ROOT / "ops" / "stack.toml") -> str:
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "replay", str(stream), "--into", stage, "--out", str(out),
                        "--quiet-s", "3", "--stack", str(stack)], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_replay_recorded_rollouts_into_the_reward_stage(tmp_path):
    out = tmp_path / "scored.stream"
    assert "input: 4" in _replay(DATA / "rollouts.stream", "reward", out)
    expected = json.loads((DATA / "rollouts.expected.json").read_text())
    # Groups scored in the same turn leave together (a ScoredBatch), whatever came in.
    scored = [g for _, _, m in read_messages(out) for g in (m.groups if isinstance(m, ScoredBatch) else [m])]
    got = {g.rollout.group.group_id: g.rewards for g in scored}
    assert len(scored) == 4
    assert got.keys() == expected.keys()
    for gid, rewards in expected.items():
        np.testing.assert_allclose(got[gid], rewards, rtol=1e-6)


def _group_ids(msg) -> list[str]:
    match msg:
        case ScoredBatch() | TrainBatch():
            return [gid for g in msg.groups for gid in _group_ids(g)]
        case ScoredGroup():
            return [msg.rollout.group.group_id]
        case TrainGroup():
            return [msg.scored.rollout.group.group_id]
    return []


def test_batches_pass_reward_and_logprob_whole_and_in_order(tmp_path):
    """A RolloutBatch leaves the reward stage whole, in its order, in one ScoredBatch (with the
    lone Rollout fed beside it when both finish in the same turn); the logprob stage passes
    each message on byte for byte without a reference model, and answers each with one of
    the same groups in the same order with one."""
    rollouts = [msg for _, _, msg in read_messages(DATA / "rollouts.stream")]
    stream = tmp_path / "batched.stream"
    recorder, codec = StreamRecorder(stream), Codec("rollout/0")
    recorder("rollouts", codec.encode(RolloutBatch(rollouts[:3])))
    recorder("rollouts", codec.encode(rollouts[3]))
    recorder.close()
    order = [r.group.group_id for r in rollouts]
    expected = json.loads((DATA / "rollouts.expected.json").read_text())

    assert "input: 2" in _replay(stream, "reward", scored := tmp_path / "scored.stream")
    got = [msg for _, _, msg in read_messages(scored)]
    batch, = (msg for msg in got if order[0] in _group_ids(msg))
    assert isinstance(batch, ScoredBatch)
    assert [gid for gid in _group_ids(batch) if gid in order[:3]] == order[:3]
    groups = [g for msg in got for g in (msg.groups if isinstance(msg, ScoredBatch) else [msg])]
    assert sorted(g.rollout.group.group_id for g in groups) == sorted(order)
    for g in groups:
        np.testing.assert_allclose(g.rewards, expected[g.rollout.group.group_id], rtol=1e-6)

    # No reference model: the logprob stage passes each message on to the learner unread.
    _replay(scored, "logprob", train := tmp_path / "train.stream")
    assert [r.frames for r in read_stream(train)] == [r.frames for r in read_stream(scored)]

    # With a reference model: a TrainBatch per ScoredBatch, same groups, same order.
    raw = tomllib.loads((ROOT / "ops" / "stack.toml").read_text())
    raw["logprob"]["reference"] = True
    _replay(scored, "logprob", ref := tmp_path / "ref.stream", write_stack_toml(raw, tmp_path / "reference.toml"))
    out = [msg for _, _, msg in read_messages(ref)]
    assert [type(x).__name__ for x in out] == [type(x).__name__.replace("Scored", "Train") for x in got]
    assert [_group_ids(x) for x in out] == [_group_ids(x) for x in got]
    for g in (g for msg in out for g in (msg.groups if isinstance(msg, TrainBatch) else [msg])):
        assert [len(x) for x in g.ref_logprobs] == [len(x.token_ids) for x in g.scored.rollout.samples]


def test_status_and_scale_talk_to_a_running_stack(tmp_path):
    stack = tmp_path / "stack.toml"
    stack.write_text("[run]\nname='cli'\n[source]\n[rollout]\nreplicas=1\n[reward]\n[logprob]\n[learner]\n[publisher]\n")
    run_dir = tmp_path / "run"
    driver = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from pipeline.supervisor import Supervisor
        from schemas.stack import load_stack
        from stages.testing import FAKE_TARGETS
        sup = Supervisor(load_stack({str(stack)!r}), Path({str(run_dir)!r}), targets=FAKE_TARGETS)
        async def announce(sup):
            while len(sup.pids()) < 6:
                await asyncio.sleep(0.1)
            print("up", flush=True)
        sys.exit(asyncio.run(sup.run(on_tick=announce)))
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "up"
        cli = [sys.executable, "-m", "pipeline.cli"]
        st = subprocess.run(cli + ["status", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60)
        assert st.returncode == 0 and "rollout" in st.stdout and "learner" in st.stdout
        sc = subprocess.run(cli + ["scale", "rollout", "2", "--run-dir", str(run_dir)], capture_output=True,
                            text=True, timeout=60)
        assert sc.returncode == 0 and "rollout: 2 replica(s)" in sc.stdout
        bad = subprocess.run(cli + ["scale", "learner", "3", "--run-dir", str(run_dir)], capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode == 2 and "cannot scale learner" in bad.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    nobody = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", "--run-dir", str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=60)
    assert nobody.returncode == 2


@pytest.mark.parametrize("body, field", [
    ("[run]\nnme = 'x'\n", "nme"),
    ("[source]\n[rollout]\nreplicas = 'two'\n[reward]\n[logprob]\n[learner]\n[publisher]\n", "rollout.replicas"),
    ("[source]\n[rollout]\n[reward]\n[logprob]\n[publisher]\n", "learner"),
    ("[source]\n[rollout]\nreplicas = 0\n[reward]\n[logprob]\n[learner]\n[publisher]\n", "rollout.replicas"),
    ("[run]\nshutdown_timeout_s = 0\n[source]\n[rollout]\n[reward]\n[logprob]\n[learner]\n[publisher]\n",
     "run.shutdown_timeout_s"),
    # the learner's own rules (LearnerConfig), checked before any process starts
    ("[source]\n[rollout]\n[reward]\n[logprob]\n[learner]\nshared_row_tokens = -1\n[publisher]\n",
     "learner.shared_row_tokens"),
    ("[source]\n[rollout]\n[reward]\n[logprob]\n[learner]\ntis_cap = 1.1\n[publisher]\n", "learner.tis_cap"),
])
def test_broken_stack_files_exit_2_naming_the_field(tmp_path, body, field):
    p = tmp_path / "broken.toml"
    p.write_text(body)
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "check", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert field in r.stdout.replace("\n", "") and str(p.name) in r.stdout.replace("\n", "")


def test_check_accepts_the_default_stack():
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "check", "ops/stack.toml"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok" in r.stdout and "rollout×2" in r.stdout


def test_up_with_fake_stages_stops_after_max_steps_with_metrics_and_plot(tmp_path):
    stack = tmp_path / "stack.toml"
    stack.write_text("[run]\nname='up'\n[source]\n[rollout]\n[reward]\n[logprob]\n[learner]\n[publisher]\n")
    run_dir = tmp_path / "run"
    impl = [f"--stage-impl={k}=stages.testing:{f}" for k, f in
            (("source", "fake_source"), ("rollout", "fake_worker"), ("reward", "fake_worker"),
             ("logprob", "fake_worker"), ("learner", "fake_sink"), ("publisher", "fake_idle"))]
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "up", str(stack), "--max-steps", "3",
                        "--run-dir", str(run_dir), *impl], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "FAKE_ITEMS": "0"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stopped: step 3" in r.stdout
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert {"step", "time", "reward_mean", "samples_per_s", "weight_version", "staleness_mean"} <= rows[0].keys()
    assert (run_dir / "reward.png").stat().st_size > 1000
    assert json.loads((run_dir / "endpoints.json").read_text())["supervisor"].startswith("tcp://")


def _reply():
    from schemas.messages import StageStatus, StatusReply

    return StatusReply(True, "", [StageStatus("rollout", 3, 2, 1, 7, 40, starting=1),
                                  StageStatus("learner", 1, 1, 0, 0, 12)],
                       step=12, weight_version=11, reward_mean=0.5, samples_per_s=123.4, staleness_mean=1.25)


async def test_view_prints_plain_lines_without_a_terminal(monkeypatch, capsys):
    import asyncio

    from pipeline import view

    monkeypatch.setattr(view, "PLAIN_EVERY_S", 0.05)
    task = asyncio.ensure_future(view.watch(_reply, "t", tty=False))
    await asyncio.sleep(0.3)
    task.cancel()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and "\x1b" not in "".join(lines)
    assert "step 12 reward 0.500 samples/s 123.4 weights v11 staleness 1.25" in lines[0]
    assert "rollout=2/3(starting 1)(r1)[q7]" in lines[0] and "learner=1/1 " in lines[0] + " "


def test_status_view_shows_every_figure():
    import io

    from rich.console import Console

    from pipeline.view import status_view

    buf = io.StringIO()
    Console(file=buf, width=100, force_terminal=False).print(status_view(_reply(), "run"))
    text = buf.getvalue()
    for figure in ("12", "0.500", "123.4", "v11", "1.25", "2/3", "40", "starting"):
        assert figure in text, figure

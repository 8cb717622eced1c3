"""RewardScorer: whole groups, misbehaving reward functions, worker recovery, replayed rollouts."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from schemas.messages import PromptGroup, Rollout, Sample
from stages.model import EOS_ID, load_tokenizer
from stages.reward import RewardConfig, RewardScorer
from stages.tasks import TaskSpecError
from transport.record import read_messages

DATA = Path(__file__).resolve().parents[1] / "data"
MISBEHAVING = "misbehaving_rewards:reward"
MISBEHAVING_SOURCE = """
import os, time

def reward(completion_text, answer):
    # The completion text says how to misbehave.
    if completion_text == "hang":
        time.sleep(3600)
    if completion_text == "boom":
        raise ValueError("boom on purpose")
    if completion_text == "nan":
        return float("nan")
    if completion_text == "die":
        os._exit(3)
    return 1.0 if completion_text == answer else 0.25
"""


@pytest.fixture(autouse=True)
def misbehaving_module(tmp_path, monkeypatch):
    """A user reward module outside the package (light to import, like real user code);
    workers inherit ``sys.path``, so they import it too."""
    (tmp_path / "misbehaving_rewards.py").write_text(MISBEHAVING_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    import sys

    sys.modules.pop("misbehaving_rewards", None)


def make_rollout(task: str, answer: str, completions: list[str], group_id: str = "g") -> Rollout:
    tokenizer = load_tokenizer()
    samples = []
    for text in completions:
        ids = np.asarray(tokenizer.encode(text).ids + [EOS_ID], dtype=np.int32)
        samples.append(Sample(ids, np.zeros(len(ids), np.float32), np.zeros((1, 2), np.int32), "stop"))
    group = PromptGroup(group_id, np.asarray([1, 4], np.int32), answer, task, len(samples), 0)
    return Rollout(group, samples, "rollout/0")


async def test_scores_a_group_whole_with_the_task_reward():
    scorer = RewardScorer(RewardConfig(tasks=["repeat"]))
    try:
        rollout = make_rollout("repeat", "7777", ["7777", "77", "1234", "777777"])
        scored = await scorer.score(rollout)
        assert scored.rollout is rollout
        np.testing.assert_allclose(scored.rewards, [1.0, 0.5, 0.0, 4 / 6], rtol=1e-6)
        assert scored.rewards.dtype == np.float32 and scored.reward_errors == [""] * 4
        assert scorer.counters["samples"] == 4 and scorer.counters["errors"] == 0
    finally:
        await scorer.close()


async def test_raising_hanging_or_dying_reward_functions_cannot_stall_the_stage():
    scorer = RewardScorer(RewardConfig(rewards={"custom": MISBEHAVING}, tasks=["custom"],
                                       sample_timeout_s=0.5, num_workers=2))
    try:
        await scorer.start()
        await scorer.score(make_rollout("custom", "ok", ["ok"]))  # workers up and spec loaded
        pids_before = set(scorer.worker_pids)
        started = time.monotonic()
        scored = await scorer.score(make_rollout("custom", "ok", ["ok", "boom", "hang", "no", "nan", "die", "ok"]))
        elapsed = time.monotonic() - started
        assert elapsed < 5.0, elapsed
        np.testing.assert_allclose(scored.rewards, [1.0, 0.0, 0.0, 0.25, 0.0, 0.0, 1.0])
        errors = scored.reward_errors
        assert errors[0] == errors[3] == errors[6] == ""
        assert errors[1] == "ValueError: boom on purpose"
        assert errors[2].startswith("timeout:") and "0.5 s" in errors[2]
        assert "expected a finite float" in errors[4]
        assert "worker died (exit code 3)" in errors[5]
        assert scorer.counters == {"groups": 2, "samples": 8, "errors": 4, "exceptions": 2, "timeouts": 1,
                                   "worker_failures": 1, "unresolved_spec": 0}
        for pid in pids_before - set(scorer.worker_pids):  # replaced workers are gone
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert scorer.worker_restarts == 2
        again = await scorer.score(make_rollout("custom", "ok", ["ok", "no"]))  # the pool recovered
        np.testing.assert_allclose(again.rewards, [1.0, 0.25])
    finally:
        await scorer.close()


async def test_inline_isolation_turns_exceptions_into_errors():
    scorer = RewardScorer(RewardConfig(isolation="inline"))
    scored = await scorer.score(make_rollout(MISBEHAVING, "ok", ["ok", "boom", "nan"]))
    np.testing.assert_allclose(scored.rewards, [1.0, 0.0, 0.0])
    assert scored.reward_errors[1] == "ValueError: boom on purpose"
    assert scorer.counters["exceptions"] == 2


async def test_auto_isolation_scores_builtin_string_rewards_inline_and_user_code_in_workers():
    scorer = RewardScorer(RewardConfig(isolation="auto", tasks=["repeat"], sample_timeout_s=1.0))
    try:
        scored = await scorer.score(make_rollout("repeat", "7777", ["7777", "77"]))
        np.testing.assert_allclose(scored.rewards, [1.0, 0.5])
        assert scorer.worker_pids == []  # a built-in linear-time reward starts no worker
        assert scorer.runs_inline("repeat") and not scorer.runs_inline("arith")
        # user code still gets a killable worker and its time limit
        hung = await scorer.score(make_rollout(MISBEHAVING, "ok", ["ok", "hang"]))
        np.testing.assert_allclose(hung.rewards, [1.0, 0.0])
        assert hung.reward_errors[1].startswith("timeout")
        assert len(scorer.worker_pids) == scorer.config.num_workers
    finally:
        await scorer.close()


async def test_unknown_task_errors_every_sample_and_bad_configured_spec_fails_at_start():
    scorer = RewardScorer(RewardConfig(isolation="inline"))
    scored = await scorer.score(make_rollout("no-such-task", "1", ["1", "2"]))
    assert list(scored.rewards) == [0.0, 0.0]
    assert all(e.startswith("unresolved reward spec:") and "no-such-task" in e for e in scored.reward_errors)
    assert scorer.counters["unresolved_spec"] == 2
    with pytest.raises(TaskSpecError, match="no_module_here"):
        await RewardScorer(RewardConfig(tasks=["no_module_here:f"])).start()


async def test_replayed_rollout_stream_yields_the_expected_rewards():
    expected = json.loads((DATA / "rollouts.expected.json").read_text())
    scorer = RewardScorer(RewardConfig(tasks=["repeat", "copy", "reverse", "arith"]))
    try:
        seen = {}
        for _, envelope, rollout in read_messages(DATA / "rollouts.stream"):
            assert envelope.tag == "rollout"
            scored = await scorer.score(rollout)
            assert scored.reward_errors == [""] * len(rollout.samples)
            seen[rollout.group.group_id] = scored.rewards.tolist()
        assert seen.keys() == expected.keys()
        for group_id, rewards in expected.items():
            np.testing.assert_allclose(seen[group_id], rewards, rtol=1e-6, err_msg=group_id)
    finally:
        await scorer.close()

"""Tasks: prompts, dense rewards, chance level, math_verify scoring, spec resolution."""

import itertools

import pytest

from stages.tasks import (
    ArithTask,
    CopyTask,
    RepeatTask,
    ReverseTask,
    TaskSpecError,
    chance_reward,
    math_verify_reward,
    positional_credit,
    resolve_reward_fn,
    resolve_task,
)
from stages.tasks.arith import load_arith_rows


def test_positional_credit_counts_matches_and_penalises_extra_or_missing_characters():
    assert positional_credit("7777", "7777") == 1.0
    assert positional_credit("7717", "7777") == 0.75
    assert positional_credit("77", "7777") == 0.5
    assert positional_credit("77777777", "7777") == 0.5  # did not stop
    assert positional_credit("", "7777") == 0.0
    assert positional_credit("", "") == 1.0


def test_synthetic_prompts_are_deterministic_and_answers_follow_the_rule():
    for task in (RepeatTask(), CopyTask(), ReverseTask()):
        first = list(itertools.islice(task.prompts(3), 50))
        assert first == list(itertools.islice(task.prompts(3), 50))
        assert first != list(itertools.islice(task.prompts(4), 50))
        for prompt, answer in first:
            digits = prompt[:-1]
            assert digits.isdigit()
            expected = {"repeat": digits[-1] * 4, "copy": digits, "reverse": digits[::-1]}[task.name]
            assert answer == expected
            assert task.reward(answer, answer) == 1.0
            assert len(answer) <= 4


def test_chance_reward_of_synthetic_tasks_is_far_below_a_learned_policy():
    for task in (RepeatTask(), CopyTask(), ReverseTask()):
        chance = chance_reward(task, samples=1000)
        assert 0.0 < chance <= 0.05, (task.name, chance)


def test_arith_set_is_shipped_and_scored_with_math_verify():
    rows = load_arith_rows()
    assert len(rows) == 200 and len(set(rows)) == 200
    for prompt, answer in rows[:5]:
        a, op, b = prompt[:-1].partition("+") if "+" in prompt else prompt[:-1].partition("-")
        assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert math_verify_reward(answer, answer) == 1.0
        assert math_verify_reward(f" {answer} ", answer) == 1.0
        assert math_verify_reward(str(int(answer) + 1), answer) == 0.0
    assert math_verify_reward("19.0", "19") == 1.0
    assert math_verify_reward("", "19") == 0.0
    # nothing parseable on either side: exact string match decides
    assert math_verify_reward("?!", "?!") == 1.0
    assert math_verify_reward("?!", "!?") == 0.0
    assert list(itertools.islice(ArithTask().prompts(0), 200)) != rows  # shuffled per epoch


def test_resolution_by_name_and_by_import_path():
    assert isinstance(resolve_task("repeat"), RepeatTask)
    assert isinstance(resolve_task("stages.tasks.synthetic:ReverseTask"), ReverseTask)
    assert resolve_reward_fn("stages.tasks:positional_credit")("77", "7777") == 0.5
    assert resolve_reward_fn("copy")("12", "12") == 1.0
    with pytest.raises(TaskSpecError, match="not a built-in task"):
        resolve_task("nosuchtask")
    with pytest.raises(TaskSpecError, match="cannot import 'no_such_module_xyz'"):
        resolve_reward_fn("no_such_module_xyz:f")
    with pytest.raises(TaskSpecError, match="has no attribute 'missing'"):
        resolve_reward_fn("stages.tasks:missing")
    with pytest.raises(ValueError, match="has no built-in prompts"):
        next(resolve_task("math").prompts(0))

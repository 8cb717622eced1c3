"""Tasks: prompt streams with their reward functions (see ``stages.tasks.base``).

Built-in: ``repeat`` (default), ``copy``, ``reverse`` (synthetic, dense per-character
credit), ``arith`` (shipped arithmetic set, math_verify), ``math`` and ``exact``
(reward-only, for user datasets). User tasks and reward functions are named by
``package.module:attr``.

This package imports neither torch nor transformers (reward worker processes import it and
must start fast); ``chance_reward`` loads the tokenizer lazily.
"""

from stages.tasks.arith import ArithTask, ExactMatchTask, MathVerifyTask, exact_match_reward, math_verify_reward
from stages.tasks.base import (
    BUILTIN_TASK_NAMES,
    LINEAR_TIME_REWARDS,
    RewardFn,
    Task,
    TaskSpecError,
    chance_reward,
    monte_carlo_chance_reward,
    resolve_reward_fn,
    resolve_task,
)
from stages.tasks.synthetic import CopyTask, RepeatTask, ReverseTask, positional_credit

__all__ = [
    "ArithTask", "BUILTIN_TASK_NAMES", "CopyTask", "ExactMatchTask", "LINEAR_TIME_REWARDS", "MathVerifyTask",
    "RepeatTask",
    "ReverseTask", "RewardFn", "Task", "TaskSpecError", "chance_reward", "exact_match_reward",
    "math_verify_reward", "monte_carlo_chance_reward", "positional_credit", "resolve_reward_fn",
    "resolve_task",
]

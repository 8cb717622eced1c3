"""The ``Task`` protocol, the built-in task registry, and ``module:attr`` resolution.

A task couples a prompt stream with the reward function that checks completions:

- ``prompts(seed)`` yields ``(prompt_text, answer)`` pairs; for a given seed the sequence is
  deterministic, so a source restored at cursor ``c`` regenerates exactly the prompts it
  would have issued (``itertools.islice`` skips the first ``c``). It may be infinite.
- ``reward(completion_text, answer)`` returns a float in ``[0, 1]``; it is a pure function
  of its two strings (so it can run in a worker process) and never needs the prompt.

Resolution rules (``resolve_task`` / ``resolve_reward_fn``), used by the source and the
reward stage with the same spec string:

- a name in ``BUILTIN_TASKS`` (``repeat``, ``copy``, ``reverse``, ``arith``, ``math``,
  ``exact``) → that task;
- ``package.module:attr`` → ``attr`` is imported. For ``resolve_task`` it must be a Task
  instance, or a zero-argument callable (e.g. a class) returning one. For
  ``resolve_reward_fn`` a Task instance contributes its ``reward``; any other callable is
  taken to be the reward function itself, called as ``fn(completion_text, answer)``.

Failure behaviour: an unknown name, a spec without ``:``, a module that fails to import or
an attribute that is missing or of the wrong kind raises ``TaskSpecError`` (a
``ValueError``) naming the spec and the cause. Nothing is retried.

``chance_reward(task)`` estimates the expected reward of a policy that samples uniformly
over the model vocabulary (stopping when it samples EOS, at most ``max_new_tokens``), by
decoding such samples with the shipped tokenizer exactly as the reward stage does. Tasks
may provide an exact ``chance_reward()`` method instead, which takes precedence.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

CHANCE_SAMPLES = 4000
"""Monte-Carlo samples for ``chance_reward``: standard error ≤ 0.008 for rewards in [0, 1]
(≤ 0.5/sqrt(4000)), far below the 0.2 chance ceiling the default stack asserts, and it takes
well under a second."""

CHANCE_VOCAB_SIZE = 128
"""Vocabulary of the built-in ``tiny`` model: a random-init policy samples over all 128
logits, including the 33 ids the 95-token tokenizer does not know (they decode to nothing)."""

CHANCE_MAX_NEW_TOKENS = 8
"""Completion limit of the default stack: the synthetic answers are ≤ 4 characters + EOS."""

RewardFn = Callable[[str, str], float]


class TaskSpecError(ValueError):
    """A task or reward spec that cannot be resolved; the message names the spec."""


@runtime_checkable
class Task(Protocol):
    """A prompt stream and the reward that checks completions of it."""

    name: str

    def prompts(self, seed: int) -> Iterator[tuple[str, str]]:
        """Deterministic (for ``seed``) stream of ``(prompt_text, answer)`` pairs."""
        ...

    def reward(self, completion_text: str, answer: str) -> float:
        """Score in [0, 1] of one completion (special tokens already removed)."""
        ...


def _builtin_tasks() -> dict[str, Callable[[], Task]]:
    from stages.tasks.arith import ArithTask, ExactMatchTask, MathVerifyTask
    from stages.tasks.synthetic import CopyTask, RepeatTask, ReverseTask

    return {
        "repeat": RepeatTask,
        "copy": CopyTask,
        "reverse": ReverseTask,
        "arith": ArithTask,
        "math": MathVerifyTask,
        "exact": ExactMatchTask,
    }


BUILTIN_TASK_NAMES = ("repeat", "copy", "reverse", "arith", "math", "exact")
"""Names ``resolve_task`` accepts without an import path."""

LINEAR_TIME_REWARDS = frozenset({"repeat", "copy", "reverse", "exact"})
"""Built-in specs whose reward is a linear-time comparison of two short strings, with no
import, I/O or parser: they cannot hang, so the reward stage's ``auto`` isolation scores them
on its own thread (a worker round trip cost ~0.5 ms of CPU per group, several per cent of the
default stack's CPU per step). ``arith``/``math`` use math_verify's parser: workers."""


def _import_attr(spec: str) -> object:
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise TaskSpecError(
            f"task/reward spec {spec!r}: not a built-in task ({', '.join(BUILTIN_TASK_NAMES)}) "
            "and not an import path of the form 'package.module:attribute'"
        )
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is reported, not raised raw
        raise TaskSpecError(f"task/reward spec {spec!r}: cannot import {module_name!r}: "
                            f"{type(exc).__name__}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise TaskSpecError(f"task/reward spec {spec!r}: module {module_name!r} has no "
                                f"attribute {attr_path!r}") from exc
    return obj


def resolve_task(spec: str) -> Task:
    """The Task named by ``spec`` (built-in name or ``module:attr``); see module docstring."""
    builtins = _builtin_tasks()
    if spec in builtins:
        return builtins[spec]()
    obj = _import_attr(spec)
    if isinstance(obj, Task) and not isinstance(obj, type):
        return obj
    if callable(obj):
        try:
            made = obj()
        except Exception as exc:
            raise TaskSpecError(f"task spec {spec!r}: calling it raised "
                                f"{type(exc).__name__}: {exc}") from exc
        if isinstance(made, Task):
            return made
        raise TaskSpecError(f"task spec {spec!r}: calling it returned {type(made).__name__}, "
                            "which lacks name/prompts/reward")
    raise TaskSpecError(f"task spec {spec!r}: {type(obj).__name__} is neither a Task nor a "
                        "callable returning one")


def resolve_reward_fn(spec: str) -> RewardFn:
    """The reward function named by ``spec``; see module docstring."""
    builtins = _builtin_tasks()
    if spec in builtins:
        return builtins[spec]().reward
    obj = _import_attr(spec)
    if isinstance(obj, Task) and not isinstance(obj, type):
        return obj.reward
    if callable(obj):
        return obj  # type: ignore[return-value]
    raise TaskSpecError(f"reward spec {spec!r}: {type(obj).__name__} is not callable")


def chance_reward(task: Task, *, vocab_size: int = CHANCE_VOCAB_SIZE,
                  max_new_tokens: int = CHANCE_MAX_NEW_TOKENS, samples: int = CHANCE_SAMPLES,
                  seed: int = 0) -> float:
    """Expected reward of a uniform-random policy over ``vocab_size`` ids (see docstring).

    Uses ``task.chance_reward()`` when the task defines it. Deterministic for a given seed.
    """
    exact = getattr(task, "chance_reward", None)
    if callable(exact):
        return float(exact())
    return monte_carlo_chance_reward(task, vocab_size=vocab_size, max_new_tokens=max_new_tokens,
                                     samples=samples, seed=seed)


def monte_carlo_chance_reward(task: Task, *, vocab_size: int = CHANCE_VOCAB_SIZE,
                              max_new_tokens: int = CHANCE_MAX_NEW_TOKENS,
                              samples: int = CHANCE_SAMPLES, seed: int = 0) -> float:
    """Monte-Carlo estimate of the uniform-random policy's expected reward on ``task``."""
    from stages.model import EOS_ID, load_tokenizer  # lazy: keeps reward workers torch-free

    tokenizer = load_tokenizer()
    rng = random.Random(seed)
    prompt_stream = task.prompts(seed)
    total = 0.0
    for _ in range(samples):
        _, answer = next(prompt_stream)
        ids: list[int] = []
        for _ in range(max_new_tokens):
            token = rng.randrange(vocab_size)
            ids.append(token)
            if token == EOS_ID:
                break
        total += float(task.reward(tokenizer.decode(ids, skip_special_tokens=True), answer))
    return total / samples

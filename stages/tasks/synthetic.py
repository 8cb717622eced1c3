"""Synthetic digit tasks that a random-init 2-layer model learns by RL from scratch on a CPU.

Each prompt is a few digits followed by a separator character; the answer is a short
digit string. Rewards give dense per-character partial credit (``positional_credit``):
the fraction of answer characters that the completion has at the same positions, with the
denominator ``max(len(answer), len(completion))`` so that trailing junk (not stopping) costs
as much as a missing character. A correct completion followed by EOS scores 1.0.

- ``repeat`` (default task): ``"7:"`` → ``"7777"``: the last prompt digit ``repeats`` times.
  Needs attention to one fixed relative position only, so it is the fastest to learn.
- ``copy``: ``"47>"`` → ``"47"``.
- ``reverse``: ``"472<"`` → ``"274"`` (3–4 digits): harder, a check that learning is real.

Invariants: for a given seed, ``prompts(seed)`` is an infinite deterministic stream; the
reward is a pure function of its two strings, in [0, 1], and never raises on any strings.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import msgspec

DIGITS = "0123456789"


def positional_credit(completion: str, expected: str) -> float:
    """Fraction of ``expected``'s characters matched at the same index of ``completion``,
    over ``max(len(expected), len(completion))`` (1.0 when both are empty)."""
    span = max(len(expected), len(completion))
    if span == 0:
        return 1.0
    hits = sum(1 for got, want in zip(completion, expected) if got == want)
    return hits / span


class RepeatTask(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``"<digits>:"`` → the last digit repeated ``repeats`` times."""

    name: str = "repeat"
    """Task name carried in ``PromptGroup.task``."""
    prompt_digits: int = 1
    """Digits in the prompt; only the last one matters. 1 gives 10 distinct prompts, the
    quickest to learn; 2 adds a distractor digit."""
    repeats: int = 4
    """Length of the answer; 4 keeps completions at 4 tokens + EOS so CPU RL is fast."""

    def prompts(self, seed: int) -> Iterator[tuple[str, str]]:
        rng = random.Random(f"{self.name}-{seed}")
        while True:
            digits = "".join(rng.choice(DIGITS) for _ in range(self.prompt_digits))
            yield f"{digits}:", digits[-1] * self.repeats

    def reward(self, completion_text: str, answer: str) -> float:
        return positional_credit(completion_text, answer)


class CopyTask(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``"<digits>>"`` → the same digits."""

    name: str = "copy"
    """Task name carried in ``PromptGroup.task``."""
    digits: int = 2
    """Digits to copy; 2 keeps the answer at 2 tokens + EOS."""

    def prompts(self, seed: int) -> Iterator[tuple[str, str]]:
        rng = random.Random(f"{self.name}-{seed}")
        while True:
            digits = "".join(rng.choice(DIGITS) for _ in range(self.digits))
            yield f"{digits}>", digits

    def reward(self, completion_text: str, answer: str) -> float:
        return positional_credit(completion_text, answer)


class ReverseTask(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``"<digits><"`` → the digits reversed; the length is drawn per prompt."""

    name: str = "reverse"
    """Task name carried in ``PromptGroup.task``."""
    min_digits: int = 3
    """Shortest digit string."""
    max_digits: int = 4
    """Longest digit string (answers stay ≤ 4 tokens + EOS)."""

    def prompts(self, seed: int) -> Iterator[tuple[str, str]]:
        rng = random.Random(f"{self.name}-{seed}")
        while True:
            length = rng.randint(self.min_digits, self.max_digits)
            digits = "".join(rng.choice(DIGITS) for _ in range(length))
            yield f"{digits}<", digits[::-1]

    def reward(self, completion_text: str, answer: str) -> float:
        return positional_credit(completion_text, answer)

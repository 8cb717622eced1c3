"""Batched sampling with counter-based noise: reproducible per sequence, whatever the batch.

Each row carries a 64-bit ``key`` (from the request's seed and the sample's index) and a
``count`` (tokens it has sampled so far). Its Gumbel noise over the vocabulary is a pure
function of ``(key, count, token id)`` — splitmix64 in int64 tensor arithmetic — so a row
draws the same token whether it shares the step with 0 or 63 others, and the whole batch
is sampled in a handful of tensor ops (no per-row generator calls). vLLM's GPU sampler
does the same with per-request seeds and positions.

Invariants:
- ``token = argmax(log p_filtered + gumbel)`` samples exactly from ``p_filtered``: the
  distribution ``softmax(logits / T)`` restricted to the top-p nucleus (the smallest set
  of most likely tokens whose mass reaches ``top_p``; the most likely token is always in).
- The returned logprob is ``log_softmax(logits / T)[token]`` computed from the same logits
  tensor, before top-p (see ``base`` for why). Rows with ``T < GREEDY_TEMPERATURE`` take the
  argmax and report ``log_softmax(logits)[token]``.
"""

from __future__ import annotations

import torch

from stages.rollout.engines.base import GREEDY_TEMPERATURE

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
"""splitmix64's increment (2^64 / golden ratio): consecutive counters map far apart."""
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
"""splitmix64's finalizer multipliers (Steele, Lea, Flood 2014)."""


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def mix64(*values: int) -> int:
    """splitmix64 of a tuple of ints (Python side), as a signed int64."""
    z = 0
    for v in values:
        z = (z + _GOLDEN + (v & _MASK64)) & _MASK64
        z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
        z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
        z ^= z >> 31
    return _signed(z)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _finalize(z: torch.Tensor) -> torch.Tensor:
    # int64 multiply wraps modulo 2^64, which is what the unsigned reference computes.
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return z ^ _shr(z, 31)


def gumbel_noise(keys: torch.Tensor, counts: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 ``[b, vocab]`` standard Gumbel noise, a pure function of (key, count, id)."""
    row = _finalize(keys + counts * _signed(_GOLDEN))
    z = _finalize(row[:, None] + torch.arange(1, vocab + 1, device=keys.device)[None] * _signed(_GOLDEN))
    u = (_shr(z, 11).to(torch.float64) + 0.5) * 2.0**-53  # 53 random bits, strictly in (0, 1)
    return (-torch.log(-torch.log(u))).to(torch.float32)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, keys: torch.Tensor,
           counts: torch.Tensor, any_top_p: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (int64 ``[b]``) and their logprobs (float32 ``[b]``) for fp32 ``logits [b, V]``.
    ``any_top_p``: some row has ``top_p < 1`` (saves the sort when none does)."""
    greedy = temperature < GREEDY_TEMPERATURE
    logp = torch.log_softmax(logits / torch.where(greedy, 1.0, temperature)[:, None], dim=-1)
    filtered = logp
    if any_top_p:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        sorted_p = sorted_logp.exp()
        drop_sorted = sorted_p.cumsum(-1) - sorted_p >= top_p[:, None]  # mass before it already enough
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        filtered = logp.masked_fill(drop, float("-inf"))
    score = filtered + gumbel_noise(keys, counts, logits.shape[1])
    score = torch.where(greedy[:, None], logp, score)
    tokens = score.argmax(dim=-1)
    return tokens, logp.gather(1, tokens[:, None])[:, 0]

"""Policy-gradient losses: GRPO advantages, PPO clipping, truncated importance sampling, KL.

All functions work on flat per-token tensors of one micro-batch plus a per-token weight
that already holds the aggregation (token-mean or sequence-mean, normalised over the
whole step on every rank), so summing micro-batch losses gives the step loss exactly.

Notation: π = trainer probability of the sampled token (with gradient), μ = behaviour
(engine) probability recorded at sampling time, A = advantage, C = ``tis_cap``.

Invariants:
- ``grpo``: per token ``-min(π/μ, C) · (π / sg(π)) · A``; the value is ``-min(π/μ, C)·A``
  and the gradient is the truncated-importance-weighted policy gradient. The weight corrects
  both staleness and the engine/trainer numerical mismatch; C bounds its variance.
- ``ppo``: ``-min(r A, clip(r, 1-ε_low, 1+ε_high) A)`` with ``r = π/μ``; for A < 0 the loss is
  additionally bounded by ``-C·A`` (dual clip), so a token the trainer finds far likelier than
  the engine did cannot dominate the step: this is PPO's truncated-IS.
- KL to the reference uses the k3 estimator ``exp(ref-logπ) - (ref-logπ) - 1`` (≥ 0).
- Tokens with weight 0 (prompt, padding) contribute nothing to the loss or the metrics.
- Metrics are sums (or maxima/minima) so they can be reduced across ranks once per step.

Failure behaviour: an unknown ``kind`` raises ``ValueError``; non-finite inputs propagate
to the loss (the trainer's collective non-finite-gradient skip handles them).
"""

from __future__ import annotations

import numpy as np
import torch

ADV_EPS = 1e-6
"""Guards the std normalisation of a group whose rewards are all equal (advantage 0)."""

SUM_METRICS = ("tokens", "logprob_gap_abs_sum", "is_weight_sum", "is_truncated_tokens", "clipped_tokens", "kl_sum")
"""Per-micro-batch metrics that add up over micro-batches and ranks."""
MAX_METRICS = ("logprob_gap_abs_max", "is_weight_max")
"""Metrics reduced with max over micro-batches and ranks."""
MIN_METRICS = ("is_weight_min",)
"""Metrics reduced with min over micro-batches and ranks."""


def grpo_advantages(rewards: np.ndarray) -> np.ndarray:
    """Group-normalised advantages ``(r - mean) / (std + eps)`` (population std); float32 [G]."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.size == 0:
        return np.zeros(0, np.float32)
    return ((r - r.mean()) / (r.std() + ADV_EPS)).astype(np.float32)


def policy_loss(logp: torch.Tensor, behaviour_logp: torch.Tensor, adv: torch.Tensor, weight: torch.Tensor, *,
                kind: str, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, tis_cap: float = 2.0,
                ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted loss sum and metric sums/max/min for one micro-batch (all inputs flat [N])."""
    live = weight > 0
    log_ratio = logp.detach() - behaviour_logp
    is_weight = torch.exp(log_ratio)
    if kind == "grpo":
        truncated = torch.clamp(is_weight, max=tis_cap)
        per_token = -truncated * torch.exp(logp - logp.detach()) * adv
        clipped = is_weight > tis_cap
        is_truncated = clipped
    elif kind == "ppo":
        ratio = torch.exp(logp - behaviour_logp)
        unclipped = -ratio * adv
        clipped_obj = -torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * adv
        per_token = torch.maximum(unclipped, clipped_obj)
        clipped = clipped_obj > unclipped
        dual_bound = -tis_cap * adv
        is_truncated = (adv < 0) & (per_token > dual_bound)
        per_token = torch.where(is_truncated, dual_bound, per_token)
    else:
        raise ValueError(f"unknown loss {kind!r} (expected 'grpo' or 'ppo')")
    gap = log_ratio.abs()
    live_f = live.float()
    # Masked reductions without boolean indexing: no device->host sync per micro-batch.
    # Empty is a shape fact; gap and is_weight are >= 0, so 0 is a neutral default for max.
    empty = logp.numel() == 0
    metrics = {
        "tokens": live_f.sum(),
        "logprob_gap_abs_sum": (gap * live_f).sum(),
        "logprob_gap_abs_max": torch.zeros(()) if empty else torch.where(live, gap, 0.0).max(),
        "is_weight_sum": (is_weight * live_f).sum(),
        "is_weight_max": torch.zeros(()) if empty else torch.where(live, is_weight, 0.0).max(),
        "is_weight_min": torch.full((), float("inf")) if empty
        else torch.where(live, is_weight, float("inf")).min(),
        "is_truncated_tokens": (is_truncated.float() * live_f).sum(),
        "clipped_tokens": (clipped.float() * live_f).sum(),
    }
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + kl_coef * kl
        metrics["kl_sum"] = (kl.detach() * live_f).sum()
    return (per_token * weight).sum(), metrics

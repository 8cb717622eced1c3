"""Policy-gradient losses: GRPO advantages, PPO clipping, truncated importance sampling, KL.

All functions work on flat per-token tensors of one micro-batch plus a per-token weight
that already holds the aggregation (token-mean or sequence-mean, normalised over the
whole step on every rank), so summing micro-batch losses gives the step loss exactly.

Invariants:
- ``grpo``: loss per token ``-w_tis * (π/π.detach()) * A``, where ``w_tis = min(π/μ, cap)``
  corrects for the engine (behaviour, μ) and trainer (π) mismatch and for staleness;
  the gradient equals the importance-weighted policy gradient.
- ``ppo``: ``-min(r A, clip(r, 1-ε, 1+ε) A)`` with ``r = π/μ`` (behaviour = engine logprobs).
- KL to the reference uses the k3 estimator ``exp(ref-π) - (ref-π) - 1`` (≥ 0, unbiased).
- Metrics are sums (not means) so they can be all-reduced once per step.
"""

from __future__ import annotations

import numpy as np
import torch

ADV_EPS = 1e-6
"""Guards the std normalisation of a group whose rewards are all equal (advantage 0)."""


def grpo_advantages(rewards: np.ndarray) -> np.ndarray:
    """Group-normalised advantages: (r - mean) / (std + eps); float32 [G]."""
    r = np.asarray(rewards, dtype=np.float64)
    return ((r - r.mean()) / (r.std() + ADV_EPS)).astype(np.float32)


def policy_loss(logp: torch.Tensor, behaviour_logp: torch.Tensor, adv: torch.Tensor, weight: torch.Tensor, *,
                kind: str, clip_eps: float, tis_cap: float, ref_logp: torch.Tensor | None = None,
                kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted loss sum and metric sums for one micro-batch (all inputs flat [N])."""
    log_ratio = logp.detach() - behaviour_logp
    is_weight = torch.exp(log_ratio)
    if kind == "grpo":
        w = torch.clamp(is_weight, max=tis_cap)
        per_token = -w * torch.exp(logp - logp.detach()) * adv
        clipped = (is_weight > tis_cap).float()
    elif kind == "ppo":
        ratio = torch.exp(logp - behaviour_logp)
        unclipped, clipped_obj = ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
        per_token = -torch.minimum(unclipped, clipped_obj)
        clipped = (clipped_obj < unclipped).float()
    else:
        raise ValueError(f"unknown loss {kind!r}")
    metrics = {
        "tokens": (weight > 0).float().sum(),
        "logprob_gap_abs": (log_ratio.abs() * (weight > 0)).sum(),
        "is_weight_sum": (is_weight * (weight > 0)).sum(),
        "is_weight_max": (is_weight * (weight > 0)).max() if weight.numel() else torch.zeros(()),
        "clipped_tokens": (clipped * (weight > 0)).sum(),
    }
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + kl_coef * kl
        metrics["kl_sum"] = (kl.detach() * (weight > 0)).sum()
    return (per_token * weight).sum(), metrics

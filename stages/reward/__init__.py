"""Reward stage: scores rollouts with reward functions in killable worker processes.

``RewardScorer`` (pure logic) and ``RewardConfig`` live in ``stages.reward.scorer``; the
worker child in ``stages.reward.worker``. See those modules for invariants.
"""

from stages.reward.scorer import RewardConfig, RewardScorer

__all__ = ["RewardConfig", "RewardScorer"]

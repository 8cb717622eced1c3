"""``LearnerConfig``: every knob of the learner's training logic, validated in one place.

The stack file's ``[learner]`` section (``schemas.stack.LearnerSection``) holds the subset a
user sets there; ``LearnerConfig.from_section`` fills the rest (model name, staleness,
seed, device) from the other stack sections, so the shell and the tests build the same
object.

Invariants and failure behaviour:
- ``validate()`` raises ``ValueError`` naming the field (``learner.<field>``) and the rule;
  ``Learner`` calls it before building anything, so a bad config never costs a model load.
- Defaults train the built-in ``tiny`` model on CPU in fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import msgspec

from schemas.stack import LearnerSection, Stack
from stages.learner.batch import SHARED_ROW_TOKENS


class LearnerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str = "tiny"
    """Built-in model shape or local HF checkpoint directory (``stages.model.build_model``)."""
    device: str = "cpu"
    """``cpu`` or ``cuda`` / ``cuda:N``; a rank's tensors live there."""
    lr: float = 1e-3
    """AdamW peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_steps: int = 0
    """Linear LR warm-up over this many applied updates (skipped steps do not count)."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """LR after warm-up: constant, or cosine / linear decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    total_steps: int = 0
    """Applied updates at which a decaying schedule reaches its floor (needed by cosine/linear)."""
    min_lr_ratio: float = 0.0
    """Floor of a decaying schedule, as a fraction of ``lr``."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip (over all ranks' shards)."""
    loss: Literal["grpo", "ppo"] = "grpo"
    """``grpo``: importance-weighted policy gradient with group-normalised advantages;
    ``ppo``: clipped objective on the ratio trainer/behaviour (engine) probability."""
    clip_eps_low: float = 0.2
    """PPO: the ratio is clipped below at ``1 - clip_eps_low``."""
    clip_eps_high: float = 0.2
    """PPO: the ratio is clipped above at ``1 + clip_eps_high`` (raise it for DAPO-style clip-higher)."""
    tis_cap: float = 2.0
    """Truncated importance sampling cap C: GRPO weights a token by ``min(π/μ, C)``; PPO applies
    C as the dual-clip bound for negative advantages. Must exceed ``1 + clip_eps_high``."""
    kl_coef: float = 0.0
    """Weight of the k3 KL estimate to the reference model (0 disables; needs ref logprobs)."""
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    """Token losses averaged over all completion tokens of the step, or per sequence then over sequences."""
    micro_batch_tokens: int = 4096
    """Token budget of one micro-batch (padded rows × longest row); a longer sequence gets one alone."""
    shared_row_tokens: int = SHARED_ROW_TOKENS
    """Longest shared-prompt row (``stages.learner.batch.SHARED_ROW_TOKENS``); 0: a row per
    completion. MoE models always train a row per completion (HF's router loss reads a 2-D mask)."""
    groups_per_step: int = 8
    """Prompt groups per optimizer step (the shell's batch size)."""
    max_staleness: int = 2
    """A group whose oldest token was sampled more than this many versions ago is dropped as stale."""
    run_dir: str = "."
    """Directory for ``consumed.jsonl`` and ``checkpoints/``."""
    checkpoint_every: int = 10
    """The shell checkpoints every N steps (0: only on drain)."""
    keep_last: int = 2
    """Complete checkpoints kept after each save."""
    seed: int = 0
    """Initial weights of a built-in shape (same seed ⇒ same weights on every stage)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward (non-reentrant; MoE made deterministic)."""
    compile_layers: bool = False
    """``torch.compile`` each decoder layer with dynamic shapes (``stages.learner.fsdp``)."""
    mixed_precision: bool | None = None
    """bf16 compute with fp32 master weights and fp32 gradient reduction; None: on for CUDA, off for CPU."""
    async_checkpoint: bool = False
    """``save_checkpoint(wait=False)`` writes in the background (``checkpoint.save_async``)."""

    @classmethod
    def from_section(cls, section: LearnerSection, *, model: str, run_dir: str, max_staleness: int,
                     seed: int = 0, device: str | None = None) -> LearnerConfig:
        """The config a stack's ``[learner]`` section implies (symmetric PPO clip)."""
        return cls(model=model, device=device or section.device, lr=section.lr,
                   weight_decay=section.weight_decay, warmup_steps=section.warmup_steps,
                   max_grad_norm=section.max_grad_norm, loss=section.loss, clip_eps_low=section.clip_eps,
                   clip_eps_high=section.clip_eps, tis_cap=section.tis_cap, kl_coef=section.kl_coef,
                   aggregation=section.aggregation, micro_batch_tokens=section.micro_batch_tokens,
                   shared_row_tokens=section.shared_row_tokens,
                   groups_per_step=section.groups_per_step, max_staleness=max_staleness, run_dir=str(run_dir),
                   checkpoint_every=section.checkpoint_every, keep_last=section.keep_checkpoints, seed=seed,
                   activation_checkpointing=section.activation_checkpointing,
                   compile_layers=section.compile_layers, async_checkpoint=section.async_checkpoint)

    @classmethod
    def for_stack(cls, stack: Stack, run_dir: str | Path) -> LearnerConfig:
        """The config a whole stack file gives its learner, run in ``run_dir``: what the learner
        stage builds and what ``pipeline check``/``up`` validate before starting it."""
        return cls.from_section(stack.learner, model=stack.model.name, run_dir=str(run_dir),
                                max_staleness=stack.run.max_staleness, seed=stack.run.seed)

    def validate(self) -> LearnerConfig:
        """Raise ``ValueError`` on the first violated rule; returns self for chaining."""
        def bad(field: str, rule: str) -> None:
            raise ValueError(f"learner.{field} = {getattr(self, field)!r}: {rule}")

        if not self.lr > 0:
            bad("lr", "must be > 0")
        if not all(0 <= b < 1 for b in self.betas):
            bad("betas", "each beta must be in [0, 1)")
        if not self.eps > 0:
            bad("eps", "must be > 0")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.warmup_steps < 0:
            bad("warmup_steps", "must be >= 0")
        if self.schedule != "constant" and self.total_steps <= self.warmup_steps:
            bad("total_steps", f"a {self.schedule} schedule needs total_steps > warmup_steps ({self.warmup_steps})")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        if not self.max_grad_norm > 0:
            bad("max_grad_norm", "must be > 0 (clipping is how a non-finite norm is detected)")
        if not 0 <= self.clip_eps_low < 1:
            bad("clip_eps_low", "must be in [0, 1) so the lower clip 1 - eps stays positive")
        if self.clip_eps_high < 0:
            bad("clip_eps_high", "must be >= 0")
        if not self.tis_cap > 1 + self.clip_eps_high:
            bad("tis_cap", f"must be > 1 + clip_eps_high = {1 + self.clip_eps_high} (it bounds importance "
                           "weights above the clip range)")
        if self.kl_coef < 0:
            bad("kl_coef", "must be >= 0")
        if self.micro_batch_tokens < 2:
            bad("micro_batch_tokens", "must be >= 2 (one prompt token and one completion token)")
        if self.shared_row_tokens < 0:
            bad("shared_row_tokens", "must be >= 0 (0: a row per completion)")
        if self.groups_per_step < 1:
            bad("groups_per_step", "must be >= 1")
        if self.max_staleness < 0:
            bad("max_staleness", "must be >= 0")
        if self.checkpoint_every < 0:
            bad("checkpoint_every", "must be >= 0")
        if self.keep_last < 1:
            bad("keep_last", "must be >= 1 (resume needs a complete checkpoint)")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            bad("device", "must be 'cpu' or 'cuda[:N]'")
        if self.mixed_precision and self.device == "cpu":
            bad("mixed_precision", "bf16 compute is for CUDA; CPU trains in fp32")
        return self

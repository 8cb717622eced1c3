"""From TrainGroups to padded micro-batches, identical on every rank.

Every rank receives the same step batch and plans the same micro-batches; rank r then takes
micro-batches ``r, r + W, r + 2W, ...``. Ranks with fewer real micro-batches than the
busiest one run empty ones (a single pad token with weight 0) so that every rank makes the
same number of forward/backward passes — FSDP2's collectives require it.

Invariants:
- A sequence is ``prompt + completion``; only completion tokens have loss weight.
- Weights implement the aggregation over the WHOLE step: token-mean → 1/total_tokens;
  seq-mean → 1/(len(seq) * total_seqs); so the sum over all ranks' micro-batches is the
  step loss, independent of the world size and of the packing.
- Packing is greedy over the sequences sorted longest first (stable, so deterministic
  and identical on every rank) under ``micro_batch_tokens`` (padded size ``rows ×
  longest``): similar lengths share a micro-batch, so little of the budget is padding. A
  sequence longer than the budget gets a micro-batch of its own.
- Packing never changes the step's loss (weights are per token), only the float
  summation order. Nor does leaving out zero-advantage sequences where the caller allows it
  (their gradient is exactly zero; the weights still count their tokens).

Failure behaviour: ``group_problem`` names what is wrong with a malformed group (array
lengths that disagree, non-finite rewards or logprobs); ``Learner.admit`` drops such a group
as ``invalid: ...`` before it reaches a step. ``step_items`` raises ``ValueError`` on the
same problems as a backstop, since a half-used group would silently skew the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from schemas.messages import TrainGroup
from stages.learner.loss import grpo_advantages
from stages.model import PAD_ID


@dataclass
class SeqItem:
    tokens: np.ndarray
    prompt_len: int
    behaviour: np.ndarray
    ref: np.ndarray | None
    advantage: float
    weight: float


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    """Padded sequences, [B, L]."""
    attention_mask: torch.Tensor
    index: torch.Tensor
    """Flat positions (into the [B × L] grid) whose next token carries loss, [N]: the head
    is evaluated only there (``stages.learner.head``)."""
    targets: torch.Tensor
    """The token predicted at each ``index`` position, [N]."""
    behaviour: torch.Tensor
    """Engine logprob of each target, [N]."""
    ref: torch.Tensor | None
    adv: torch.Tensor
    weight: torch.Tensor
    """Per-target loss weight, [N] (> 0, except the single weight-0 target of an idle rank's
    empty micro-batch)."""


def group_problem(g: TrainGroup) -> str | None:
    """Why ``g`` cannot be trained on, or None if it can."""
    samples, rewards = g.scored.rollout.samples, np.asarray(g.scored.rewards)
    if len(rewards) != len(samples):
        return f"{len(rewards)} rewards for {len(samples)} samples"
    if not np.all(np.isfinite(rewards)):
        return "non-finite reward"
    if g.ref_logprobs is not None and len(g.ref_logprobs) != len(samples):
        return f"{len(g.ref_logprobs)} reference logprob arrays for {len(samples)} samples"
    for i, s in enumerate(samples):
        if len(s.logprobs) != len(s.token_ids):
            return f"sample {i}: {len(s.logprobs)} logprobs for {len(s.token_ids)} tokens"
        if g.ref_logprobs is not None and len(g.ref_logprobs[i]) != len(s.token_ids):
            return f"sample {i}: {len(g.ref_logprobs[i])} reference logprobs for {len(s.token_ids)} tokens"
    # One check over the group's logprobs (the rank-0 admission path runs this for every
    # group: per sample it was 16 numpy calls on a few elements each); the loop only names
    # the sample once something is wrong.
    if samples and not np.isfinite(np.concatenate([s.logprobs for s in samples])).all():
        for i, s in enumerate(samples):
            if not np.all(np.isfinite(s.logprobs)):
                return f"sample {i}: non-finite behaviour logprob"
    return None


def step_items(groups: list[TrainGroup], aggregation: str) -> list[SeqItem]:
    items = []
    for g in groups:
        problem = group_problem(g)
        if problem is not None:
            raise ValueError(f"group {g.scored.rollout.group.group_id}: {problem}")
        adv = grpo_advantages(g.scored.rewards)
        prompt = np.asarray(g.scored.rollout.group.prompt_ids, np.int64)
        for i, s in enumerate(g.scored.rollout.samples):
            if len(s.token_ids) == 0:
                continue
            ref = g.ref_logprobs[i] if g.ref_logprobs is not None else None
            items.append(SeqItem(np.concatenate([prompt, np.asarray(s.token_ids, np.int64)]), len(prompt),
                                 np.asarray(s.logprobs, np.float32), ref, float(adv[i]), 0.0))
    total_tokens = sum(len(it.behaviour) for it in items)
    for it in items:
        it.weight = 1.0 / total_tokens if aggregation == "token_mean" else 1.0 / (len(it.behaviour) * len(items))
    return items


def pack(items: list[SeqItem], budget: int) -> list[list[SeqItem]]:
    """Micro-batches of at most ``budget`` padded tokens, longest sequences first."""
    batches: list[list[SeqItem]] = []
    cur: list[SeqItem] = []
    longest = 0
    for it in sorted(items, key=lambda it: -len(it.tokens)):
        n = len(it.tokens)
        if cur and (len(cur) + 1) * max(longest, n) > budget:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(it)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


def collate(items: list[SeqItem], device: torch.device) -> MicroBatch:
    """Pad ``items`` into one [B, L] batch and list its loss positions flat, all on the host
    (numpy), then move each tensor once: the training loop needs no device→host sync."""
    if not items:  # the empty micro-batch of an idle rank
        items = [SeqItem(np.array([PAD_ID, PAD_ID]), 1, np.zeros(1, np.float32), None, 0.0, 0.0)]
    width = max(len(it.tokens) for it in items)
    b = len(items)
    ids = np.full((b, width), PAD_ID, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    index, targets, behaviour, ref, adv, weight = [], [], [], [], [], []
    with_ref = any(it.ref is not None for it in items)
    for r, it in enumerate(items):
        n, p, t = len(it.tokens), it.prompt_len, len(it.behaviour)
        ids[r, :n] = it.tokens
        mask[r, :n] = 1
        index.append(r * width + np.arange(p - 1, p - 1 + t))  # position p-1 predicts completion token 0
        targets.append(it.tokens[p:p + t])
        behaviour.append(it.behaviour)
        ref.append(np.asarray(it.ref, np.float32) if it.ref is not None else np.zeros(t, np.float32))
        adv.append(np.full(t, it.advantage, np.float32))
        weight.append(np.full(t, it.weight, np.float32))
    to = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
    cat = np.concatenate
    return MicroBatch(to(ids), to(mask), to(cat(index)), to(cat(targets).astype(np.int64)),
                      to(cat(behaviour).astype(np.float32)), to(cat(ref)) if with_ref else None,
                      to(cat(adv)), to(cat(weight)))


def rank_micro_batches(groups: list[TrainGroup], *, aggregation: str, budget: int, rank: int, world: int,
                       device: torch.device, skip_zero_advantage: bool = False) -> list[MicroBatch]:
    """This rank's micro-batches. ``skip_zero_advantage``: leave out sequences whose advantage
    is exactly 0 (every sample of a group scored the same). Their policy-loss gradient is
    exactly zero and the weights above were computed over all sequences, so the step's
    gradient is unchanged; only valid when nothing else (KL to a reference, MoE router
    losses) gives them a gradient — the caller decides."""
    items = step_items(groups, aggregation)
    if skip_zero_advantage:
        items = [it for it in items if it.advantage != 0.0]
    planned = pack(items, budget)
    rounds = max(1, -(-len(planned) // world))
    mine = [planned[k * world + rank] if k * world + rank < len(planned) else [] for k in range(rounds)]
    return [collate(items, device) for items in mine]

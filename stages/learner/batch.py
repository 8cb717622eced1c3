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


SHARED_ROW_TOKENS = 512
"""Longest row into which several completions of one group are packed behind a single copy
of their prompt (``prompt, c1, c2, ...``, each completion attending to the prompt and to
itself only). The prompt's forward and backward then run once per row instead of once per
completion: the default stack's 3-token prompts and 4-token answers, 16 to a group, train on
67 rows instead of 112. Capped because the row's attention mask is dense ([row, row]): at
512 it is 256 KiB and its attention work stays small beside the linears; a completion that
does not fit beside its prompt gets a row of its own (the plain layout)."""


@dataclass
class SeqItem:
    tokens: np.ndarray
    prompt_len: int
    behaviour: np.ndarray
    ref: np.ndarray | None
    advantage: float
    weight: float
    group: int = -1
    """Index of the sequence's group in the step: sequences of one group share their prompt."""

    @property
    def completion(self) -> np.ndarray:
        return self.tokens[self.prompt_len:]


@dataclass
class Row:
    """One row of a micro-batch: a prompt followed by one or more of its completions."""

    seqs: list[SeqItem]

    def __len__(self) -> int:
        return self.seqs[0].prompt_len + sum(len(s.completion) for s in self.seqs)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    """Padded rows, [B, L]."""
    attention_mask: torch.Tensor
    """[B, L] padding mask when every row holds one sequence (the model applies causal
    attention itself); else the full boolean mask, [B, 1, L, L]: a position sees the earlier
    positions of its prompt and of its own completion, padding sees only itself."""
    index: torch.Tensor
    """Flat positions (into the [B × L] grid) whose next token carries loss, [N]: the head
    is evaluated only there (``stages.learner.head``). A shared prompt's last position
    appears once per completion behind it (it predicts each one's first token)."""
    targets: torch.Tensor
    """The token predicted at each ``index`` position, [N]."""
    behaviour: torch.Tensor
    """Engine logprob of each target, [N]."""
    ref: torch.Tensor | None
    adv: torch.Tensor
    weight: torch.Tensor
    """Per-target loss weight, [N] (> 0, except the single weight-0 target of an idle rank's
    empty micro-batch)."""
    position_ids: torch.Tensor | None = None
    """[B, L] when rows share prompts (each completion's positions continue from its
    prompt's end), else None (positions 0..L-1)."""


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
    for gi, g in enumerate(groups):
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
                                 np.asarray(s.logprobs, np.float32), ref, float(adv[i]), 0.0, gi))
    total_tokens = sum(len(it.behaviour) for it in items)
    for it in items:
        it.weight = 1.0 / total_tokens if aggregation == "token_mean" else 1.0 / (len(it.behaviour) * len(items))
    return items


def rows(items: list[SeqItem], max_row: int = SHARED_ROW_TOKENS) -> list[Row]:
    """``items`` as rows: consecutive sequences of one group fill a row behind one copy of
    their prompt while it stays within ``max_row`` tokens (``max_row = 0``: a row per
    sequence, the plain layout). Deterministic in the items' order."""
    out: list[Row] = []
    for it in items:
        last = out[-1] if out else None
        if (last is not None and it.group >= 0 and last.seqs[-1].group == it.group
                and len(last) + len(it.completion) <= max_row):
            last.seqs.append(it)
        else:
            out.append(Row([it]))
    return out


def pack(rows_: list[Row], budget: int) -> list[list[Row]]:
    """Micro-batches of at most ``budget`` padded tokens, longest rows first."""
    batches: list[list[Row]] = []
    cur: list[Row] = []
    longest = 0
    for row in sorted(rows_, key=lambda r: -len(r)):
        n = len(row)
        if cur and (len(cur) + 1) * max(longest, n) > budget:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(row)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


def _shared_mask(seg: np.ndarray) -> np.ndarray:
    """[B, 1, L, L] boolean attention mask from per-position segments (-1 padding, 0 the
    prompt, k ≥ 1 completion k): query i sees key j ≤ i of the prompt or of its own segment;
    every position sees itself (a padding query attends to something, never NaN)."""
    width = seg.shape[1]
    q, k = seg[:, :, None], seg[:, None, :]
    causal = np.tril(np.ones((width, width), dtype=bool))
    mask = causal & (k >= 0) & ((k == 0) | (k == q))
    mask |= np.eye(width, dtype=bool)
    return mask[:, None]


def collate(batch: list[Row], device: torch.device) -> MicroBatch:
    """Pad ``batch`` into one [B, L] batch and list its loss positions flat, all on the host
    (numpy), then move each tensor once: the training loop needs no device→host sync."""
    if not batch:  # the empty micro-batch of an idle rank
        batch = [Row([SeqItem(np.array([PAD_ID, PAD_ID]), 1, np.zeros(1, np.float32), None, 0.0, 0.0)])]
    width = max(len(row) for row in batch)
    b = len(batch)
    shared = any(len(row.seqs) > 1 for row in batch)
    ids = np.full((b, width), PAD_ID, dtype=np.int64)
    seg = np.full((b, width), -1, dtype=np.int64)
    pos = np.zeros((b, width), dtype=np.int64)
    index, targets, behaviour, ref, adv, weight = [], [], [], [], [], []
    with_ref = any(it.ref is not None for row in batch for it in row.seqs)
    for r, row in enumerate(batch):
        p = row.seqs[0].prompt_len
        ids[r, :p] = row.seqs[0].tokens[:p]
        seg[r, :p] = 0
        pos[r, :p] = np.arange(p)
        at = p
        for k, it in enumerate(row.seqs, start=1):
            c = it.completion
            t = len(c)
            ids[r, at:at + t] = c
            seg[r, at:at + t] = k
            pos[r, at:at + t] = np.arange(p, p + t)
            # the prompt's last position predicts completion token 0, its own positions the rest
            index.append(r * width + np.concatenate([[p - 1], np.arange(at, at + t - 1)])[:t])
            targets.append(c)
            behaviour.append(it.behaviour)
            ref.append(np.asarray(it.ref, np.float32) if it.ref is not None else np.zeros(t, np.float32))
            adv.append(np.full(t, it.advantage, np.float32))
            weight.append(np.full(t, it.weight, np.float32))
            at += t
    to = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
    cat = np.concatenate
    mask = to(_shared_mask(seg)) if shared else to((seg >= 0).astype(np.int64))
    return MicroBatch(to(ids), mask, to(cat(index)), to(cat(targets).astype(np.int64)),
                      to(cat(behaviour).astype(np.float32)), to(cat(ref)) if with_ref else None,
                      to(cat(adv)), to(cat(weight)), to(pos) if shared else None)


def rank_micro_batches(groups: list[TrainGroup], *, aggregation: str, budget: int, rank: int, world: int,
                       device: torch.device, skip_zero_advantage: bool = False,
                       shared_row_tokens: int = SHARED_ROW_TOKENS) -> list[MicroBatch]:
    """This rank's micro-batches. ``skip_zero_advantage``: leave out sequences whose advantage
    is exactly 0 (every sample of a group scored the same). Their policy-loss gradient is
    exactly zero and the weights above were computed over all sequences, so the step's
    gradient is unchanged; only valid when nothing else (KL to a reference, MoE router
    losses) gives them a gradient — the caller decides. ``shared_row_tokens``: see
    ``SHARED_ROW_TOKENS``; 0 gives every sequence a row of its own."""
    items = step_items(groups, aggregation)
    if skip_zero_advantage:
        items = [it for it in items if it.advantage != 0.0]
    planned = pack(rows(items, min(shared_row_tokens, budget)), budget)  # a shared row never outgrows the budget
    rounds = max(1, -(-len(planned) // world))
    mine = [planned[k * world + rank] if k * world + rank < len(planned) else [] for k in range(rounds)]
    return [collate(batch, device) for batch in mine]

"""Reference-model logprobs of sampled completions (pure; no sockets).

The reference model is the initial policy (same name and seed as the learner's), held for
inference only: no optimizer state, no gradients, never updated. Each completion is scored
teacher-forced on ``prompt + completion``; the logprob of completion token t is taken from
the logits at position ``len(prompt) + t - 1``.

Invariants: output arrays are float32 with exactly one entry per completion token; samples
with an empty completion get an empty array. Groups are scored in one padded batch, the
completions packed behind shared copies of their prompt (same logprobs as one row each).
"""

from __future__ import annotations

import numpy as np
import torch

from schemas.messages import ScoredGroup, TrainGroup
from stages.learner.batch import SHARED_ROW_TOKENS, SeqItem, collate, rows
from stages.learner.head import logprob_head
from stages.model import build_model


def completion_logprobs(model: torch.nn.Module, prompt: np.ndarray, completions: list[np.ndarray],
                        device: str | torch.device = "cpu", shared_row_tokens: int = SHARED_ROW_TOKENS,
                        ) -> list[np.ndarray]:
    """Teacher-forced logprob of each completion token under ``model``, one batch. The
    completions sit behind shared copies of the prompt, as the learner trains them
    (``stages.learner.batch.rows``, rows of at most ``shared_row_tokens``; 0: a row per
    completion): the prompt's forward runs once per row, not once per completion."""
    if not completions:
        return []
    p = len(prompt)
    prompt = np.asarray(prompt, np.int64)
    items = [SeqItem(np.concatenate([prompt, np.asarray(c, np.int64)]), p, np.zeros(len(c), np.float32), None,
                     0.0, 0.0, group=0) for c in completions if len(c)]
    out = [np.zeros(0, np.float32) for _ in completions]
    if not items:
        return out
    # Only completion positions go through the LM head (stages.learner.head): no [B, L, V]
    # logits, which at a 152k vocabulary and 1k-token rows are ~10 GB in fp32 per group.
    mb = collate(rows(items, shared_row_tokens), torch.device(device))
    extra = {} if mb.position_ids is None else {"position_ids": mb.position_ids}
    with torch.inference_mode(), logprob_head(model.lm_head, mb.index, mb.targets):
        logp = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, **extra).logits
    logp = logp.cpu().numpy().astype(np.float32)  # in the items' order (rows keep it)
    bounds = np.cumsum([0] + [len(it.behaviour) for it in items])
    spans = iter(zip(bounds[:-1], bounds[1:]))
    for i, c in enumerate(completions):
        if len(c):
            a, b = next(spans)
            out[i] = logp[a:b]
    return out


class ReferenceScorer:
    """Turns ScoredGroups into TrainGroups, adding reference logprobs when enabled."""

    def __init__(self, model_name: str, *, enabled: bool, seed: int = 0, device: str = "cpu",
                 shared_row_tokens: int = SHARED_ROW_TOKENS) -> None:
        self.enabled = enabled
        self.device = device
        self.shared_row_tokens = shared_row_tokens
        self.model = build_model(model_name, device=device, seed=seed) if enabled else None
        if self.model is not None:
            self.model.requires_grad_(False)

    def __call__(self, scored: ScoredGroup) -> TrainGroup:
        if self.model is None:
            return TrainGroup(scored, None)
        r = scored.rollout
        ref = completion_logprobs(self.model, r.group.prompt_ids, [s.token_ids for s in r.samples], self.device,
                                  self.shared_row_tokens)
        return TrainGroup(scored, ref)

"""Reference-model logprobs of sampled completions (pure; no sockets).

The reference model is the initial policy (same name and seed as the learner's), held for
inference only: no optimizer state, no gradients, never updated. Each completion is scored
teacher-forced on ``prompt + completion``; the logprob of completion token t is taken from
the logits at position ``len(prompt) + t - 1``.

Invariants: output arrays are float32 with exactly one entry per completion token; samples
with an empty completion get an empty array. Groups are scored in one padded batch.
"""

from __future__ import annotations

import numpy as np
import torch

from schemas.messages import ScoredGroup, TrainGroup
from stages.learner.head import logprob_head
from stages.model import PAD_ID, build_model


def completion_logprobs(model: torch.nn.Module, prompt: np.ndarray, completions: list[np.ndarray],
                        device: str | torch.device = "cpu") -> list[np.ndarray]:
    """Teacher-forced logprob of each completion token under ``model``, one batch."""
    if not completions:
        return []
    p = len(prompt)
    seqs = [np.concatenate([prompt, c]).astype(np.int64) for c in completions]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(s)
        mask[i, : len(s)] = 1
    # Only completion positions go through the LM head (stages.learner.head): no [B, L, V]
    # logits, which at a 152k vocabulary and 1k-token rows are ~10 GB in fp32 per group.
    index = np.concatenate([i * width + np.arange(p - 1, p - 1 + len(c)) for i, c in enumerate(completions)])
    targets = np.concatenate(completions).astype(np.int64)
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode(), logprob_head(model.lm_head, torch.from_numpy(index).to(device),
                                              torch.from_numpy(targets).to(device)):
        logp = model(input_ids=ids, attention_mask=mask).logits.cpu().numpy().astype(np.float32)
    bounds = np.cumsum([0] + [len(c) for c in completions])
    return [logp[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class ReferenceScorer:
    """Turns ScoredGroups into TrainGroups, adding reference logprobs when enabled."""

    def __init__(self, model_name: str, *, enabled: bool, seed: int = 0, device: str = "cpu") -> None:
        self.enabled = enabled
        self.device = device
        self.model = build_model(model_name, device=device, seed=seed) if enabled else None
        if self.model is not None:
            self.model.requires_grad_(False)

    def __call__(self, scored: ScoredGroup) -> TrainGroup:
        if self.model is None:
            return TrainGroup(scored, None)
        r = scored.rollout
        ref = completion_logprobs(self.model, r.group.prompt_ids, [s.token_ids for s in r.samples], self.device)
        return TrainGroup(scored, ref)

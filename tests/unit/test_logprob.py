"""Reference logprobs equal a per-sequence teacher-forced forward pass."""

import numpy as np
import pytest
import torch

from stages.logprob.scorer import ReferenceScorer, completion_logprobs
from stages.model import build_model
from stages.testing import make_train_group


@pytest.mark.parametrize("shared_row_tokens", [512, 0])  # the completions behind one prompt; a row each
def test_batched_reference_logprobs_match_single_sequence_forward(shared_row_tokens):
    model = build_model("tiny", seed=3)
    prompt = np.array([1, 5, 6, 7], np.int32)
    completions = [np.array([8, 9, 10, 2], np.int32), np.array([11], np.int32), np.array([], np.int32)]
    got = completion_logprobs(model, prompt, completions, shared_row_tokens=shared_row_tokens)
    for c, lp in zip(completions, got):
        assert lp.dtype == np.float32 and lp.shape == c.shape
        if len(c):
            full = torch.tensor(np.concatenate([prompt, c])[None].astype(np.int64))
            with torch.no_grad():
                ref = torch.log_softmax(model(full).logits[0], -1)
            want = [ref[len(prompt) - 1 + t, c[t]].item() for t in range(len(c))]
            np.testing.assert_allclose(lp, want, atol=1e-5)


def test_scorer_disabled_passes_groups_through_without_a_model():
    tg = make_train_group()
    scorer = ReferenceScorer("tiny", enabled=False)
    out = scorer(tg.scored)
    assert scorer.model is None and out.ref_logprobs is None and out.scored is tg.scored


def test_scorer_enabled_adds_one_array_per_sample():
    tg = make_train_group(n_samples=3, length=5)
    out = ReferenceScorer("tiny", enabled=True)(tg.scored)
    assert [a.shape for a in out.ref_logprobs] == [(5,)] * 3
    assert not any(p.requires_grad for p in ReferenceScorer("tiny", enabled=True).model.parameters())

"""Counter-based sampler: the right distribution, top-p support, batch independence."""

import math

import numpy as np
import torch

from stages.rollout.engines import sampler

ROWS = 40_000
"""Draws per frequency check: standard error of a frequency <= 0.0025."""


def draw(logits_row, *, temperature=1.0, top_p=1.0, rows=ROWS, count=0):
    logits = torch.tensor(logits_row, dtype=torch.float32).expand(rows, -1)
    keys = torch.tensor([sampler.mix64(123, i) for i in range(rows)], dtype=torch.int64)
    return sampler.sample(logits, torch.full((rows,), temperature), torch.full((rows,), top_p), keys,
                          torch.full((rows,), count, dtype=torch.int64), top_p < 1)


def test_torch_finalizer_matches_unsigned_splitmix64():
    mask = (1 << 64) - 1

    def reference(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    values = [0, 1, 2**63 - 1, 2**63, mask, 0x0123456789ABCDEF, 0xFEDCBA9876543210]
    got = sampler._finalize(torch.tensor([sampler._signed(v) for v in values], dtype=torch.int64))
    assert [g & mask for g in got.tolist()] == [reference(v) for v in values]


def test_samples_follow_softmax_of_logits_over_temperature():
    logits = [2.0, 1.0, 0.5, 0.0, -1.0]
    tokens, logprobs = draw(logits, temperature=0.7)
    expected = torch.softmax(torch.tensor(logits) / 0.7, -1).numpy()
    freq = np.bincount(tokens.numpy(), minlength=5) / ROWS
    assert np.max(np.abs(freq - expected)) < 0.012
    np.testing.assert_allclose(logprobs.numpy(), np.log(expected)[tokens.numpy()], atol=1e-6)


def test_top_p_samples_only_the_nucleus_but_reports_untruncated_logprobs():
    probs = [0.4, 0.3, 0.2, 0.1]
    tokens, logprobs = draw([math.log(p) for p in probs], top_p=0.5)
    freq = np.bincount(tokens.numpy(), minlength=4) / ROWS
    assert freq[2] == freq[3] == 0  # mass before token 2 is 0.7 >= 0.5
    assert abs(freq[0] - 0.4 / 0.7) < 0.012
    np.testing.assert_allclose(logprobs.numpy(), np.log(probs)[tokens.numpy()], atol=1e-6)
    top_only, _ = draw([math.log(p) for p in probs], top_p=0.01, rows=200)
    assert set(top_only.tolist()) == {0}  # the most likely token is always kept


def test_noise_depends_on_key_count_and_id_only():
    keys = torch.tensor([sampler.mix64(1, 0), sampler.mix64(1, 1), sampler.mix64(1, 0)])
    noise = sampler.gumbel_noise(keys, torch.tensor([3, 3, 3]), 50)
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    alone = sampler.gumbel_noise(keys[:1], torch.tensor([3]), 50)
    assert torch.equal(alone[0], noise[0])
    later = sampler.gumbel_noise(keys[:1], torch.tensor([4]), 50)
    assert not torch.equal(later[0], noise[0])
    big = sampler.gumbel_noise(torch.tensor([sampler.mix64(i) for i in range(2000)]), torch.zeros(2000, dtype=torch.int64), 64)
    assert abs(big.mean().item() - 0.5772) < 0.01 and abs(big.var().item() - math.pi**2 / 6) < 0.03


def test_greedy_rows_take_the_argmax_with_raw_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 4.9]])
    tokens, logprobs = sampler.sample(logits, torch.tensor([0.0, 0.0]), torch.ones(2),
                                      torch.tensor([1, 2]), torch.zeros(2, dtype=torch.int64), False)
    assert tokens.tolist() == [1, 0]
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])

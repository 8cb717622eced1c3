"""The fused, chunked LM head + logprob (stages.learner.head) against the plain path."""

import pytest
import torch

import stages.learner.head as head_module
from stages.learner.head import logprob_head, token_logprobs
from stages.model import build_model


def _plain(hidden, weight, targets):
    return torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize("dtype, fused", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_values_and_gradients_equal_the_plain_path_across_chunks(monkeypatch, dtype, fused):
    torch.manual_seed(0)
    n, d, v = 37, 16, 50
    monkeypatch.setattr(head_module, "CHUNK_LOGIT_BYTES", 4 * v * 8)  # 8 rows a chunk: 5 chunks, a ragged last
    hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, d, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    grad = torch.randn(n)
    got = token_logprobs(hidden, weight, targets, fused=fused)
    got.backward(grad)
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    want = _plain(h2, w2, targets)
    want.backward(grad)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(hidden.grad, h2.grad, **tol)
    torch.testing.assert_close(weight.grad, w2.grad, **tol)


def test_inside_a_model_the_head_returns_the_logprobs_of_the_chosen_positions_and_is_restored():
    model = build_model("tiny", seed=0)
    ids = torch.randint(3, 60, (2, 9))
    index = torch.tensor([3, 4, 5, 9 + 2, 9 + 7])  # flat positions into [2 x 9]
    targets = ids.reshape(-1)[index + 1]
    with logprob_head(model.lm_head, index, targets):
        got = model(input_ids=ids).logits
    full = torch.log_softmax(model(input_ids=ids).logits.float(), -1).reshape(-1, model.config.vocab_size)
    torch.testing.assert_close(got, full[index, targets], atol=1e-5, rtol=1e-5)
    assert "forward" not in vars(model.lm_head)  # the swap is undone
    with pytest.raises(RuntimeError):
        with logprob_head(model.lm_head, index, targets):
            raise RuntimeError("boom")
    assert "forward" not in vars(model.lm_head)

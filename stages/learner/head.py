"""Teacher-forced logprobs of chosen tokens straight from hidden states: the LM head fused
with ``log_softmax`` + gather, in vocabulary-sized chunks, never materialising [N, V] logits.

Why: the plain path (``log_softmax(model(ids).logits.float())[targets]``) computes logits for
every position, prompt and padding included, then holds bf16 logits, an fp32 copy and the
fp32 ``log_softmax`` output for backward: at a 152k vocabulary that is ~1.8 MB per token,
which caps the micro-batch (and so the kernel sizes) long before the decoder layers do.
Here only the positions that carry loss are projected, in chunks of at most
``CHUNK_LOGIT_BYTES`` of fp32 logits; backward recomputes each chunk's logits from the
saved hidden states (one extra head matmul) instead of keeping them.

Use: ``with logprob_head(model.lm_head, index, targets): out = model(input_ids=..., ...)``.
Inside the block the head returns ``log p(targets[i] | position index[i])`` as ``out.logits``
(fp32, shape [N]); ``index`` points into the flattened [B × L] positions of ``input_ids``.
The model is still called through its own ``__call__``, so FSDP2's hooks (unshard the
root's parameters before, reduce-scatter their gradients after) and HF's own forward (MoE
router logits and ``aux_loss``) are untouched; only the head's ``forward`` is swapped, and
restored on exit, also on error.

Invariants:
- Numerics equal the plain path's: logits are computed in the head weight's dtype (bf16
  under mixed precision), then the log-softmax runs in fp32 (tested to float tolerance).
- Gradients: d logp_i / d logits_i = onehot(target_i) − softmax(logits_i); the weight's
  gradient is accumulated over chunks in fp32, then cast to the weight's dtype.
- A swapped head is never left behind: the context manager deletes the instance attribute.

Failure behaviour: shapes that do not line up (index out of range) raise from
``index_select``; nothing is caught here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

CHUNK_LOGIT_BYTES = 1 << 30
"""fp32 logits held at once per chunk (forward and backward). 1 GiB = ~1.7k tokens at a 152k
vocabulary: big enough that each chunk's matmul saturates a GPU, small enough that the
transient never decides the micro-batch size."""


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_LOGIT_BYTES // (4 * vocab))


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, rows = hidden.shape[0], chunk_rows(weight.shape[0])
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, rows):
            logits = (hidden[s:s + rows] @ weight.T).float()
            lse[s:s + rows] = torch.logsumexp(logits, -1)
            out[s:s + rows] = logits.gather(-1, targets[s:s + rows, None])[:, 0] - lse[s:s + rows]
        ctx.save_for_backward(hidden, weight, targets, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        n, rows = hidden.shape[0], chunk_rows(weight.shape[0])
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for s in range(0, n, rows):
            h, g = hidden[s:s + rows], grad_out[s:s + rows].float()
            # grad of logits = g · (onehot(target) − softmax), built in place on the fp32 logits
            d = (h @ weight.T).float().sub_(lse[s:s + rows, None]).exp_().mul_(-g[:, None])
            d.scatter_add_(1, targets[s:s + rows, None], g[:, None])
            d = d.to(weight.dtype)
            if grad_h is not None:
                grad_h[s:s + rows] = d @ weight
            if grad_w is not None:
                grad_w += (d.T @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T)[i, targets[i]]`` in fp32, [N], without [N, V] logits.
    ``hidden`` [N, d], ``weight`` [V, d], ``targets`` [N] (int64)."""
    return _ChunkedTokenLogprobs.apply(hidden, weight, targets)


@contextlib.contextmanager
def logprob_head(head: torch.nn.Linear, index: torch.Tensor, targets: torch.Tensor) -> Iterator[None]:
    """While active, ``head(hidden [B, L, d])`` returns the logprobs of ``targets`` at the
    flattened positions ``index`` (fp32 [N]) instead of logits."""
    if head.bias is not None:
        raise ValueError("logprob_head expects a bias-free LM head")

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        return token_logprobs(flat, head.weight, targets)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward

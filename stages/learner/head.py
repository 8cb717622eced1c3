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
import functools
from collections.abc import Iterator

import torch

CHUNK_LOGIT_BYTES = 1 << 30
"""fp32 logits held at once per chunk (forward and backward). 1 GiB = ~1.7k tokens at a 152k
vocabulary: big enough that each chunk's matmul saturates a GPU, small enough that the
transient never decides the micro-batch size."""


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_LOGIT_BYTES // (4 * vocab))


def _lse_and_logp(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp, logprob of the target) per row of one chunk's logits, in fp32."""
    lf = logits.float()
    lse = torch.logsumexp(lf, -1)
    return lse, lf.gather(-1, targets[:, None])[:, 0] - lse


def _logit_grad(logits: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """g · (onehot(target) − softmax) per row, in the logits' dtype."""
    d = torch.exp(logits.float() - lse[:, None]) * (-g[:, None])
    return d.scatter_add(1, targets[:, None], g[:, None]).to(logits.dtype)


@functools.cache
def _compiled(fn):
    """``fn`` compiled, once per process and only when first asked for (importing
    ``torch._dynamo`` is not free, and CPU stacks never fuse)."""
    return torch.compile(fn, dynamic=True)


def _fns(fused: bool):
    """(forward, backward) chunk math. ``fused``: compiled, each one pass over a chunk's
    logits instead of four to five elementwise passes (bf16→fp32 copy, sub, exp, mul, cast
    back). On a 2-core CPU at a 152k vocabulary: 443 → 173 ms per 512 rows in bf16; on the
    H200 the unfused passes were ~150 ms of the compiled 0.6B step (docs/performance.md)."""
    if not fused:
        return _lse_and_logp, _logit_grad
    return _compiled(_lse_and_logp), _compiled(_logit_grad)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, fused: bool) -> torch.Tensor:
        n, rows = hidden.shape[0], chunk_rows(weight.shape[0])
        lse_fn, _ = _fns(fused)
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, rows):
            lse[s:s + rows], out[s:s + rows] = lse_fn(hidden[s:s + rows] @ weight.T, targets[s:s + rows])
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.fused = fused
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        n, rows = hidden.shape[0], chunk_rows(weight.shape[0])
        _, grad_fn = _fns(ctx.fused)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for s in range(0, n, rows):
            h = hidden[s:s + rows]
            # the logits are recomputed from the saved hidden states, not kept from forward
            d = grad_fn(h @ weight.T, lse[s:s + rows], grad_out[s:s + rows].float(), targets[s:s + rows])
            if grad_h is not None:
                grad_h[s:s + rows] = d @ weight
            if grad_w is not None:
                grad_w += (d.T @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   fused: bool = False) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T)[i, targets[i]]`` in fp32, [N], without [N, V] logits.
    ``hidden`` [N, d], ``weight`` [V, d], ``targets`` [N] (int64). ``fused``: the per-chunk
    elementwise math compiled (``torch.compile``, a few seconds on first use)."""
    return _ChunkedTokenLogprobs.apply(hidden, weight, targets, fused)


@contextlib.contextmanager
def logprob_head(head: torch.nn.Linear, index: torch.Tensor, targets: torch.Tensor, *,
                 fused: bool = False) -> Iterator[None]:
    """While active, ``head(hidden [B, L, d])`` returns the logprobs of ``targets`` at the
    flattened positions ``index`` (fp32 [N]) instead of logits."""
    if head.bias is not None:
        raise ValueError("logprob_head expects a bias-free LM head")

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        return token_logprobs(flat, head.weight, targets, fused=fused)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward

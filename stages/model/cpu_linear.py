"""fp32 linear layers on oneDNN for CPU models: the same math as ``F.linear``, ~2× faster.

torch's CPU ``F.linear`` / ``matmul`` in fp32 go to MKL's sgemm, which runs its AVX2 code on
non-Intel CPUs; oneDNN (bundled with torch as ``mkldnn``) uses the CPU's AVX-512. On the
2-core AMD EPYC dev machine, one thread, the default stack's shapes (1792 rows, 128 → 384):
forward 1825 → 817 µs, input gradient 1868 → 922 µs, weight gradient 2040 → 1149 µs, at
the same fp32 accuracy (max error against float64 equal to MKL's). This is not reduced
precision: inputs, weights, outputs and accumulation are fp32.

``use_onednn_linears(model)`` turns every plain ``nn.Linear`` of a model into
``OneDnnLinear`` (same parameters, names and state dict; only ``forward`` differs). Its
forward takes the oneDNN path only where it pays and is exact: CPU, fp32 input and weight,
at least ``ONEDNN_MIN_ROWS`` rows; anything else (CUDA, bf16 under mixed precision, a
decode step of a few rows) is plain ``F.linear``. Backward is written out (the oneDNN op
has no autograd formula): input gradient ``g @ W``, weight gradient ``gᵀ @ x``, bias
gradient ``Σ g``, each only when asked for.

Invariants and failure behaviour:
- Parameters are never copied or replaced: FSDP2's unsharded parameters, hooks and
  gradient reduction see the module exactly as before.
- Where the running torch lacks ``torch.ops.mkldnn._linear_pointwise`` (a build without
  oneDNN), ``use_onednn_linears`` changes nothing and returns 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ONEDNN_MIN_ROWS = 32
"""Rows (tokens) below which ``F.linear`` is kept: a oneDNN call costs ~10 µs more than MKL's
(primitive lookup), which outweighs its faster kernel below ~32 rows at these widths
(64 rows: 68 → 42 µs; 16 rows: 21 → 22 µs; 1 row: 5 → 14 µs)."""


def _onednn_op():
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_LINEAR = _onednn_op()


def _mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ bᵀ`` (2-D, fp32) on oneDNN. Transposed (strided) operands are accepted; the op
    copies them contiguous where it must (the weight gradient's two, ~0.9 ms a step on the
    default learner), still ~1.7× faster than MKL on the same operands."""
    return _LINEAR(a, b, None, "none", [], "")


class _OneDnnLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _LINEAR(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm_t(g, weight.t())  # g @ W
        if ctx.needs_input_grad[1]:
            gw = _mm_t(g.t(), x.t())  # gᵀ @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN where that is faster (see the module doc)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or (bias is not None and bias.dtype != torch.float32) or x.dim() < 2 or _LINEAR is None):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows < ONEDNN_MIN_ROWS:
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, x.shape[-1])
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        out = _OneDnnLinearFn.apply(x2, weight, bias)
    else:
        out = _LINEAR(x2, weight, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], weight.shape[0])


class OneDnnLinear(torch.nn.Linear):
    """``nn.Linear`` whose forward is ``linear`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn_linears(model: torch.nn.Module) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` to ``OneDnnLinear`` in place; returns
    how many (0 where torch has no oneDNN linear)."""
    if _LINEAR is None:
        return 0
    n = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = OneDnnLinear
            n += 1
    return n

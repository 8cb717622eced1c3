"""stages.model.cpu_linear: oneDNN linears give F.linear's values and gradients, in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stages.model import build_model
from stages.model.cpu_linear import _LINEAR, ONEDNN_MIN_ROWS, OneDnnLinear, linear, use_onednn_linears

needs_onednn = pytest.mark.skipif(_LINEAR is None, reason="torch built without oneDNN")


def _grads(fn, x, w, b):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    y = fn(x, w, b)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return y.detach(), x.grad, w.grad, b.grad if b is not None else None


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 40, 96), (ONEDNN_MIN_ROWS, 96), (3, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_equal_f_linear(shape, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(160, 96, generator=g)
    b = torch.randn(160, generator=g) if with_bias else None
    ours, ref = _grads(linear, x, w, b), _grads(F.linear, x, w, b)
    for a, r in zip(ours, ref):
        if r is None:
            assert a is None
            continue
        assert a.dtype == torch.float32 and a.shape == r.shape
        # fp32 rounding only: sums of ~100-300 products of unit-scale values
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)


def test_other_dtypes_and_devices_fall_back_to_f_linear():
    x, w = torch.randn(64, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(linear(x, w), F.linear(x, w))


def _to_plain_linears(model: torch.nn.Module) -> None:
    for m in model.modules():
        if type(m) is OneDnnLinear:
            m.__class__ = torch.nn.Linear


@needs_onednn
def test_model_keeps_parameters_and_outputs():
    plain = build_model("tiny", seed=0)  # build_model switches CPU fp32 models already
    assert any(type(m) is OneDnnLinear for m in plain.modules())
    assert not any(type(m) is torch.nn.Linear for m in plain.modules())
    _to_plain_linears(plain)
    fast = build_model("tiny", seed=0)
    assert use_onednn_linears(plain) > 0
    names = [n for n, _ in fast.named_parameters()]
    assert names == [n for n, _ in plain.named_parameters()]
    assert fast.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(3, 90, (8, 12))
    _to_plain_linears(plain)
    with torch.no_grad():
        ref = plain(input_ids=ids).logits
        got = fast(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_non_cpu_tensors_take_f_linear():
    # meta stands in for CUDA here: anything not on the CPU must never reach the oneDNN op
    x, w = torch.empty(64, 16, device="meta"), torch.empty(8, 16, device="meta")
    out = linear(x, w)
    assert out.device.type == "meta" and out.shape == (64, 8)


@needs_onednn
def test_module_gradients_accumulate_on_its_own_parameters():
    # Two backward passes: the gradients land (and add up) on the module's parameters.
    layer = torch.nn.Linear(32, 48, bias=True)
    use_onednn_linears(layer)
    assert type(layer) is OneDnnLinear
    x = torch.randn(40, 32)
    layer(x).sum().backward()
    layer(x).sum().backward()
    ref = torch.nn.Linear(32, 48, bias=True)
    ref.load_state_dict(layer.state_dict())
    for _ in range(2):
        ref(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)

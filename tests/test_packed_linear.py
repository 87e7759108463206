"""``PackedLinear``: oneDNN's product with a prepacked weight where it applies, torch's ``F.linear`` elsewhere."""

import logging

import pytest
import torch
import torch.nn.functional as F

from captioning.models import packed_linear
from captioning.models.packed_linear import PackedLinear

ONEDNN = torch.backends.mkldnn.is_available()


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN: PackedLinear is F.linear")
@pytest.mark.parametrize("rows", [1, 7, 32])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("transposed", [False, True], ids=["weight", "transposed-view"])
def test_onednn_product_equals_torch_linear_in_float32(rows: int, with_bias: bool, transposed: bool) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 160, generator=generator)
    if transposed:  # the backward product's weight, W^T, is a view of the forward's
        weight = torch.randn(160, 96, generator=generator).t()
    bias = torch.randn(96, generator=generator) if with_bias else None
    x = torch.randn(rows, 160, generator=generator)
    linear = PackedLinear(weight, bias)
    got, want = linear(x), F.linear(x, weight, bias)
    assert linear._packed is not None  # the oneDNN path, not the fallback
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert linear(x[:0]).shape == (0, 96)  # no rows (every caption ended): an empty result, no error


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch.backends.mkldnn.flags' own
def test_other_dtypes_autocast_and_disabled_onednn_use_torch_linear() -> None:
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(8, 5, generator=generator), torch.randn(8, generator=generator)
    x = torch.randn(3, 5, generator=generator)
    double = PackedLinear(weight.double(), bias.double())
    assert torch.equal(double(x.double()), F.linear(x.double(), weight.double(), bias.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = PackedLinear(weight, bias)
        got, want = autocast(x), F.linear(x, weight, bias)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    with torch.backends.mkldnn.flags(enabled=False):
        disabled = PackedLinear(weight, bias)
        assert torch.equal(disabled(x), F.linear(x, weight, bias))
    # a gradient in another dtype than the weight (autocast's backward): the product runs in the gradient's
    other_dtype = PackedLinear(weight)
    assert other_dtype(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert all(linear._packed is None for linear in (double, autocast, disabled, other_dtype))  # nothing packed


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
@pytest.mark.parametrize("failure", [
    RuntimeError("could not create a primitive"),  # a oneDNN that refuses this CPU or shape
    TypeError("_linear_pointwise() takes 5 positional arguments but 6 were given"),  # another torch's signature
    AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_linear_pointwise'"),  # a torch without it
], ids=["refused", "other-signature", "missing"])
@pytest.mark.parametrize("product", ["packed", "large"])
def test_a_failing_onednn_falls_back_once_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture, failure: Exception,
                                                        product: str) -> None:
    def fail(*args: object) -> None:
        raise failure

    monkeypatch.setattr(packed_linear, "_broken", [])
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", fail)
    weight, x = torch.randn(6, 4), torch.randn(2, 4)
    run = PackedLinear(weight) if product == "packed" else lambda rows: packed_linear.linear(rows, weight)
    with caplog.at_level(logging.WARNING, logger=packed_linear.__name__):
        assert torch.equal(run(x), F.linear(x, weight))
        assert torch.equal(run(x), F.linear(x, weight))
    assert [r.getMessage() for r in caplog.records] == [
        f"oneDNN's linear product is not usable here ({type(failure).__name__}: {failure}); "
        "using torch's default product"]
    fresh = PackedLinear(weight)
    assert torch.equal(fresh(x), F.linear(x, weight)) and fresh._packed is None  # not tried again in this process


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_linear_equals_f_linear_with_its_gradients(with_bias: bool) -> None:
    """Leading dimensions (the grid's rows x pixels), float32: outputs and every gradient to float32 rounding."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 24, generator=generator, requires_grad=True)
    weight = torch.randn(40, 24, generator=generator, requires_grad=True)
    bias = torch.randn(40, generator=generator, requires_grad=True) if with_bias else None
    grad = torch.randn(3, 7, 40, generator=generator)
    inputs = [tensor for tensor in (x, weight, bias) if tensor is not None]
    got = packed_linear.linear(x, weight, bias)
    want = F.linear(x, weight, bias)
    if ONEDNN:
        assert got.grad_fn is not None and type(got.grad_fn).__name__ == "_OneDNNLinearBackward"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for mine, torchs in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad),
                            strict=True):
        torch.testing.assert_close(mine, torchs, rtol=1e-5, atol=1e-5)
    frozen = packed_linear.linear(x.detach(), weight, bias)  # a frozen encoder's grid: only the weights learn
    torch.testing.assert_close(torch.autograd.grad(frozen, weight, grad)[0],
                               torch.autograd.grad(F.linear(x, weight, bias), weight, grad)[0], rtol=1e-5, atol=1e-5)
    assert packed_linear.linear(x.double(), weight.double()).dtype == torch.float64  # F.linear's path

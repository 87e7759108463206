"""Linear products through oneDNN on a CPU: per step with a weight packed once per pass, and large ones.

A decoder step multiplies a few dozen rows (the running captions) by the same weight at every
word. torch's CPU ``F.linear`` goes through MKL, whose products with so few rows run at a half of
a large product's speed or less on this project's machine (2 threads, 32 rows by 2048x2048:
~105 GFLOP/s against ~185 for a 4096² product; 7 rows: ~40). oneDNN, which torch also ships, runs
the same 32-row product at ~200 GFLOP/s once the weight is reordered into its blocked layout, and
``PackedLinear`` reorders it once per pass instead of at every step. ``linear`` is ``F.linear`` for
the large products (the grid's attention keys, the output layer over all words), whose forward
oneDNN also runs faster (6272 rows by 2048x512: ~222 GFLOP/s against ~187).

The oneDNN path is taken for float32 CPU tensors outside autocast and graph recording when torch
has it (``torch.backends.mkldnn``); everywhere else, and if oneDNN refuses, ``F.linear``. The two
differ by float rounding only (the sum order of the products).
"""

import logging
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)
_broken: list[str] = []  # why the oneDNN path failed once in this process: it is not tried again


class PackedLinear:
    """``x W^T + b`` for the calls of one pass; build a new one when the weight changes (each pass).

    The weight is packed at the first call that takes the oneDNN path, so a pass that never does (no
    oneDNN, another dtype, autocast) packs nothing.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: int = 32) -> None:
        """``rows``: the typical number of rows per call, a hint for oneDNN's layout."""
        self.weight, self.bias, self.rows = weight, bias, rows
        self._packed: torch.Tensor | None = None
        self._bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in_features) -> (rows, out_features), in ``x``'s dtype; for custom autograd functions (which
        compute their own gradients) and code without autograd: autograd does not see through the oneDNN path."""
        if onednn_applies(x) and onednn_applies(self.weight):
            try:
                if self._packed is None:
                    self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().contiguous(), self.rows)
                return _onednn_linear(x, self._packed, self._bias)
            except _ONEDNN_FAILURES as error:  # a build or CPU whose oneDNN refuses: the plain product from now on
                _give_up(error)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` (any leading dimensions) with its forward product through oneDNN where it applies; the
    gradients are ``F.linear``'s (MKL's products: oneDNN would need the weight transposed first)."""
    if not (onednn_applies(x) and onednn_applies(weight)):
        return F.linear(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        rows = x.reshape(-1, x.shape[-1])  # (rows, in_features)
        try:
            product = _onednn_linear(rows, weight.contiguous(), bias)
        except _ONEDNN_FAILURES as error:
            _give_up(error)
            return F.linear(x, weight, bias)
        return product.view(*x.shape[:-1], weight.shape[0])  # (..., out_features)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grads = grad_output.reshape(-1, weight.shape[0])  # (rows, out_features)
        grad_x = grads.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_weight = grads.t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_bias = grads.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(rows, in_features) by a contiguous or packed (out_features, in_features) weight."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


# a torch without the ops (AttributeError), with other signatures (TypeError), a oneDNN that refuses (RuntimeError)
_ONEDNN_FAILURES = (AttributeError, TypeError, RuntimeError)


def onednn_applies(tensor: torch.Tensor) -> bool:
    """Whether products with ``tensor`` take the oneDNN path here and now."""
    return (tensor.device.type == "cpu" and tensor.dtype == torch.float32 and not _broken
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not _cpu_autocast() and not recording_graph())


def _give_up(error: Exception) -> None:
    _broken.append(f"{type(error).__name__}: {error}")
    logger.warning("oneDNN's linear product is not usable here (%s); using torch's default product",
                   _broken[-1].splitlines()[0])


def _cpu_autocast() -> bool:
    """Autocast chooses the products' dtype itself."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def recording_graph() -> bool:
    """Recording a graph (ONNX export, TorchScript, torch.compile), which needs plain operators and no
    Python loop whose count would be fixed to the example's sizes."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()

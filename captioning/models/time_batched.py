"""Per-step pieces of a recurrence whose gradients are gathered once per pass instead of at every step.

``TimeBatchedLinear``: a linear layer applied at every step, whose weight gradient is computed once, over all steps.

Autograd would compute ``grad_y_t^T x_t`` at every step (a matrix as large as the weight from a few
dozen rows) and add it into the weight's gradient: on a CPU that is memory traffic, not arithmetic.
``TimeBatchedLinear`` keeps each step's input and, in backward, each step's output gradient, and
forms the weight's gradient as one large product ``G^T X`` once every step has been through backward.
The input gradients are computed per step as usual, so the recurrence's backward is unchanged.

``SharedRows``: row ranges of one tensor read at every step (the running captions' keys), whose
gradients are added in place into one buffer; autograd would build a zero tensor of the whole
size for every slice and then add them all up.

Not for double backward (``create_graph=True``).
"""

from typing import Any

import torch
import torch.nn.functional as F

from captioning.models.packed_linear import PackedLinear


class TimeBatchedLinear:
    """``y = x W^T + b`` for the steps of one forward pass; build a new one for every pass."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
        self.forward_product = PackedLinear(weight, bias)
        self._backward_product: PackedLinear | None = None  # x W, built when backward first needs it
        self.inputs: list[torch.Tensor] = []  # each step's x, in call order
        self.output_grads: dict[int, torch.Tensor] = {}  # call index -> grad of y, as backward reaches it
        needs_grad = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
        # every step's output depends on this token, so autograd reaches _GatherWeightGrad after all steps
        self._token = _GatherWeightGrad.apply(weight, bias, self) if needs_grad else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in_features) -> (rows, out_features)."""
        if self._token is None:  # no weight gradient: autograd needs to see the product only for x's
            return F.linear(x, self.weight, self.bias) if x.requires_grad else self.forward_product(x)
        return _StepLinear.apply(x, self._token, self)

    def input_grad(self, grad_output: torch.Tensor) -> torch.Tensor:
        """(rows, out_features) -> (rows, in_features): ``grad_output W``."""
        if self._backward_product is None:
            self._backward_product = PackedLinear(self.weight.detach().t())
        return self._backward_product(grad_output)


class _GatherWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, bias: torch.Tensor | None, owner: TimeBatchedLinear) -> torch.Tensor:
        ctx.owner, ctx.has_bias = owner, bias is not None
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        owner: TimeBatchedLinear = ctx.owner
        reached = sorted(owner.output_grads)
        if not reached:
            return None, None, None
        dtype = owner.weight.dtype  # under autocast the steps ran in a lower precision
        grads = torch.cat([owner.output_grads[i].to(dtype) for i in reached])  # (rows over all steps, out_features)
        inputs = torch.cat([owner.inputs[i].to(dtype) for i in reached])  # (rows over all steps, in_features)
        owner.inputs, owner.output_grads = [], {}
        weight_grad = grads.t().mm(inputs) if ctx.needs_input_grad[0] else None  # (out_features, in_features)
        bias_grad = grads.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return weight_grad, bias_grad, None


class _StepLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, token: torch.Tensor, owner: TimeBatchedLinear) -> torch.Tensor:
        ctx.owner, ctx.index, ctx.input_dtype = owner, len(owner.inputs), x.dtype
        owner.inputs.append(x)
        return owner.forward_product(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, None]:
        owner: TimeBatchedLinear = ctx.owner
        owner.output_grads[ctx.index] = grad_output
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = owner.input_grad(grad_output).to(ctx.input_dtype)  # (rows, in_features)
        return grad_input, grad_output.new_zeros(()), None


class SharedRows:
    """``source[start:stop]`` at every step of one forward pass; build a new one for every pass."""

    def __init__(self, source: torch.Tensor) -> None:
        self.source = source
        self.grad: torch.Tensor | None = None  # the sum of every step's gradient, as backward reaches them
        needs_grad = torch.is_grad_enabled() and source.requires_grad
        self._token = _GatherRowGrads.apply(source, self) if needs_grad else None

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        if self._token is None:
            return self.source[start:stop]
        return _Rows.apply(self._token, self, start, stop)


class _GatherRowGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, source: torch.Tensor, owner: SharedRows) -> torch.Tensor:
        ctx.owner = owner
        return source.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        grad, ctx.owner.grad = ctx.owner.grad, None
        return grad, None


class _Rows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, token: torch.Tensor, owner: SharedRows, start: int, stop: int) -> torch.Tensor:
        ctx.owner, ctx.start, ctx.stop = owner, start, stop
        return owner.source[start:stop]

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        owner: SharedRows = ctx.owner
        if owner.grad is None:
            owner.grad = torch.zeros_like(owner.source)
        owner.grad[ctx.start:ctx.stop] += grad_output
        return grad_output.new_zeros(()), None, None, None

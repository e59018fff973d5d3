"""bf16 on a CPU that emulates it: every matmul of a training step in a layout that runs fast.

Without AVX512-BF16 or AMX, PyTorch's CPU BLAS multiplies bf16 in software, and its speed then
depends on how the operands lie in memory. On a 2-core AVX2 EPYC (`benchmarks/cpu_precision.py`),
a linear layer's forward `x @ W.T` and its weight gradient `g.T @ x` run at 12-24 GFLOP/s,
but its input gradient `g @ W`, two row-major operands, runs at 2.5. Every linear's backward
and the LM head's gradient are that product, so a bf16 step spent most of its time there.

`a @ column_major(b)` is the same product with the same values, but BLAS reads `b` transposed,
the layout of the forward: 20 GFLOP/s there. `matmul` copies `b` a slice of rows at a time, so
the LM head's 49,152 x 576 weight costs 4.5 MiB of copy, not 54. Nothing here runs unless the
CPU emulates bf16 (`emulates_bf16`): with hardware bf16, and on GPUs, every layout is fast and
a copy would only cost time and memory.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from solotune.fastpaths.technique import restore_forwards
from solotune.model.precision import PrecisionPolicy, cpu_has_native_bf16


def emulates_bf16(policy: PrecisionPolicy) -> bool:
    """True where the run computes in bf16 on a CPU without bf16 in hardware."""
    return policy.device.type == "cpu" and policy.compute_dtype == torch.bfloat16 and not cpu_has_native_bf16()


def column_major(t: torch.Tensor) -> torch.Tensor:
    """`t` (2-D) with the same shape and values, stored column by column."""
    return t.T.contiguous().T


SLICE_ROWS = 4096  # rows of `b` copied column-major at a time


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` (2-D); where this CPU emulates bf16, with `b` read column-major a slice of rows at a time.

    The slices' products are summed in fp32 and rounded once to bf16, as one product is.
    """
    if b.dtype != torch.bfloat16 or b.device.type != "cpu" or cpu_has_native_bf16():
        return a @ b
    if b.shape[0] <= SLICE_ROWS:
        return a @ column_major(b)
    total = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32)
    for start in range(0, b.shape[0], SLICE_ROWS):
        total += a[:, start : start + SLICE_ROWS] @ column_major(b[start : start + SLICE_ROWS])
    return total.to(a.dtype)


class FastLayoutLinear(torch.autograd.Function):
    """F.linear(x, weight, bias), whose input gradient is `matmul(grad, weight)`.

    The inputs arrive already cast to the compute dtype. What is saved for backward is what
    autograd's own linear saves: the weight where the input needs a gradient, the input where the
    weight does. A frozen weight's input is not kept (for LoRA, that of every layer not adapted).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        need_x, need_w, _ = ctx.needs_input_grad
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = matmul(g, weight).view(*grad.shape[:-1], weight.shape[1]) if need_x else None
        grad_w = g.T @ x.reshape(-1, x.shape[-1]) if need_w else None
        grad_b = g.sum(0) if need_b else None  # False where there is no bias
        return grad_x, grad_w, grad_b


def _fast_layout_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return F.linear(x, self.weight, self.bias)  # eval or generation outside autocast
    # The casts autocast would make, done outside the Function so that autograd returns each
    # gradient in its parameter's own dtype.
    bias = None if self.bias is None else self.bias.to(torch.bfloat16)
    return FastLayoutLinear.apply(x.to(torch.bfloat16), self.weight.to(torch.bfloat16), bias)


def use_fast_layouts(model: torch.nn.Module) -> int:
    """Give every plain `nn.Linear` of `model` the fast-layout backward; returns how many.

    Exactly `nn.Linear`: quantized and adapter layers subclass it and run their own forward
    (their inner plain linears, LoRA's A and B included, are changed).
    """
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = types.MethodType(_fast_layout_forward, module)
            changed += 1
    return changed


def restore_layouts(model: torch.nn.Module) -> None:
    """Undo `use_fast_layouts`: every linear runs `nn.Linear.forward` again."""
    restore_forwards(model, _fast_layout_forward)

"""A SwiGLU MLP that keeps two activations for backward instead of three.

`down(silu(gate(x)) * up(x))` run by autograd saves gate(x) for SiLU's backward and both
silu(gate(x)) and up(x) for the product's: three (tokens x intermediate) tensors per layer,
the largest activations of a LoRA step (45% of them for SmolLM2 at 2,000 tokens). The fused
function saves gate(x) and up(x) and recomputes the sigmoid in backward, an elementwise op
that costs far less than the memory it frees.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from solotune.fastpaths.technique import FastPath, Probe, largest_difference, logits, restore_forwards


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving only its two inputs."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        # The ops autograd runs for the unfused silu(gate) * up, with silu(gate) recomputed: each
        # rounds once to the input dtype (silu_backward computes in fp32 inside each element), so
        # the gradients equal the unfused path's bit for bit and no fp32 temporaries are made
        # (at 7B under checkpointing, fp32 temporaries here cost 1 GiB of peak).
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def use_fused_swiglu(model: torch.nn.Module) -> int:
    """Give every gated-SiLU MLP of `model` the fused forward; returns how many were changed.

    Matches modules by their parts (gate_proj, up_proj, down_proj, a SiLU act_fn), the layout of
    Llama, Mistral, Qwen2/3 and SmolLM; other MLPs are left as they are.
    """
    changed = 0
    for module in model.modules():
        parts = all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
        if parts and is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_fused_forward, module)
            changed += 1
    return changed


def restore_swiglu(model: torch.nn.Module) -> None:
    """Undo `use_fused_swiglu`: every MLP runs its class's own forward again."""
    restore_forwards(model, _fused_forward)


class FusedSwiGLU(FastPath):
    name, field, axis, label = "fused SwiGLU", "fused_swiglu", "swiglu", "Fused SwiGLU"

    def enable(self, model, probe: Probe) -> bool:
        return use_fused_swiglu(model) > 0  # (again, where build_model did it); none: nothing to do

    def difference(self, model, probe: Probe, kept: dict) -> float:
        restore_swiglu(model)
        plain = logits(model, probe.padded)
        use_fused_swiglu(model)
        return largest_difference(logits(model, probe.padded), plain, probe.padded)

    def undo(self, model, probe: Probe) -> None:
        restore_swiglu(model)


FUSED_SWIGLU = FusedSwiGLU()

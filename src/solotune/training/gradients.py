"""The gradient check after the first applied step: every trainable parameter must have got a
finite gradient that is not all zero. A parameter backward never reached (a kernel without
autograd, a detached path) stops the run with exit status 2, naming it, instead of training
nothing and reporting a loss.
"""

from __future__ import annotations

import torch

from solotune.errors import SolotuneError
from solotune.parallel import sharding

# LoRA starts with B = 0 so that the adapted model equals the base (Hu et al., 2021); the
# gradient of A is B^T times the incoming gradient, all zero until B has moved.
_LORA_PAIRS = ((".lora_A.", ".lora_B."), (".lora_embedding_A.", ".lora_embedding_B."))


def _gradient_flags(p: torch.Tensor) -> torch.Tensor:
    """(finite, not all zero, the weight itself all zero) for a parameter's gradient, over the
    whole parameter (under FSDP2 each rank holds a shard: gathered, every rank calling)."""
    grad = sharding.full_tensor(p.grad)
    return torch.stack([grad.isfinite().all(), grad.ne(0).any(), sharding.full_tensor(p.detach()).eq(0).all()])


def check_gradients(model: torch.nn.Module) -> None:
    """Stop the run unless every trainable parameter got a finite gradient that is not all zero.

    Called on a step whose update applies (step.train_step): an fp16 step the gradient scaler
    skips has inf/NaN gradients by design. One device sync for the whole check.
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, p in named.items() if p.grad is None]
    present = [(n, p) for n, p in named.items() if p.grad is not None]
    flags = torch.stack([_gradient_flags(p) for _, p in present]).tolist() if present else []
    state = {n: f for (n, _), f in zip(present, flags)}
    nonfinite = [n for n, (finite, _, _) in state.items() if not finite]
    zero = [n for n, (_, nonzero, _) in state.items() if not nonzero and not _zero_by_lora_init(n, state)]
    problems = [
        (missing, "got no gradient (backward does not reach them)"),
        (nonfinite, "got inf/NaN gradients"),
        (zero, "got all-zero gradients"),
    ]
    found = [f"{len(names)} {what}: {_names(names)}" for names, what in problems if names]
    if found:
        raise SolotuneError(
            f"step 1: of {len(named)} trainable parameters, "
            + "; ".join(found)
            + ". This run cannot train them; nothing was saved"
        )


def _zero_by_lora_init(name: str, state: dict[str, list[bool]]) -> bool:
    for a, b in _LORA_PAIRS:
        if a in name:
            partner = state.get(name.replace(a, b))
            return partner is not None and partner[2]  # its B is still all zero
    return False


def _names(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more

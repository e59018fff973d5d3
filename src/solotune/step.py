"""One optimizer step: the maths every run, the estimator and the tests share.

The effective batch is split into micro-batches (gradient accumulation); each micro-batch's
summed loss is divided by the response-token count of the whole step, so the gradient and the
reported loss are exactly those of the full batch, however it is split.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from solotune import selfcheck
from solotune.adapters import release_dropout_caches
from solotune.data import Batch, Example, collate, collate_packed
from solotune.loss import ResponseLoss
from solotune.precision import PrecisionPolicy


class NonFiniteStep(Exception):
    """A step's loss or gradient is NaN or infinite (and no gradient scaler is there to skip it)."""


@dataclass
class StepResult:
    loss: float  # mean cross-entropy over the step's response tokens
    grad_norm: float  # before clipping
    skipped: bool  # fp16: the scaler found inf/NaN gradients and skipped the update


def make_batch(examples: list[Example], pad_id: int, padding_free: bool) -> Batch:
    """A micro-batch as one padding-free row, or padded to its longest record."""
    return collate_packed(examples) if padding_free else collate(examples, pad_id)


def accumulate_gradients(
    model,
    micro_batches: list[Batch],
    policy: PrecisionPolicy,
    loss_fn: ResponseLoss = ResponseLoss(),
    offload: bool = False,
) -> torch.Tensor:
    """Forward and backward over the effective batch's micro-batches; returns the step's loss.

    `offload` keeps the activations saved for backward in pinned CPU memory (CUDA), trading
    transfer time for GPU memory.
    """
    n_loss_tokens = sum(mb.n_loss_tokens for mb in micro_batches)
    step_loss = torch.zeros((), device=policy.device)
    saved_tensors = torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext()
    for mb in micro_batches:
        with saved_tensors:
            with policy.autocast():
                loss = loss_fn(model, mb) / n_loss_tokens
            policy.scaler.scale(loss).backward()
        release_dropout_caches()
        step_loss += loss.detach()
    return step_loss


def train_step(
    model,
    micro_batches: list[Batch],
    optimizer,
    scheduler,
    policy: PrecisionPolicy,
    max_grad_norm: float,
    loss_fn: ResponseLoss = ResponseLoss(),
    offload: bool = False,
    check_gradients: bool = False,
) -> StepResult:
    """One optimizer step: accumulate, unscale and clip, update (unless fp16 overflowed), zero.

    `check_gradients`: before the update, stop unless every trainable parameter got a gradient
    (selfcheck.check_gradients; the loop asks on its first step).
    """
    loss = accumulate_gradients(model, micro_batches, policy, loss_fn, offload)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    policy.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    if not policy.scaler.is_enabled() and not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep(
            f"non-finite {'loss' if not torch.isfinite(loss) else 'gradient'} "
            f"(loss {loss.item()}, gradient norm {grad_norm.item()})"
        )
    if check_gradients:  # after the non-finite guard, which names the records of a bad batch
        selfcheck.check_gradients(model, gradients_may_overflow=policy.scaler.is_enabled())
    scale_before = policy.scaler.get_scale()
    policy.scaler.step(optimizer)  # skips the update if the unscaled gradients hold inf/NaN
    policy.scaler.update()
    skipped = policy.scaler.get_scale() < scale_before
    if not skipped:  # a skipped step made no update: the schedule waits for the next real one
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss.item(), grad_norm.item(), skipped)

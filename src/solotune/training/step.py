"""One optimizer step: the maths every run, the estimator and the tests share.

The effective batch is split into micro-batches (gradient accumulation); each micro-batch's
summed loss is divided by the whole step's normalizer (its response tokens for SFT, its pairs for
a preference objective: training/objective.py), so the gradient and the reported loss are
exactly those of the full batch, however it is split.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from solotune.data import Batch
from solotune.model.dropout import keyed_by, release_dropout_caches
from solotune.model.precision import PrecisionPolicy
from solotune.parallel import dist, sharding
from solotune.training import gradients
from solotune.training.objective import SFT, Objective


class NonFiniteStep(Exception):
    """A step's loss or gradient is NaN or infinite (and no gradient scaler is there to skip it)."""


@dataclass
class StepResult:
    loss: float  # the objective's mean over the step (SFT: cross-entropy over its response tokens)
    grad_norm: float  # before clipping
    skipped: bool  # fp16: the scaler found inf/NaN gradients and skipped the update
    checked: bool = False  # every trainable parameter's gradient was checked (gradients.check_gradients)
    stats: dict[str, float] = field(default_factory=dict)  # the objective's statistics, means over the step


@dataclass(frozen=True)
class StepContext:
    """What every optimizer step of a run works with."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    policy: PrecisionPolicy
    objective: Objective = field(default_factory=SFT)
    max_grad_norm: float = 1.0  # 0: no clipping
    offload: bool = False  # activations saved for backward kept in pinned CPU memory (CUDA)
    world: dist.World = field(default_factory=dist.World)


def accumulate_gradients(
    model,
    micro_batches: list[Batch],
    policy: PrecisionPolicy,
    objective: Objective = SFT(),
    *,
    offload: bool = False,
    normalizer: int | None = None,
    idle_batch: Batch | None = None,
) -> torch.Tensor:
    """Forward and backward over the effective batch's micro-batches; returns the step's
    [loss, *statistics] (the objective's), each a mean over the step.

    `offload` keeps the activations saved for backward in pinned CPU memory (CUDA), trading
    transfer time for GPU memory. `normalizer`: the whole step's count the objective averages
    over, where `micro_batches` are one rank's share of it (default: theirs). `idle_batch`: under FSDP2, a
    rank with no share of a short last step must still join every layer's gather and
    reduce-scatter: it runs this micro-batch with its loss counted zero times. Each micro-batch's
    dropout masks are keyed to its tokens (model/dropout.py).
    """
    if normalizer is None:
        normalizer = sum(objective.batch_normalizer(mb) for mb in micro_batches)
    step_values = torch.zeros(1 + len(objective.stats), device=policy.device)
    if not micro_batches and idle_batch is not None:
        with policy.autocast():
            nothing = objective(model, idle_batch)[0] * 0.0
        nothing.backward()
    saved_tensors = torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext()
    for mb in micro_batches:
        with saved_tensors, keyed_by(mb.token_keys):  # backward too: checkpointing replays the forward
            with policy.autocast():
                values = objective(model, mb) / normalizer
            policy.scaler.scale(values[0]).backward()
        release_dropout_caches()
        step_values += values.detach()
    return step_values


def train_step(
    ctx: StepContext,
    micro_batches: list[Batch],
    *,
    normalizer: int | None = None,
    check_gradients: bool = False,
    idle_batch: Batch | None = None,
) -> StepResult:
    """One optimizer step: accumulate, unscale and clip, update (unless fp16 overflowed), zero.

    One device-to-host sync per step: the loss and the gradient norm are read together, and
    every decision (stop on NaN, skip an fp16 overflow) is made from those two numbers. A
    gradient norm is non-finite exactly when some gradient is, which is what the gradient scaler
    checks before it skips a step. `check_gradients`: before the update, stop unless every
    trainable parameter got a gradient (gradients.check_gradients, one more sync). It is made on
    a step the update applies: under fp16 the first steps overflow by design (the scaler starts
    high and halves until it fits), and an overflowed step's gradients, clipped by an infinite
    norm, read as zero. The loop asks until one step has been checked (`StepResult.checked`).
    Across ranks (`ctx.world`), `micro_batches` are this rank's share of a step whose objective
    averages over `normalizer` (its response tokens, or pairs), and one all-reduce sums gradients
    and the loss and statistics (dist.py); under FSDP2 backward has already summed each rank's
    shard of the gradients, and the all-reduce carries the loss and statistics alone
    (sharding.py). `idle_batch`: see accumulate_gradients.
    """
    model, optimizer, policy, world = ctx.model, ctx.optimizer, ctx.policy, ctx.world
    values = accumulate_gradients(
        model, micro_batches, policy, ctx.objective, offload=ctx.offload, normalizer=normalizer,
        idle_batch=idle_batch,
    )  # fmt: skip
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if world.size > 1 and sharding.is_sharded(model):
        values = dist.sum_step([], values)
    elif world.size > 1:
        for p in params:
            if p.grad is None:  # a rank with no micro-batch in a short last step
                p.grad = torch.zeros_like(p)
        values = dist.sum_step([p.grad for p in params], values)
    policy.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, ctx.max_grad_norm if ctx.max_grad_norm > 0 else math.inf)
    grad_norm = sharding.full_tensor(grad_norm)  # sharded gradients give a sharded norm
    norm = grad_norm.float().to(values.device, non_blocking=True).reshape(1)
    norm_value, loss_value, *stat_values = torch.cat([norm, values.float()]).tolist()
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    if not finite and not policy.scaler.is_enabled():
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep(
            f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient'} "
            f"(loss {loss_value}, gradient norm {norm_value})"
        )
    checked = check_gradients and finite  # after the non-finite guard, which names the records of a bad batch
    if checked:
        gradients.check_gradients(model)
    if finite:  # fp16: an overflow skips the update, and the schedule waits for the next real one
        optimizer.step()
        ctx.scheduler.step()
    policy.scaler.update()  # fp16: a smaller scale after an overflow, a larger one after enough clean steps
    optimizer.zero_grad(set_to_none=True)
    stats = dict(zip(ctx.objective.stats, stat_values))
    return StepResult(loss_value, norm_value, skipped=not finite, checked=checked, stats=stats)

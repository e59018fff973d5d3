"""The training loop: every optimizer step of a run, timed and measured, with checkpoints.

The loop measures itself: wall time less checkpoint writes and torch.compile's time, tokens,
model FLOPs and the peak memory of the loop alone. With a `Checkpointer` it resumes from a
checkpoint, saves on schedule, and on SIGINT/SIGTERM saves after the current step and stops
with the command that resumes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from solotune import artifacts
from solotune.config import TrainConfig
from solotune.data import Batch, largest_step_early, plan_steps, sequences_of, split_micro_batches
from solotune.errors import RunStopped, SolotuneError
from solotune.fastpaths.registry import FastPaths
from solotune.measure.flops import FlopModel
from solotune.measure.memory import MemoryBreakdown, PeakMemoryProbe, memory_report, step_size
from solotune.model.dropout import step_key
from solotune.model.precision import PrecisionPolicy
from solotune.parallel import dist, sharding
from solotune.training import checkpoint
from solotune.training.checkpoint import Checkpointer, StopRequests
from solotune.training.compile import CompiledLayers, choose_compile, compile_seconds
from solotune.training.objective import SFT, Objective
from solotune.training.optim import NoSchedule, NoUpdate, create_state, make_optimizer
from solotune.training.step import NonFiniteStep, StepContext, StepResult, train_step


class HeldOut(Protocol):
    """What the loop asks of a held-out set (evaluate.HeldOut): whether an evaluation is due,
    its loss and the objective's statistics, and to record the loss (the lowest so far in `best`)."""

    best: float

    def due(self, done: int, n_steps: int) -> bool: ...

    def evaluate(self, model, policy: PrecisionPolicy, fast: FastPaths, objective: Objective) -> dict: ...

    def record(self, step: int, loss: float) -> None: ...


MANY_SKIPS = 5  # consecutive fp16 overflow skips before a warning
NONFINITE_FILE = "nonfinite-step.json"  # in the run folder: the step and records that gave NaN/inf


@dataclass
class LoopResult:
    """What the loop measured. A checkpoint keeps all of it but `memory` (see `_records`)."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    stats: dict[str, list[float]] = field(default_factory=dict)  # the objective's, one value a step each
    step_seconds: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    tokens: int = 0  # non-padding tokens processed
    flops: float = 0.0  # model FLOPs of the steps (flops.py)
    positions: int = 0  # all positions, padding included
    runtime_s: float = 0.0  # the loop's wall time, less checkpoint writes, evaluation and compilation
    compile_s: float = 0.0  # torch.compile's time inside the loop (--train.compile)
    rehearsal_s: float = 0.0  # the memory breakdown's rehearsal of the largest step, before the loop
    eval_curve: list = field(default_factory=list)  # [step, eval loss] during training (--eval.every)
    eval_s: float = 0.0  # the evaluations' time inside the loop
    memory: dict = field(default_factory=dict)


class LoopClock:
    """The loop's training time: wall time less checkpoint writes, evaluations and torch.compile's
    time, added to what a resumed run's first part measured."""

    def __init__(self, result: LoopResult):
        self.runtime_before, self.compile_before = result.runtime_s, result.compile_s
        self.start, self.saving_s = time.perf_counter(), 0.0  # saving_s: checkpoint writes and evaluations

    def runtime(self, result: LoopResult) -> float:
        compiling = result.compile_s - self.compile_before
        return self.runtime_before + time.perf_counter() - self.start - self.saving_s - compiling


@dataclass
class LoopState:
    """What every step of the loop works on and adds to."""

    ctx: StepContext  # the model, optimizer, precision and the rest of what train_step needs
    cfg: TrainConfig
    fast: FastPaths
    schedule: Schedule
    checkpoints: Checkpointer | None
    flop_model: FlopModel
    result: LoopResult = field(default_factory=LoopResult)
    probe: PeakMemoryProbe | None = None
    peaks: list = field(default_factory=list)  # the probe's peaks before each checkpoint write
    consecutive_skips: int = 0
    gradients_checked: bool = False  # on the first step whose update applied (step.train_step)


def train_loop(
    model,
    examples: list,
    pad_id: int,
    policy: PrecisionPolicy,
    cfg: TrainConfig,
    *,
    fast: FastPaths | None = None,
    objective: Objective | None = None,
    compiling: bool | None = None,
    checkpoints: Checkpointer | None = None,
    world: dist.World = dist.World(),
    held_out: HeldOut | None = None,
    log: Callable[[int, dict], None] | None = None,
) -> LoopResult:
    """Run every optimizer step of the run; measure time, tokens and peak memory of the loop alone.

    `examples`: the units the steps take (Examples, or preference Pairs), which `objective`
    (default: SFT) scores. `fast` and `compiling`: the fast paths and compilation as the run
    decided them at set-up (run/train.py); by default those `cfg` asks for, unchecked, and
    `cfg.compile` decided here.
    Across ranks (`world`, dist.py) each runs its share of every step's micro-batches; the
    counts and the memory are then the job's: tokens summed, each rank's peak listed.
    `held_out`: the eval loss every `held_out.every` steps, kept out of the training time.
    `log(step, values)`: each step's numbers, for the experiment trackers (trackers.py).
    """
    schedule = Schedule.plan(examples, pad_id, cfg)
    n_steps = len(schedule.steps)
    optimizer, scheduler = make_optimizer(model, cfg, n_steps)
    create_state(optimizer)  # before the rehearsal and the first step: nothing that persists grows later
    fast = fast or FastPaths.asked(cfg)
    objective = objective or SFT(fast.ce_chunk)
    step_ctx = StepContext(
        model, optimizer, scheduler, policy, objective, cfg.max_grad_norm, cfg.offload_activations, world
    )
    run = LoopState(step_ctx, cfg, fast, schedule, checkpoints, FlopModel.of(model))
    run.probe = PeakMemoryProbe(policy.device)
    breakdown = MemoryBreakdown(cfg.track_memory, model, optimizer, policy.device)
    if compiling is None:
        compiling, why = choose_compile(cfg.compile, cfg.track_memory, policy.device, n_steps)
        if cfg.compile == "auto":
            print(why)
    first = _resume(run, n_steps)
    if held_out:  # a resumed run's earlier evaluations count for --eval.keep-best
        held_out.best = min([held_out.best, *(loss for _, loss in run.result.eval_curve)])
    model.train()
    clock = LoopClock(run.result)
    with (
        fast.during_steps(model, max(len(s.input_ids) for s in sequences_of(examples))),
        CompiledLayers(model) if compiling else contextlib.nullcontext() as compiled,
        breakdown,
        # Under several processes a signal stops the job (torchrun passes it on); it resumes from
        # the last periodic checkpoint, since the ranks could not agree on the step to save at.
        StopRequests() if checkpoints and world.size == 1 else contextlib.nullcontext() as stop,
    ):
        if cfg.track_memory == "peak" and world.size == 1 and first == 0:  # one process, from the start
            with compiled.eager() if compiled else contextlib.nullcontext():
                _rehearse(run, breakdown, clock)
        run.probe.reset()  # the loop's own peak, from here
        for step in (bar := _progress_bar(first, n_steps, world)):
            out = _take_step(run, step, breakdown, compiled)
            stopped = compiled.stop_if_over_budget(run.result.compile_s) if compiled else None
            if stopped:
                tqdm.write(stopped)
            _show_progress(bar, run, out, clock)
            if log:
                log(step + 1, _step_values(run.result))
            if held_out and held_out.due(step + 1, n_steps):
                _evaluate(run, held_out, step + 1, clock, log)
            _checkpoint_if_due(run, step + 1, n_steps, stop, clock)
    return _finish(run, breakdown, clock)


@dataclass(frozen=True)
class Schedule:
    """Which records each optimizer step takes, in the order the loop runs them."""

    steps: list[list[int]]  # indices into `examples`, one list per step
    examples: list  # the units: Examples, or preference Pairs
    pad_id: int
    steps_per_epoch: int

    @classmethod
    def plan(cls, examples: list, pad_id: int, cfg: TrainConfig) -> Schedule:
        """The steps of `cfg`'s epochs (cut at max_steps), with the largest early (largest_first)."""
        steps = plan_steps(len(examples), cfg.batch, cfg.epochs, cfg.seed, cfg.shuffle)
        steps = steps[: cfg.max_steps] if cfg.max_steps else steps
        schedule = cls(steps, examples, pad_id, steps_per_epoch=-(-len(examples) // cfg.batch))
        if cfg.largest_first and cfg.shuffle:  # unshuffled, the data's own order is kept
            steps = largest_step_early(steps, schedule.steps_per_epoch, schedule.size)
        return dataclasses.replace(schedule, steps=steps)

    def size(self, step: list[int]) -> tuple[int, int]:
        """What orders the steps for largest_first: the step as a padded batch (records x the
        longest), then its tokens. From the data alone, so that every technique (padding-free or
        not, any accumulation or process count) trains in the same order and an ablation's cells
        stay comparable. The padded size also bounds the layout padding-free attention may pad a
        row into, so the step it picks is rarely exceeded in any of `step_size`'s measures."""
        lengths = [len(s.input_ids) for s in sequences_of([self.examples[i] for i in step])]
        return len(lengths) * max(lengths), sum(lengths)

    def largest(self) -> list[int]:
        """The largest step of the first epoch (with largest_first, the first step)."""
        return max(self.steps[: self.steps_per_epoch], key=self.size)

    def micro_batches(self, step: list[int], parts: int) -> list[list]:
        """The units of `step` split into `parts` micro-batches (a pair's sequences stay together)."""
        return [[self.examples[i] for i in mb] for mb in split_micro_batches(step, parts)]


def _take_step(run: LoopState, step: int, breakdown: MemoryBreakdown, compiled: CompiledLayers | None) -> StepResult:
    """Optimizer step `step`: this rank's share of its micro-batches, with the step's dropout key,
    followed by the memory breakdown (and run eager) where it may set a part's peak."""
    cfg, fast, world, schedule = run.cfg, run.fast, run.ctx.world, run.schedule
    step_records = schedule.micro_batches(schedule.steps[step], cfg.grad_accum * world.size)
    records = world.shard(step_records)
    lengths = [[len(s.input_ids) for s in sequences_of(r)] for r in records] or [[0]]
    followed = breakdown.follows(step_size(lengths, fast.padding_free))
    objective = run.ctx.objective
    with breakdown.step(followed), compiled.eager() if compiled and followed else contextlib.nullcontext():
        key = step_key(cfg.seed, step)  # the step's dropout masks (model/dropout.py)
        micro = [objective.batch(r, fast, schedule.pad_id).for_step(key) for r in records]
        # The whole step's: every rank counts the others' units on the host too, so none has to ask.
        normalizer = objective.normalizer([schedule.examples[i] for i in schedule.steps[step]])
        idle = None
        if not micro and sharding.is_sharded(run.ctx.model):
            idle = objective.batch(step_records[0], fast, schedule.pad_id)
        return _run_step(run, micro, step, normalizer, idle_batch=idle)


def _finish(run: LoopState, breakdown: MemoryBreakdown, clock: LoopClock) -> LoopResult:
    """The loop's time and memory report; across ranks, the job's counts."""
    run.result.runtime_s = clock.runtime(run.result)
    peak = max(run.peaks + [run.probe.read()], key=lambda p: p.peak_mib)
    run.result.memory = {
        **memory_report(peak, breakdown.tracker(), breakdown.part_max_mib()),
        "tracked_steps": breakdown.tracked_steps,
        "rehearsal_s": run.result.rehearsal_s,
    }
    if run.ctx.world.size > 1:
        _sum_over_ranks(run.result)
    return run.result


def _rehearse(run: LoopState, breakdown: MemoryBreakdown, clock: LoopClock) -> None:
    """The memory breakdown of the run's largest step, measured before the loop on a step that
    changes nothing: the real forward and backward, then an update that allocates and computes
    what a real one does at learning rate 0 on zero gradients (optim.NoUpdate), the random
    stream and the loss scale kept as they were. The loop then follows no step that this one is
    at least as large as: the breakdown's per-op tracking (~10 untracked steps' time on a GPU)
    costs the loop nothing. Its time is kept apart, as the rehearsal's."""
    cfg, policy, schedule = run.cfg, run.ctx.policy, run.schedule
    records = schedule.micro_batches(schedule.largest(), cfg.grad_accum)
    size = step_size([[len(s.input_ids) for s in sequences_of(r)] for r in records], run.fast.padding_free)
    scale = policy.scaler.state_dict()
    start = time.perf_counter()
    devices = [policy.device] if policy.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), breakdown.rehearsal(size):
        micro = [run.ctx.objective.batch(r, run.fast, schedule.pad_id).to(policy.device) for r in records]
        try:
            train_step(
                dataclasses.replace(run.ctx, optimizer=NoUpdate(run.ctx.optimizer), scheduler=NoSchedule()), micro
            )
        except NonFiniteStep:  # the loop's first step names the records
            pass
    if policy.scaler.is_enabled():
        policy.scaler.load_state_dict(scale)
    run.result.rehearsal_s = time.perf_counter() - start
    clock.saving_s += run.result.rehearsal_s


def _step_values(result: LoopResult) -> dict:
    """The last step's numbers, as the trackers get them."""
    return {
        "train/loss": result.losses[-1],
        "train/lr": result.lrs[-1],
        "train/grad_norm": result.grad_norms[-1],
        "train/step_seconds": result.step_seconds[-1],
        **{f"train/{name}": values[-1] for name, values in result.stats.items()},
    }


def _evaluate(run: LoopState, held_out: HeldOut, done: int, clock: LoopClock, log) -> None:
    """The eval loss after step `done`, kept out of the training time, shown and logged."""
    start = time.perf_counter()
    values = held_out.evaluate(run.ctx.model, run.ctx.policy, run.fast, run.ctx.objective)
    loss = values["loss"]
    run.result.eval_curve.append([done, loss])
    held_out.record(done, loss)
    seconds = time.perf_counter() - start
    run.result.eval_s += seconds
    clock.saving_s += seconds
    if run.ctx.world.main:
        tqdm.write(f"step {done}: eval " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in values.items()))
    if log:
        log(done, {f"eval/{k}": v for k, v in values.items()})


def _progress_bar(first: int, n_steps: int, world: dist.World) -> tqdm:
    return tqdm(
        range(first, n_steps),
        desc="train",
        unit="step",
        dynamic_ncols=True,
        initial=first,
        total=n_steps,
        disable=not world.main,  # rank 0 shows the job's progress
    )


def _sum_over_ranks(result: LoopResult) -> None:
    """The job's counts (tokens, positions, FLOPs summed) and every rank's peak memory."""
    result.tokens, result.positions, result.flops = (
        int(v) if i < 2 else v for i, v in enumerate(dist.sum_counts(result.tokens, result.positions, result.flops))
    )
    result.memory["per_rank_peak_mib"] = dist.gather(result.memory["peak_mib"])


def _resume(run: LoopState, n_steps: int) -> int:
    """Restore the checkpoint the run resumes from, if any; returns the first step to run."""
    start = run.checkpoints.resume_from if run.checkpoints else None
    if start is None:
        return 0
    ctx = run.ctx
    restored = checkpoint.restore(start, ctx.model, ctx.optimizer, ctx.scheduler, ctx.policy.scaler, ctx.world.rank)
    run.result = LoopResult(**restored)
    print(f"resumed from {start.path}: step {start.step} of {n_steps}")
    return start.step


def _run_step(run: LoopState, micro: list[Batch], step: int, normalizer: int, idle_batch: Batch | None) -> StepResult:
    """One optimizer step, timed, with its records added to the loop's (`idle_batch`: train_step's)."""
    result = run.result
    # On the host copies: no device sync. A reference pass (DPO under LoRA) is one more forward.
    result.flops += run.flop_model.step_flops(micro)
    result.flops += run.ctx.objective.reference_passes * run.flop_model.forward_flops(micro)
    device = run.ctx.policy.device
    micro = [mb.to(device) for mb in micro]
    result.lrs.append(run.ctx.scheduler.get_last_lr()[0])
    start, compiled_before = time.perf_counter(), compile_seconds()
    idle_batch = idle_batch.to(device) if idle_batch is not None else None
    out = _guarded_step(run, micro, step, normalizer, idle_batch)
    run.gradients_checked = run.gradients_checked or out.checked
    compile_s = compile_seconds() - compiled_before
    result.step_seconds.append(time.perf_counter() - start - compile_s)
    result.compile_s += compile_s
    result.losses.append(out.loss)
    result.grad_norms.append(out.grad_norm)
    for name, value in out.stats.items():
        result.stats.setdefault(name, []).append(value)
    result.skipped_steps += out.skipped
    result.tokens += sum(mb.n_tokens for mb in micro)
    result.positions += sum(mb.n_positions for mb in micro)
    run.consecutive_skips = run.consecutive_skips + 1 if out.skipped else 0
    if run.consecutive_skips == MANY_SKIPS:
        tqdm.write(
            f"warning: fp16: the last {MANY_SKIPS} steps were all skipped by the gradient scaler "
            f"(inf/NaN gradients; loss scale now {run.ctx.policy.scaler.get_scale():g}); consider --mp bf16"
        )
    return out


def _guarded_step(
    run: LoopState, micro: list[Batch], step: int, normalizer: int, idle_batch: Batch | None
) -> StepResult:
    """`train_step`, stopping the run on a NaN/inf loss or gradient (outside fp16, where the
    scaler skips such steps) before it reaches the weights, naming the records of the step."""
    try:
        return train_step(
            run.ctx, micro, normalizer=normalizer, check_gradients=not run.gradients_checked,
            idle_batch=idle_batch,
        )  # fmt: skip
    except NonFiniteStep as e:
        records = [i for mb in micro for i in mb.record_indices]
        where = f"step {step + 1}, records {records} (0-based indices in the data file)"
        if run.checkpoints and run.ctx.world.main:
            run_dir = run.checkpoints.run_dir
            artifacts.write_json(run_dir / NONFINITE_FILE, {"step": step + 1, "records": records, "what": str(e)})
            last = checkpoint.latest(run_dir)
            where += f"; written to {run_dir / NONFINITE_FILE}"
            where += f"; last good checkpoint: {last.path}" if last else "; no checkpoint yet (see --train.save-every)"
        raise SolotuneError(f"{e} at {where}. Lower --lr, check these records, or use --mp bf16/off") from None


def _show_progress(bar: tqdm, run: LoopState, out: StepResult, clock: LoopClock) -> None:
    pairs = {"reward_acc": f"{out.stats['reward_accuracy']:.2f}"} if "reward_accuracy" in out.stats else {}
    bar.set_postfix(
        loss=f"{out.loss:.4f}",
        **pairs,
        tok_s=f"{run.result.tokens / clock.runtime(run.result):.0f}",
        peak_mib=f"{run.probe.read().peak_mib:.0f}",
    )


def _checkpoint_if_due(run: LoopState, done: int, n_steps: int, stop: StopRequests | None, clock: LoopClock) -> None:
    """Save when the schedule says so, at the end of a run that saves, or when a signal asks the
    run to stop; then stop with the command that resumes it."""
    ckpt = run.checkpoints
    if ckpt is None:
        return
    stopping = stop is not None and stop.signal_name is not None
    if not (ckpt.due(done) or stopping or (run.cfg.save_every and done == n_steps)):
        return
    run.result.runtime_s = clock.runtime(run.result)
    saved = _save_checkpoint(run, done, clock)
    if stopping:
        raise RunStopped(
            f"stopped by {stop.signal_name} after step {done} of {n_steps}; checkpoint: {saved}; "
            f"continue with: solotune train --resume {ckpt.run_dir}"
        )


def _save_checkpoint(run: LoopState, step: int, clock: LoopClock) -> Path:
    """Save a checkpoint and return where.

    Writing a checkpoint is not training: the peak reached so far is kept in `run.peaks` and the
    probe restarts after the write, and the clock leaves the write's seconds out of the runtime.
    """
    run.peaks.append(run.probe.read())
    start = time.perf_counter()
    ckpt = run.checkpoints
    ctx = run.ctx
    rank_rngs = dist.gather(checkpoint.rng_state()) if ctx.world.size > 1 else None
    saved = ckpt.run_dir / checkpoint.CHECKPOINTS_DIR / f"step-{step:06d}"
    # The trained state is the same on every rank, or (FSDP2) gathered from their shards by
    # every rank together: rank 0 writes it.
    trained = None
    if sharding.is_sharded(ctx.model):
        trained = checkpoint.trained_state(ctx.model, ctx.optimizer, keep=ctx.world.main)
    if ctx.world.main:
        payload = checkpoint.Payload(
            step, ctx.model, ctx.optimizer, ctx.scheduler, ctx.policy.scaler, _records(run.result), rank_rngs, trained
        )
        saved = checkpoint.save(ckpt.run_dir, payload, ckpt.fingerprint, keep=run.cfg.keep)
    clock.saving_s += time.perf_counter() - start
    run.probe.reset()
    return saved


def _records(result: LoopResult) -> dict:
    """The loop's records so far, as a checkpoint keeps them (the memory report is per process)."""
    return {k: v for k, v in dataclasses.asdict(result).items() if k != "memory"}

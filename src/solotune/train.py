"""The training run: set-up, the loop, one optimizer step, and the metrics of the run.

Flow: config -> precision policy -> tokenizer + data (checked before any model work) -> model
-> LoRA or full fine-tune -> generations before -> loop -> generations after -> artifacts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
import transformers
from tqdm import tqdm
from transformers.modeling_layers import GradientCheckpointingLayer

import solotune
from solotune import allocator, artifacts, checkpoint, selfcheck
from solotune.adapters import (
    apply_lora,
    count_parameters,
    prepare_full_finetune,
    release_dropout_caches,
    resolve_targets,
    save_trained,
)
from solotune.attention import enable_padding_free
from solotune.checkpoint import Checkpointer, StopRequests
from solotune.config import RunConfig, TrainConfig, parse_size, to_dict, validate
from solotune.data import (
    Batch,
    Example,
    collate,
    collate_packed,
    plan_steps,
    read_records,
    split_micro_batches,
    tokenize_records,
)
from solotune.errors import RunStopped, SolotuneError
from solotune.flops import FlopModel, matmul_peak_flops
from solotune.generate import Generation, generate, print_generations
from solotune.loss import ResponseLoss
from solotune.memory import PeakMemoryProbe, TensorMemoryTracker, apply_memory_limit, memory_report
from solotune.models import load_model, load_tokenizer, resolve_model_source
from solotune.precision import DTYPE_NAMES, PrecisionPolicy, resolve_policy
from solotune.quant import new_optimizer, quantization_config, quantized_linears, save_record
from solotune.swiglu import use_fused_swiglu

MANY_SKIPS = 5  # consecutive fp16 overflow skips before a warning


class NonFiniteStep(Exception):
    """A step's loss or gradient is NaN or infinite (and no gradient scaler is there to skip it)."""


@dataclass
class StepResult:
    loss: float  # mean cross-entropy over the step's response tokens
    grad_norm: float  # before clipping
    skipped: bool  # fp16: the scaler found inf/NaN gradients and skipped the update


@dataclass
class LoopResult:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    tokens: int = 0  # non-padding tokens processed
    flops: float = 0.0  # model FLOPs of the steps (flops.py)
    positions: int = 0  # all positions, padding included
    runtime_s: float = 0.0  # the loop's wall time, less checkpoint writes and compilation
    compile_s: float = 0.0  # torch.compile's time inside the loop (--train.compile)
    memory: dict = field(default_factory=dict)


def accumulate_gradients(
    model,
    micro_batches: list[Batch],
    policy: PrecisionPolicy,
    loss_fn: ResponseLoss = ResponseLoss(),
    offload: bool = False,
) -> torch.Tensor:
    """Forward and backward over the effective batch's micro-batches; returns the step's loss.

    Each micro-batch's summed loss is divided by the response-token count of the whole step,
    so the accumulated gradient and the reported loss are exactly those of the full batch,
    however it is split. `offload` keeps the activations saved for backward in pinned CPU
    memory (CUDA), trading transfer time for GPU memory.
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


def make_optimizer(model, cfg: TrainConfig, total_steps: int, device: torch.device = torch.device("cpu")):
    """The configured optimizer (AdamW by default) over the trainable parameters, with warm-up
    and the configured decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = new_optimizer(cfg.optim, params, cfg.lr, cfg.weight_decay, device)
    name = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
    warmup = round(cfg.warmup_ratio * total_steps)
    scheduler = transformers.get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return optimizer, scheduler


def train_loop(
    model,
    examples: list[Example],
    pad_id: int,
    policy: PrecisionPolicy,
    cfg: TrainConfig,
    checkpoints: Checkpointer | None = None,
) -> LoopResult:
    """Run every optimizer step of the run; measure time, tokens and peak memory of the loop alone.

    With `checkpoints`, the loop resumes from its checkpoint (if any), saves on schedule, and
    on SIGINT/SIGTERM saves after the current step and stops with the command that resumes it.
    """
    steps = plan_steps(len(examples), cfg.batch, cfg.epochs, cfg.seed, cfg.shuffle)
    steps = steps[: cfg.max_steps] if cfg.max_steps else steps
    optimizer, scheduler = make_optimizer(model, cfg, len(steps), policy.device)
    result, probe = LoopResult(), PeakMemoryProbe(policy.device)
    tracker = TensorMemoryTracker(model, optimizer, policy.device) if cfg.track_memory else None
    loss_fn = ResponseLoss(cfg.ce_chunk)
    flop_model = FlopModel.of(model)
    if cfg.padding_free:
        enable_padding_free(model, max(len(e.input_ids) for e in examples))
    first = 0
    if checkpoints and checkpoints.resume_from:
        result = LoopResult(**checkpoint.restore(checkpoints.resume_from, model, optimizer, scheduler, policy.scaler))
        first = checkpoints.resume_from.step
        print(f"resumed from {checkpoints.resume_from.path}: step {first} of {len(steps)}")
    model.train()
    peaks, previous_runtime, saving_s, skip_run = [], result.runtime_s, 0.0, 0
    compiled_at_start = result.compile_s
    probe.reset()
    start = time.perf_counter()
    bar = tqdm(range(first, len(steps)), desc="train", unit="step", dynamic_ncols=True, initial=first, total=len(steps))
    compiled = compiled_layers(model) if cfg.compile else contextlib.nullcontext()
    with (
        compiled,
        tracker or contextlib.nullcontext(),
        StopRequests() if checkpoints else contextlib.nullcontext() as stop,
    ):
        for step in bar:
            micro = [
                make_batch([examples[i] for i in mb], pad_id, cfg.padding_free)
                for mb in split_micro_batches(steps[step], cfg.grad_accum)
            ]
            result.flops += flop_model.step_flops(micro)  # on the host copies: no device sync
            micro = [mb.to(policy.device) for mb in micro]
            result.lrs.append(scheduler.get_last_lr()[0])
            out, seconds, compile_s = _timed_step(
                model, micro, optimizer, scheduler, policy, cfg, loss_fn, step, checkpoints, step == first
            )
            result.step_seconds.append(seconds)
            result.compile_s += compile_s
            _record_step(result, out, micro)
            skip_run = skip_run + 1 if out.skipped else 0
            if skip_run == MANY_SKIPS:
                tqdm.write(
                    f"warning: fp16: the last {skip_run} steps were all skipped by the gradient scaler "
                    f"(inf/NaN gradients; loss scale now {policy.scaler.get_scale():g}); consider --mp bf16"
                )
            elapsed = time.perf_counter() - start - saving_s - (result.compile_s - compiled_at_start)
            bar.set_postfix(
                loss=f"{out.loss:.4f}",
                tok_s=f"{result.tokens / (previous_runtime + elapsed):.0f}",
                peak_mib=f"{probe.read().peak_mib:.0f}",
            )
            stopping = stop is not None and stop.signal_name is not None
            if checkpoints and (checkpoints.due(step + 1) or stopping or (cfg.save_every and step + 1 == len(steps))):
                result.runtime_s = previous_runtime + elapsed
                saved, seconds = _save_checkpoint(
                    checkpoints, step + 1, model, optimizer, scheduler, policy, result, cfg.keep, probe, peaks
                )
                saving_s += seconds
            if stopping:
                raise RunStopped(
                    f"stopped by {stop.signal_name} after step {step + 1} of {len(steps)}; checkpoint: {saved}; "
                    f"continue with: solotune train --resume {checkpoints.run_dir}"
                )
    result.runtime_s = (
        previous_runtime + time.perf_counter() - start - saving_s - (result.compile_s - compiled_at_start)
    )
    result.memory = memory_report(max(peaks + [probe.read()], key=lambda p: p.peak_mib), tracker)
    return result


@contextlib.contextmanager
def compiled_layers(model, backend: str = "inductor"):
    """torch.compile every decoder layer's forward for the loop; eager again afterwards.

    Layers, not the whole model: all layers share one compiled graph, the loss and LM head
    stay eager, and a graph break costs one layer, not the step. Shapes are dynamic from the
    start, so a new record length does not recompile (a new number of records per micro-batch
    does, once: the last step's when the batch does not divide the data). Generation, before
    and after the loop, runs eager: it would otherwise compile graphs of its own.
    """
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise SolotuneError(f"train.compile: found no decoder layers to compile in {type(model).__name__}")
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=True, backend=backend)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute: the class's eager forward again


def compile_seconds() -> float:
    """Seconds torch.compile has spent so far in this process (Dynamo + Inductor, all frames)."""
    from torch._dynamo.utils import compilation_time_metrics  # private, but the only such record

    return sum(compilation_time_metrics.get("_compile.compile_inner", []))


def _save_checkpoint(
    checkpoints: Checkpointer,
    step: int,
    model,
    optimizer,
    scheduler,
    policy,
    result: LoopResult,
    keep: int,
    probe: PeakMemoryProbe,
    peaks: list,
) -> tuple[Path, float]:
    """Save a checkpoint; returns where and the seconds it took.

    Writing a checkpoint is not training: the peak reached so far is kept in `peaks` and the
    probe restarts after the write, and the caller leaves the seconds out of the runtime.
    """
    peaks.append(probe.read())
    start = time.perf_counter()
    saved = checkpoint.save(
        checkpoints.run_dir,
        step,
        model,
        optimizer,
        scheduler,
        policy.scaler,
        _records(result),
        checkpoints.fingerprint,
        keep,
    )
    seconds = time.perf_counter() - start
    probe.reset()
    return saved, seconds


def _records(result: LoopResult) -> dict:
    """The loop's records so far, as a checkpoint keeps them (the memory report is per process)."""
    return {k: v for k, v in dataclasses.asdict(result).items() if k != "memory"}


def _timed_step(*step_args) -> tuple[StepResult, float, float]:
    """`_guarded_step`, with its seconds less torch.compile's, and torch.compile's seconds."""
    start, compiled_before = time.perf_counter(), compile_seconds()
    out = _guarded_step(*step_args)
    compile_s = compile_seconds() - compiled_before
    return out, time.perf_counter() - start - compile_s, compile_s


def _guarded_step(
    model,
    micro,
    optimizer,
    scheduler,
    policy,
    cfg: TrainConfig,
    loss_fn,
    step: int,
    checkpoints: Checkpointer | None,
    check_gradients: bool,
) -> StepResult:
    """`train_step`, stopping the run on a NaN/inf loss or gradient (outside fp16, where the
    scaler skips such steps) before it reaches the weights."""
    try:
        return train_step(
            model,
            micro,
            optimizer,
            scheduler,
            policy,
            cfg.max_grad_norm,
            loss_fn,
            cfg.offload_activations,
            check_gradients,
        )
    except NonFiniteStep as e:
        records = [i for mb in micro for i in mb.record_indices]
        where = f"step {step + 1}, records {records} (0-based indices in the data file)"
        if checkpoints:
            artifacts.write_json(
                checkpoints.run_dir / "nonfinite-step.json", {"step": step + 1, "records": records, "what": str(e)}
            )
            last = checkpoint.latest(checkpoints.run_dir)
            where += f"; written to {checkpoints.run_dir / 'nonfinite-step.json'}"
            where += f"; last good checkpoint: {last.path}" if last else "; no checkpoint yet (see --train.save-every)"
        raise SolotuneError(f"{e} at {where}. Lower --lr, check these records, or use --mp bf16/off") from None


def make_batch(examples: list[Example], pad_id: int, padding_free: bool) -> Batch:
    """A micro-batch as one padding-free row, or padded to its longest record."""
    return collate_packed(examples) if padding_free else collate(examples, pad_id)


def _record_step(result: LoopResult, out: StepResult, micro: list[Batch]) -> None:
    result.losses.append(out.loss)
    result.grad_norms.append(out.grad_norm)
    result.skipped_steps += out.skipped
    result.tokens += sum(mb.n_tokens for mb in micro)
    result.positions += sum(mb.n_positions for mb in micro)


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them.

    Non-reentrant checkpointing works with frozen inputs (LoRA) without hooks on the embeddings.
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def build_model(source: str, cfg: RunConfig, policy: PrecisionPolicy):
    """Load the model in the policy's dtype and set it up for LoRA or full fine-tuning.

    A run then keeps each fast path only where it matches the model's plain forward
    (`selfcheck.choose_fast_paths`).
    """
    model = load_model(
        source, cfg.model, policy.base_dtype, policy.device, quantization_config(cfg.quant, policy.compute_dtype)
    )
    if cfg.train.fused_swiglu:
        use_fused_swiglu(model)
    if cfg.train.grad_checkpointing:
        enable_checkpointing(model)
    if not cfg.lora.enabled:
        return prepare_full_finetune(model)
    print(resolve_targets(model, cfg.lora.target_modules)[1])
    return apply_lora(model, cfg.lora)


def run_training(cfg: RunConfig, resume: bool = False) -> dict:
    """A whole `solotune train` run; returns the metrics it also writes to metrics.json.

    `resume`: continue the unfinished run in `cfg.output_dir` from its newest checkpoint.
    """
    validate(cfg)
    transformers.set_seed(cfg.train.seed)
    policy = resolve_policy(cfg.precision, cfg.device, frozen_base=cfg.lora.enabled)
    print(policy.describe())
    print(allocator.describe(cfg.cpu_allocator))
    if cfg.train.offload_activations and policy.device.type != "cuda":
        raise SolotuneError(
            "train.offload_activations moves activations from the GPU to CPU memory; it needs --device cuda"
        )
    if cfg.mem_limit:
        print(apply_memory_limit(parse_size(cfg.mem_limit), policy.device))
    with artifacts.run_folder(cfg.output_dir) as out_dir:
        artifacts.write_yaml(out_dir / artifacts.CONFIG_FILE, to_dict(cfg))
        return _run(cfg, policy, out_dir, resume)


def _run(cfg: RunConfig, policy: PrecisionPolicy, out_dir: Path, resume: bool) -> dict:
    records = read_records(cfg.data)  # a missing or unreadable data file fails before any model work
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model)
    examples, data_stats, fmt = tokenize_records(records, tokenizer, cfg.data)
    print(
        f"data: {len(examples)} examples ({fmt}) from {cfg.data.path or 'the built-in data set'}, "
        f"{data_stats.tokens:,} tokens, {data_stats.truncated} truncated, {data_stats.dropped} dropped"
    )
    if data_stats.skipped:
        print(f"data: {data_stats.skipped} malformed records skipped, e.g. " + "; ".join(data_stats.skip_reasons))
    checkpoints = _checkpointer(cfg, examples, out_dir, resume)

    start = time.perf_counter()
    model = build_model(source, cfg, policy)
    load_s = time.perf_counter() - start
    params = count_parameters(model)
    print(params.line())
    quantized = quantized_linears(model)
    if quantized:
        print(quantized.line())

    fast = selfcheck.choose_fast_paths(model, examples, tokenizer.pad_token_id, policy, cfg.train, cfg.data.max_len)
    print("\n".join([fast.line(), *fast.notes]))
    train_cfg = dataclasses.replace(
        cfg.train, fused_swiglu=fast.fused_swiglu, padding_free=fast.padding_free, ce_chunk=fast.ce_chunk
    )

    before = _generations_before(model, tokenizer, cfg, policy, out_dir, resume)
    loop = train_loop(model, examples, tokenizer.pad_token_id, policy, train_cfg, checkpoints)
    # The trained weights first: nothing after the loop (generations, the matmul peak) can lose them.
    saved = out_dir / ("adapter" if cfg.lora.enabled else "model")
    save_trained(model, tokenizer, saved)
    if quantized:
        save_record(saved, cfg.quant, policy.compute_dtype)
    after = generate(model, tokenizer, cfg.generate, policy) if cfg.generate.enabled else []
    peak_flops = matmul_peak_flops(policy.device, policy.compute_dtype)  # measured after the loop, cached

    metrics = collect_metrics(
        cfg, policy, source, load_s, params, data_stats, fmt, loop, before, after, saved, peak_flops
    )
    metrics["quantized_linears"] = quantized.as_dict() if quantized else None
    metrics["fast_paths"] = fast.as_dict()
    artifacts.write_json(out_dir / artifacts.METRICS_FILE, metrics)
    if before:
        print_generations("before fine-tuning", before)
        print_generations("after fine-tuning", after)
    print_summary(metrics, out_dir)
    return metrics


def _checkpointer(cfg: RunConfig, examples: list[Example], out_dir: Path, resume: bool) -> Checkpointer:
    """Checkpointing for this run; when resuming, the checkpoint to start from, checked against
    this run's config and data before any model work."""
    run_fingerprint = checkpoint.fingerprint(to_dict(cfg), examples)
    start = None
    if resume:
        start = checkpoint.latest(out_dir)
        if start is None:
            raise SolotuneError(f"--resume: no complete checkpoint in {out_dir / checkpoint.CHECKPOINTS_DIR}")
        checkpoint.check_compatible(start.state["fingerprint"], run_fingerprint, start.path)
    return Checkpointer(out_dir, cfg.train.save_every, cfg.train.keep, run_fingerprint, start)


def _generations_before(model, tokenizer, cfg: RunConfig, policy, out_dir: Path, resume: bool) -> list:
    """The generations before training; a resumed run reuses those its first part recorded."""
    saved = out_dir / "generations-before.json"
    if not cfg.generate.enabled:
        return []
    if resume and saved.is_file():
        return [Generation.from_dict(g) for g in artifacts.read_json(saved)["generations"]]
    before = generate(model, tokenizer, cfg.generate, policy)
    artifacts.write_json(saved, {"generations": [g.as_dict() for g in before]})
    return before


def collect_metrics(
    cfg,
    policy,
    source,
    load_s,
    params,
    data_stats,
    fmt,
    loop: LoopResult,
    before,
    after,
    saved: Path,
    peak_flops: float,
) -> dict:
    """Everything measured in the run, with the resolved config and library versions."""
    n_steps = len(loop.losses)
    flops_per_s = loop.flops / loop.runtime_s
    return {
        "solotune_version": solotune.__version__,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "config": to_dict(cfg),
        "device": str(policy.device),
        "machine": {
            **artifacts.machine_info(),
            "gpu": torch.cuda.get_device_name(policy.device) if policy.device.type == "cuda" else None,
            "cpu_allocator": allocator.in_use(),
        },
        "precision": {
            "mp": policy.mp,
            "base_dtype": DTYPE_NAMES[policy.base_dtype],
            "grad_scaler": policy.scaler.is_enabled(),
            "decisions": policy.reasons,
        },
        "model": {"source": source, "load_s": load_s},
        "params": {
            "trainable": params.trainable,
            "total": params.total,
            "trainable_pct": params.trainable_pct,
            "line": params.line(),
        },
        "data": {"format": fmt, **vars(data_stats)},
        "train": {
            "steps": n_steps,
            "runtime_s": loop.runtime_s,
            "compile_s": loop.compile_s,
            "tokens": loop.tokens,
            "tokens_per_s": loop.tokens / loop.runtime_s,
            "padding_fraction": 1 - loop.tokens / loop.positions,
            "model_tflops": loop.flops / 1e12,
            "model_gflops_per_s": flops_per_s / 1e9,
            "matmul_peak_gflops_per_s": peak_flops / 1e9,  # measured on this device, compute dtype
            "mfu": flops_per_s / peak_flops,
            "avg_loss": sum(loop.losses) / n_steps,
            "final_loss": loop.losses[-1],
            "skipped_steps": loop.skipped_steps,
            "step_seconds": loop.step_seconds,
            "loss_curve": loop.losses,
            "grad_norms": loop.grad_norms,
            "lr": loop.lrs,
        },
        "memory": loop.memory,
        "generations": {"before": [g.as_dict() for g in before], "after": [g.as_dict() for g in after]},
        "artifacts": {"trained": str(saved)},
    }


def print_summary(m: dict, out_dir: Path) -> None:
    t, mem = m["train"], m["memory"]
    where = "CUDA allocator peak" if mem["kind"] == "cuda_allocator" else "peak RSS of the loop"
    parts = (
        f"tensor peak {mem['tracked_peak_mib']:,.1f} MiB = parameters {mem['parameters_mib']:,.1f} + gradients "
        f"{mem['gradients_mib']:,.1f} + optimizer state {mem['optimizer_state_mib']:,.1f} + activations {mem['activations_mib']:,.1f}"
        f"; runtime and untracked {mem['untracked_mib']:,.1f} MiB"
        if mem["tracked_peak_mib"] is not None
        else "no breakdown (--train.track-memory false)"
    )
    compiled = f" + compilation {t['compile_s']:.1f} s" if t.get("compile_s") else ""
    reserved = f", reserved {mem['reserved_mib']:,.0f} MiB" if mem["reserved_mib"] is not None else ""
    print(
        f"\n== run summary ==\n{m['params']['line']}\n"
        f"steps: {t['steps']}  average loss: {t['avg_loss']:.4f}  final loss: {t['final_loss']:.4f}\n"
        f"{where}: {mem['peak_mib']:,.0f} MiB{reserved}\n{parts}\n"
        f"runtime: {t['runtime_s']:.1f} s{compiled} (model load {m['model']['load_s']:.1f} s)  "
        f"throughput: {t['tokens_per_s']:.0f} tokens/s  padding: {100 * t['padding_fraction']:.1f}%  "
        f"MFU: {100 * t['mfu']:.0f}% ({t['model_gflops_per_s']:.0f} of {t['matmul_peak_gflops_per_s']:.0f} GFLOP/s, "
        "the measured matmul peak)\n"
        f"saved: {m['artifacts']['trained']}  metrics: {out_dir / artifacts.METRICS_FILE}"
    )
    if t["skipped_steps"]:
        print(f"fp16: {t['skipped_steps']} of {t['steps']} steps skipped by the gradient scaler (overflow)")

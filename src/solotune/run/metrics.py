"""A run's metrics.json and its printed summary.

Every number a run reports is assembled here, from what the set-up and the loop measured
(`RunOutcome`); `report` and `ablate` read these keys back, so they do not change lightly.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import transformers

import solotune
from solotune import artifacts
from solotune.config import RunConfig, to_dict
from solotune.data import DataStats
from solotune.fastpaths.registry import FastPaths
from solotune.measure import allocator
from solotune.model.adapters import ParamSummary
from solotune.model.precision import DTYPE_NAMES, PrecisionPolicy
from solotune.model.quant import QuantizedLinears
from solotune.run.generate import Generation
from solotune.training.loop import LoopResult


@dataclass
class RunOutcome:
    """What a finished run set up, measured and saved."""

    cfg: RunConfig
    policy: PrecisionPolicy
    source: str  # where the model was loaded from
    load_s: float
    params: ParamSummary
    data_stats: DataStats
    data_format: str
    fast_paths: FastPaths
    quantized: QuantizedLinears | None
    loop: LoopResult
    before: list[Generation]
    after: list[Generation]
    saved: Path  # the trained adapter or model
    matmul_peak_flops: float  # measured on this device in the compute dtype
    evaluation: dict | None = None  # evaluate.Evaluation.metrics, where held-out records were given
    objective: dict | None = None  # the objective and its settings (training/objective.py)


def library_versions() -> dict:
    """The versions a run's numbers depend on."""
    return {
        "solotune": solotune.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def collect_metrics(run: RunOutcome) -> dict:
    """Everything measured in the run, with the resolved config and library versions."""
    policy = run.policy
    return {
        "solotune_version": solotune.__version__,
        "versions": library_versions(),
        "config": to_dict(run.cfg),
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
        "model": {"source": run.source, "load_s": run.load_s},
        "params": {
            "trainable": run.params.trainable,
            "total": run.params.total,
            "trainable_pct": run.params.trainable_pct,
            "line": run.params.line(),
        },
        "data": {"format": run.data_format, **vars(run.data_stats)},
        "train": _train_metrics(run.loop, run.matmul_peak_flops),
        "memory": run.loop.memory,
        "generations": {"before": [g.as_dict() for g in run.before], "after": [g.as_dict() for g in run.after]},
        "eval": run.evaluation,
        "artifacts": {"trained": str(run.saved)},
        "quantized_linears": run.quantized.as_dict() if run.quantized else None,
        "fast_paths": run.fast_paths.as_dict(),
        "objective": run.objective or {"method": "sft"},
    }


def _train_metrics(loop: LoopResult, peak_flops: float) -> dict:
    n_steps = len(loop.losses)
    flops_per_s = loop.flops / loop.runtime_s
    return {
        "steps": n_steps,
        "runtime_s": loop.runtime_s,
        "compile_s": loop.compile_s,
        "tokens": loop.tokens,
        "tokens_per_s": loop.tokens / loop.runtime_s,
        "padding_fraction": 1 - loop.tokens / loop.positions,
        "model_tflops": loop.flops / 1e12,
        "model_gflops_per_s": flops_per_s / 1e9,
        "matmul_peak_gflops_per_s": peak_flops / 1e9,
        "mfu": flops_per_s / peak_flops,
        "avg_loss": sum(loop.losses) / n_steps,
        "final_loss": loop.losses[-1],
        "skipped_steps": loop.skipped_steps,
        "step_seconds": loop.step_seconds,
        "loss_curve": loop.losses,
        "grad_norms": loop.grad_norms,
        "lr": loop.lrs,
        # the objective's statistics per step (preference: reward accuracy, rewards, margin)
        "stats": loop.stats,
    }


def print_summary(m: dict, out_dir: Path) -> None:
    """The run's headline numbers: parameters, loss, peak memory and its parts, speed."""
    t, mem = m["train"], m["memory"]
    where = "CUDA allocator peak" if mem["kind"] == "cuda_allocator" else "peak RSS of the loop"
    # Time kept out of the loop's runtime: compiling, and the memory breakdown's rehearsal of the
    # largest step before the loop (training/loop.py).
    apart = f" + compilation {t['compile_s']:.1f} s" if t.get("compile_s") else ""
    apart += f" + breakdown rehearsal {mem['rehearsal_s']:.1f} s" if mem.get("rehearsal_s") else ""
    reserved = f", reserved {mem['reserved_mib']:,.0f} MiB" if mem["reserved_mib"] is not None else ""
    per_rank = mem.get("per_rank_peak_mib")
    ranks = f" (rank 0; each rank: {' / '.join(f'{p:,.0f}' for p in per_rank)} MiB)" if per_rank else ""
    print(
        f"\n== run summary ==\n{m['params']['line']}\n"
        f"steps: {t['steps']}  average loss: {t['avg_loss']:.4f}  final loss: {t['final_loss']:.4f}\n"
        f"{where}: {mem['peak_mib']:,.0f} MiB{reserved}{ranks}\n{_memory_parts(mem)}\n"
        f"runtime: {t['runtime_s']:.1f} s{apart} (model load {m['model']['load_s']:.1f} s)  "
        f"throughput: {t['tokens_per_s']:.0f} tokens/s  padding: {100 * t['padding_fraction']:.1f}%  "
        f"MFU: {100 * t['mfu']:.0f}% ({t['model_gflops_per_s']:.0f} of {t['matmul_peak_gflops_per_s']:.0f} GFLOP/s, "
        "the measured matmul peak)\n"
        f"saved: {m['artifacts']['trained']}  metrics: {out_dir / artifacts.METRICS_FILE}"
    )
    if t.get("stats"):
        print(_pair_line(t["stats"]))
    if m.get("eval"):
        print(_eval_line(m["eval"]))
    if m.get("export"):
        from solotune.run.export import Exported, describe

        print(describe(Exported(**m["export"])))
    if t["skipped_steps"]:
        print(f"fp16: {t['skipped_steps']} of {t['steps']} steps skipped by the gradient scaler (overflow)")


def _pair_line(stats: dict) -> str:
    """The preference statistics of the last step."""
    return (
        f"last step: reward accuracy {100 * stats['reward_accuracy'][-1]:.0f}%, chosen reward "
        f"{stats['chosen_reward'][-1]:+.4f}, rejected reward {stats['rejected_reward'][-1]:+.4f}, "
        f"margin {stats['margin'][-1]:+.4f}"
    )


def _eval_line(e: dict) -> str:
    line = f"eval: loss {e['loss_before']:.4f} -> {e['loss_after']:.4f} on {e['records']} held-out records"
    if "reward_accuracy_before" in e:
        line += (
            f"; reward accuracy {100 * e['reward_accuracy_before']:.0f}% -> {100 * e['reward_accuracy_after']:.0f}%, "
            f"margin {e['margin_before']:+.4f} -> {e['margin_after']:+.4f}"
        )
    if "accuracy_before" in e:
        a, b = e["accuracy_before"], e["accuracy_after"]
        line += (
            f"; task accuracy ({e['metric']}) {100 * a['accuracy']:.0f}% -> {100 * b['accuracy']:.0f}% "
            f"({a['correct']} -> {b['correct']} of {b['records']}; generation {a['seconds'] + b['seconds']:.1f} s)"
        )
    return line


def _memory_parts(mem: dict) -> str:
    if mem["tracked_peak_mib"] is None:
        return "no breakdown (--train.track-memory off)"
    return (
        f"tensor peak {mem['tracked_peak_mib']:,.1f} MiB = parameters {mem['parameters_mib']:,.1f} + gradients "
        f"{mem['gradients_mib']:,.1f} + optimizer state {mem['optimizer_state_mib']:,.1f} + activations "
        f"{mem['activations_mib']:,.1f}; runtime and untracked {mem['untracked_mib']:,.1f} MiB"
    )

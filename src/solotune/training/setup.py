"""The model as a run trains it: loaded, its techniques switched on, LoRA or full fine-tuning,
its fast paths and compilation decided, sharded under FSDP2.

`prepare_model` is the one sequence of set-up steps; `train` runs it on the loaded weights
(`set_up_model`) and `estimate` on a model made from its config alone, so the two cannot drift
apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from solotune.config import RunConfig
from solotune.data import count_steps, sequences_of
from solotune.fastpaths import cpu_bf16, selfcheck
from solotune.fastpaths.registry import FastPaths
from solotune.fastpaths.swiglu import use_fused_swiglu
from solotune.model.adapters import ParamSummary, apply_lora, count_parameters, prepare_full_finetune, resolve_targets
from solotune.model.models import load_model
from solotune.model.precision import PrecisionPolicy
from solotune.model.quant import QuantizedLinears, quantization_config, quantized_linears
from solotune.parallel import dist, sharding
from solotune.training.compile import choose_compile


def build_model(source: str, cfg: RunConfig, policy: PrecisionPolicy):
    """Load the model in the policy's dtype (its base quantized if asked) and prepare it.

    A run then keeps each fast path only where it matches the model's plain forward
    (`selfcheck.choose_fast_paths`).
    """
    model = load_model(
        source, cfg.model, policy.base_dtype, policy.device, quantization_config(cfg.quant, policy.compute_dtype)
    )
    if cfg.lora.enabled:
        print(resolve_targets(model, cfg.lora.target_modules)[1])
    model = prepare_model(model, cfg)
    if cpu_bf16.emulates_bf16(policy):
        cpu_bf16.use_fast_layouts(model)
    return model


def prepare_model(model, cfg: RunConfig):
    """Switch on the fused SwiGLU and gradient checkpointing as configured, then add LoRA adapters
    (or make every weight trainable). Returns the model to train (a PEFT wrapper with LoRA).

    Padding-free attention is switched on later, by the loop, once the longest record is known.
    """
    if cfg.train.fused_swiglu:
        use_fused_swiglu(model)
    if cfg.train.grad_checkpointing:
        enable_checkpointing(model)
    return apply_lora(model, cfg.lora) if cfg.lora.enabled else prepare_full_finetune(model)


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them.

    Non-reentrant checkpointing works with frozen inputs (LoRA) without hooks on the embeddings.
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


@dataclass
class ModelSetup:
    """The model as the loop trains it, and what setting it up measured and decided."""

    model: torch.nn.Module
    load_s: float
    params: ParamSummary
    quantized: QuantizedLinears | None
    fast: FastPaths  # the fast paths the set-up check kept
    compiling: bool  # the loop compiles its layers (training/compile.py)
    sharded: bool  # FSDP2 (sharding.py)


def set_up_model(
    cfg: RunConfig, policy: PrecisionPolicy, world: dist.World, source: str, examples: list, pad_id: int
) -> ModelSetup:
    """Load and prepare the model, decide compilation, check its fast paths (each decided once,
    here), and shard it under FSDP2; what each step printed, the run's output shows."""
    start = time.perf_counter()
    model = build_model(source, cfg, policy)
    load_s = time.perf_counter() - start
    params = count_parameters(model)
    print(params.line())
    quantized = quantized_linears(model)
    if quantized:
        print(quantized.line())
    t = cfg.train
    n_steps = count_steps(len(examples), t.batch, t.epochs, t.max_steps)
    compiling, why = choose_compile(t.compile, t.track_memory, policy.device, n_steps)
    print(why)
    run = selfcheck.RunShape(sequences_of(examples), pad_id, policy, t, cfg.data.max_len)
    fast = selfcheck.choose_fast_paths(model, run, compiling=compiling)
    print("\n".join([fast.line(), *fast.notes]))
    sharded = cfg.dist_mode() == "fsdp"
    if world.size > 1:
        print(_describe_dist(cfg.dist_mode(), world))
    if sharded:  # after the set-up check, which compares paths on the whole model
        sharding.shard_model(model, policy.compute_dtype)
    return ModelSetup(model, load_s, params, quantized, fast, compiling, sharded)


def _describe_dist(mode: str, world: dist.World) -> str:
    if mode == "fsdp":
        return f"dist: fsdp over {world.size} processes (each holds 1/{world.size} of the weights, gradients and optimizer state)"
    return f"dist: ddp over {world.size} processes (each holds the whole model; one all-reduce a step)"

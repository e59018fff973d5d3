"""The model as a run trains it: loaded, its techniques switched on, LoRA or full fine-tuning.

`prepare_model` is the one sequence of set-up steps; `train` runs it on the loaded weights and
`estimate` on a model made from its config alone, so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from solotune.adapters import apply_lora, prepare_full_finetune, resolve_targets
from solotune.config import RunConfig
from solotune.errors import SolotuneError
from solotune.models import load_model
from solotune.precision import PrecisionPolicy
from solotune.quant import quantization_config
from solotune.swiglu import use_fused_swiglu


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
    return prepare_model(model, cfg)


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

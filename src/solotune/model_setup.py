"""The model as a run trains it: loaded, its techniques switched on, LoRA or full fine-tuning.

`prepare_model` is the one sequence of set-up steps; `train` runs it on the loaded weights and
`estimate` on a model made from its config alone, so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from solotune import cpu_bf16
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


COMPILE_MIN_STEPS = 100  # --train.compile auto: on CUDA, runs at least this long compile


def choose_compile(requested: str, track_memory: str, device: torch.device, n_steps: int) -> tuple[bool, str]:
    """Whether the loop compiles its layers, and the line that says why.

    auto compiles on a GPU for runs of COMPILE_MIN_STEPS steps or more, where the compile time
    (tens of seconds) pays back; on the CPU the gain depends on the step's length (measured 1.19x
    at 16-second steps), so it stays a choice there.
    """
    if requested != "auto":
        return requested == "on", f"compile: {requested} (requested)"
    if track_memory == "always":
        return False, "compile: off (auto: every step is tracked, and tracked steps run eager)"
    if device.type != "cuda":
        return False, "compile: off (auto: on the CPU compiling pays back only for long steps; --train.compile)"
    if n_steps < COMPILE_MIN_STEPS:
        return False, f"compile: off (auto: {n_steps} steps are too few to pay back the compile time)"
    return True, f"compile: on (auto: a GPU and {n_steps} steps)"


class CompiledLayers:
    """torch.compile every decoder layer's forward for the loop; eager again afterwards.

    Layers, not the whole model: all layers share one compiled graph, the loss and LM head
    stay eager, and a graph break costs one layer, not the step. Shapes are dynamic from the
    start, so a new record length does not recompile (a new number of records per micro-batch
    does, once: the last step's when the batch does not divide the data). Generation, before
    and after the loop, runs eager: it would otherwise compile graphs of its own. `eager()`
    runs a step uncompiled (the memory tracker's per-op hook cannot be traced).
    """

    def __init__(self, model, backend: str = "inductor"):
        self.layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not self.layers:
            raise SolotuneError(f"train.compile: found no decoder layers to compile in {type(model).__name__}")
        self.compiled = [torch.compile(layer.forward, dynamic=True, backend=backend) for layer in self.layers]

    def __enter__(self) -> CompiledLayers:
        for layer, forward in zip(self.layers, self.compiled):
            layer.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)  # the instance attribute: the class's eager forward again

    @contextlib.contextmanager
    def eager(self):
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()


def compile_seconds() -> float:
    """Seconds torch.compile has spent so far in this process (Dynamo + Inductor, all frames)."""
    from torch._dynamo.utils import compilation_time_metrics  # private, but the only such record

    return sum(compilation_time_metrics.get("_compile.compile_inner", []))

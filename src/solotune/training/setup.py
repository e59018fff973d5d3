"""The model as a run trains it: loaded, its techniques switched on, LoRA or full fine-tuning.

`prepare_model` is the one sequence of set-up steps; `train` runs it on the loaded weights and
`estimate` on a model made from its config alone, so the two cannot drift apart.
"""

from __future__ import annotations

from solotune.config import RunConfig
from solotune.fastpaths import cpu_bf16
from solotune.fastpaths.swiglu import use_fused_swiglu
from solotune.model.adapters import apply_lora, prepare_full_finetune, resolve_targets
from solotune.model.models import load_model
from solotune.model.precision import PrecisionPolicy
from solotune.model.quant import quantization_config


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

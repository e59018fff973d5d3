"""LoRA injection (via peft), full fine-tuning set-up, parameter counts, saving and merging."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers.pytorch_utils import Conv1D

from solotune.config import REFERENCE_PROMPTS, LoraConfig, ModelConfig
from solotune.errors import SolotuneError
from solotune.model.dropout import use_keyed_dropout
from solotune.model.models import load_model, load_tokenizer, resolve_model_source
from solotune.model.precision import DTYPE_NAMES
from solotune.model.quant import quantization_config, read_record
from solotune.prompting import copy_format


@dataclass
class ParamSummary:
    trainable: int
    total: int

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / self.total

    def line(self) -> str:
        """The line peft and the reference experiment print."""
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.trainable_pct:.4f}"
        )


def count_parameters(model: torch.nn.Module) -> ParamSummary:
    """Trainable and total parameter counts (tied weights counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return ParamSummary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(_weights_held(p) for p in params),
    )


def _weights_held(p: torch.Tensor) -> int:
    """How many weights a parameter holds: a 4-bit one packs two in each byte of its storage."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


ATTENTION = "attention"  # lora.target_modules keyword: the model's attention input projections
ALL_LINEAR = "all-linear"  # every linear layer but the LM head (peft's keyword)
# The short names architectures give the projection that leaves an attention block (o_proj in
# Llama, c_proj in GPT-2, dense in GPT-NeoX and Phi, out_proj, wo): not an input projection.
OUTPUT_PROJECTIONS = frozenset({"o_proj", "out_proj", "c_proj", "dense", "wo", "o"})


def is_linear(module: torch.nn.Module) -> bool:
    """A layer LoRA can adapt: nn.Linear (bitsandbytes' too) or GPT-2's transposed Conv1D."""
    return isinstance(module, (torch.nn.Linear, Conv1D))


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct short names of the model's linear layers (what target_modules may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if is_linear(m)})


def attention_projections(model: torch.nn.Module) -> list[str]:
    """The short names of the layers that project each attention block's input: q, k and v, or
    a fused qkv (GPT-2's c_attn, GPT-NeoX's query_key_value, Phi-3's qkv_proj).

    Found from the model's structure: the linear layers inside its attention modules (classes
    named *Attention), less the output projection. peft's per-architecture list is the fallback
    where the structure does not say; it names q and v alone for Llama, where the reference
    experiment adapts q, k and v.
    """
    names: dict[str, None] = {}
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            for name, child in module.named_modules():
                short = name.rsplit(".", 1)[-1]
                if is_linear(child) and short not in OUTPUT_PROJECTIONS:
                    names[short] = None
    if names:
        return list(names)
    model_type = getattr(model.config, "model_type", None)
    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type, []))


def resolve_targets(model: torch.nn.Module, targets: list[str]) -> tuple[list[str] | str, str]:
    """What peft should adapt for `lora.target_modules`, and a line saying what that is."""
    if targets == [ALL_LINEAR]:
        return ALL_LINEAR, "lora targets: all-linear (every linear layer but the LM head)"
    if targets == [ATTENTION]:
        found = attention_projections(model)
        if found:
            return (
                found,
                f"lora targets: {', '.join(found)} (the attention input projections of {type(model).__name__})",
            )
        return ALL_LINEAR, (
            f"lora targets: all-linear (found no attention projections in {type(model).__name__}; "
            "name them with --target-modules)"
        )
    available = linear_module_names(model)
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise SolotuneError(
            f"lora.target_modules: {', '.join(unknown)} not in this model; its linear layers "
            f"are: {', '.join(available)} (or use {ATTENTION} or {ALL_LINEAR})"
        )
    return targets, f"lora targets: {', '.join(targets)} (requested)"


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> PeftModel:
    """Freeze the model and wrap the target layers with trainable LoRA adapters."""
    targets, _ = resolve_targets(model, cfg.target_modules)
    adapted = [m for name, m in model.named_modules() if targets == ALL_LINEAR or name.rsplit(".", 1)[-1] in targets]
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        bias="none",
        # Conv1D stores its weight transposed (in x out); peft must be told, or it warns and guesses.
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in adapted),
    )
    # autocast_adapter_dtype keeps the adapter weights in fp32 when the base is bf16/fp16:
    # they are the trained weights, and small updates must not round away.
    linears = linear_module_names(model)  # before peft, which may have wrapped some when it refuses
    try:
        model = get_peft_model(model, peft_cfg, autocast_adapter_dtype=True)
    except ValueError as e:  # peft refuses a target it cannot adapt (Mamba's out_proj, say)
        raise SolotuneError(
            f"LoRA cannot adapt {type(model).__name__} this way: {str(e).strip().splitlines()[0]} "
            f"Its linear layers: {', '.join(linears)}; choose with --lora.target-modules"
        ) from None
    if cfg.dropout > 0:
        use_keyed_dropout(model, shared=cfg.shared_dropout)
    return model


def prepare_full_finetune(model: torch.nn.Module) -> torch.nn.Module:
    """Full fine-tuning: every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_trained(model: torch.nn.Module, tokenizer, folder: Path, state_dict: dict | None = None) -> None:
    """LoRA: the adapter in PEFT format; full fine-tune: a complete HF model. Safetensors both.
    `state_dict`: the weights to write, where the model holds only a shard of them (FSDP2)."""
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> PeftModel:
    """Wrap a base model with a saved adapter (for inference)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SolotuneError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    return PeftModel.from_pretrained(model, adapter_dir)


def adapter_base_model(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on, as recorded in its adapter_config.json."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise SolotuneError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    base = json.loads(path.read_text()).get("base_model_name_or_path")
    if not base:
        raise SolotuneError(f"{path} names no base model; pass --model")
    return base


def merge_adapter(model: PeftModel) -> torch.nn.Module:
    """Fold the LoRA update into the base weights and drop the adapter wrappers."""
    return model.merge_and_unload()


def merge_to_folder(adapter_dir: str, output_dir: str, model_name: str | None = None) -> float:
    """Merge an adapter into its base, save a plain HF model; return the max logit difference."""
    merged, tokenizer, merge = merged_model(adapter_dir, model_name)
    merged.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    copy_format(adapter_dir, output_dir)  # the merged model is asked as the adapter was trained
    print(f"{merge.line}: saved {output_dir}")
    return merge.max_logit_diff


@dataclass
class Merge:
    """How a merge went: what it folded into what, and how far the merged outputs moved."""

    line: str
    max_logit_diff: float
    base: str  # the base model's folder (or hub id)


def merged_model(adapter_dir: str | Path, model_name: str | None = None) -> tuple[torch.nn.Module, object, Merge]:
    """An adapter folded into its fp32 base: the plain model, its tokenizer and how it went.

    The difference between the adapter model and the merged model on a probe text is reported,
    so the user sees that the merge preserved the outputs (it is ~1e-6, rounding only). A QLoRA
    adapter is merged into its de-quantized base instead (`merge_quantized`).
    """
    mcfg = ModelConfig(name=model_name or adapter_base_model(adapter_dir))
    source = resolve_model_source(mcfg)
    tokenizer = load_tokenizer(str(adapter_dir), mcfg)
    quant = read_record(adapter_dir)
    if quant:
        return merge_quantized(adapter_dir, source, mcfg, tokenizer, *quant)
    model = load_adapter(load_model(source, mcfg, torch.float32, torch.device("cpu")), adapter_dir).eval()
    probe = tokenizer("Merging folds the low-rank update into the weights.", return_tensors="pt")
    with torch.inference_mode():
        before = model(**probe).logits
        merged = merge_adapter(model)
        diff = (merged(**probe).logits - before).abs().max().item()
    line = f"merged {adapter_dir} into {source} (max logit difference vs adapter: {diff:.2e})"
    return merged, tokenizer, Merge(line, diff, source)


def merge_quantized(
    adapter_dir, source: str, mcfg: ModelConfig, tokenizer, quant, dtype: torch.dtype
) -> tuple[torch.nn.Module, object, Merge]:
    """Merge a QLoRA adapter into its base de-quantized to the compute dtype.

    The merged model multiplies the same de-quantized weights the 4-bit model did, plus the
    folded update, so it should answer as the adapter on the 4-bit base does. The largest logit
    difference between the two on the evaluation prompts is reported.
    """
    probes = [tokenizer(p, return_tensors="pt") for p in REFERENCE_PROMPTS]
    quantized = quantization_config(quant, dtype)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        adapted = load_adapter(load_model(source, mcfg, dtype, cpu, quantized), adapter_dir).eval()
        reference = [adapted(**p).logits.float() for p in probes]
        base = adapted.unload().dequantize(dtype=dtype)  # the same 4-bit base, not loaded twice
        merged = merge_adapter(load_adapter(base, adapter_dir).eval())
        diff = max((merged(**p).logits.float() - ref).abs().max().item() for p, ref in zip(probes, reference))
    scale = max(ref.abs().max().item() for ref in reference)
    line = (
        f"merged {adapter_dir} into {source} de-quantized from {quant.method} to {DTYPE_NAMES[dtype]} "
        f"(max logit difference vs the adapter on the {quant.method} base, {len(probes)} evaluation prompts: "
        f"{diff:.2e}, {diff / scale:.1e} of the largest logit)"
    )
    return merged, tokenizer, Merge(line, diff, source)

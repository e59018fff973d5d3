"""Generation from prompts, with timing."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from solotune.config import GenerateConfig, ModelConfig, PrecisionConfig
from solotune.data import format_instruction
from solotune.model.adapters import adapter_base_model, load_adapter
from solotune.model.models import load_model, load_tokenizer, resolve_model_source
from solotune.model.precision import PrecisionPolicy, resolve_policy
from solotune.model.quant import quantization_config, read_record
from solotune.parallel import sharding


@dataclass
class Generation:
    prompt: str  # what the user wrote (prompt or instruction)
    text: str  # the generated continuation only
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 2)}

    @classmethod
    def from_dict(cls, d: dict) -> Generation:
        return cls(d["prompt"], d["text"], d["new_tokens"], d["seconds"])


def eval_inputs(cfg: GenerateConfig) -> list[tuple[str, str]]:
    """(shown prompt, model input) pairs: raw prompts as given, instructions templated."""
    return [(p, p) for p in cfg.prompts] + [(i, format_instruction(i)) for i in cfg.instructions]


def generate(model, tokenizer, cfg: GenerateConfig, policy: PrecisionPolicy) -> list[Generation]:
    """Generate a continuation for every evaluation prompt, one at a time (so each is timed alone).

    In inference mode, except under FSDP2: the weights it gathers for the forward are tensors it
    keeps and trains later, and a tensor made in inference mode cannot take part in training.
    """
    with torch.no_grad(), torch.inference_mode(not sharding.is_sharded(model)):
        results = _generate(model, tokenizer, cfg, policy)
    sharding.reshard(model)  # FSDP2: a forward without backward leaves the root's weights gathered
    return results


def _generate(model, tokenizer, cfg: GenerateConfig, policy: PrecisionPolicy) -> list[Generation]:
    was_training = model.training
    model.eval()
    results = []
    for shown, text in eval_inputs(cfg):
        inputs = tokenizer(text, return_tensors="pt").to(policy.device)
        sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.do_sample else {}
        start = time.perf_counter()
        with policy.autocast():
            out = model.generate(
                **inputs,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=cfg.do_sample,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
        if policy.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        new = out[0, inputs["input_ids"].shape[1] :]
        results.append(Generation(shown, tokenizer.decode(new, skip_special_tokens=True), len(new), seconds))
    model.train(was_training)
    return results


def print_generations(title: str, generations: list[Generation]) -> None:
    print(f"\n== {title} ==")
    for g in generations:
        print(
            f"> {g.prompt!r}\n  {g.text.strip()!r}\n  ({g.new_tokens} tokens in {g.seconds:.2f} s, {g.tokens_per_s:.1f} tokens/s)"
        )


def load_for_inference(adapter: str | None, model_name: str | None, precision: PrecisionConfig, device: str):
    """(model, tokenizer, policy) for a base model, a saved adapter on its base, or a full fine-tune."""
    policy = resolve_policy(precision, device, frozen_base=True)
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        model_name, adapter = adapter, None  # a full fine-tune folder is a plain HF model
    if adapter and model_name is None:
        model_name = adapter_base_model(adapter)
    mcfg = ModelConfig(name=model_name)
    source = resolve_model_source(mcfg)
    tokenizer = load_tokenizer(adapter or source, mcfg)
    quant = read_record(adapter) if adapter else None  # a QLoRA adapter runs on its 4-bit base
    model = load_model(source, mcfg, policy.base_dtype, policy.device, quant and quantization_config(*quant))
    if adapter:
        model = load_adapter(model, adapter)
    return model, tokenizer, policy

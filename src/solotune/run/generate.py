"""Generation from prompts, in batches, with timing; the prompts put in the format the model was
trained in (prompting.py)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from solotune.config import GenerateConfig, ModelConfig, PrecisionConfig
from solotune.model.adapters import adapter_base_model, load_adapter
from solotune.model.models import load_model, load_tokenizer, resolve_model_source
from solotune.model.precision import PrecisionPolicy, resolve_policy
from solotune.model.quant import quantization_config, read_record
from solotune.parallel import sharding
from solotune.prompting import Ask, PromptFormat, format_for

BATCH = 8  # prompts generated together, left-padded


@dataclass
class Generation:
    prompt: str  # what the user wrote (prompt or instruction)
    text: str  # the generated continuation only
    new_tokens: int
    seconds: float  # its batch's generation time (prompts of a batch are generated together)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 2)}

    @classmethod
    def from_dict(cls, d: dict) -> Generation:
        return cls(d["prompt"], d["text"], d["new_tokens"], d["seconds"])


def eval_inputs(cfg: GenerateConfig, fmt: PromptFormat, tokenizer) -> list[Ask]:
    """A run's prompts: `prompts` as given, `instructions` in the format the model was trained in
    (the Alpaca template, its chat template, ...)."""
    return [Ask(p, p) for p in cfg.prompts] + [fmt.ask(i, tokenizer) for i in cfg.instructions]


def generate(model, tokenizer, inputs: list[Ask], cfg: GenerateConfig, policy) -> list[Generation]:
    """A continuation of every prompt of `inputs`, BATCH at a time, with `cfg`'s decoding settings.

    In inference mode, except under FSDP2: the weights it gathers for the forward are tensors it
    keeps and trains later, and a tensor made in inference mode cannot take part in training.
    """
    was_training = model.training
    model.eval()
    results = []
    with torch.no_grad(), torch.inference_mode(not sharding.is_sharded(model)):
        for start in range(0, len(inputs), BATCH):
            results += generate_batch(model, tokenizer, inputs[start : start + BATCH], cfg, policy)
    model.train(was_training)
    sharding.reshard(model)  # FSDP2: a forward without backward leaves the root's weights gathered
    return results


def generate_batch(model, tokenizer, inputs: list[Ask], cfg: GenerateConfig, policy) -> list[Generation]:
    """One batch: left-padded, so that every row continues at its end; each row's new tokens
    counted up to its end of sequence."""
    batch = encode_left_padded(tokenizer, inputs).to(policy.device)
    start = time.perf_counter()
    with policy.autocast():
        out = model.generate(**batch, **decoding(cfg, tokenizer))
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    results = []
    for ask, row in zip(inputs, out[:, batch["input_ids"].shape[1] :].tolist()):
        new = _until_end(row, tokenizer)
        results.append(Generation(ask.shown, tokenizer.decode(new, skip_special_tokens=True), len(new), seconds))
    return results


def decoding(cfg: GenerateConfig, tokenizer) -> dict:
    """`model.generate`'s decoding arguments for `cfg`."""
    out = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample, "pad_token_id": tokenizer.pad_token_id}
    if cfg.do_sample:
        out.update(temperature=cfg.temperature, top_p=cfg.top_p)
    if cfg.static_cache:
        out["cache_implementation"] = "static"
    return out


def encode_left_padded(tokenizer, inputs: list[Ask]):
    """Token ids and attention mask of `inputs`, each encoded as its format says, padded on the left."""
    rows = [tokenizer(a.text, add_special_tokens=a.special_tokens)["input_ids"] for a in inputs]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side


def _until_end(tokens: list[int], tokenizer) -> list[int]:
    """A row's generated tokens up to and including its end of sequence (the rest is padding)."""
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    for i, token in enumerate(tokens):
        if token in ends:
            return tokens[: i + 1]
    return tokens


def print_generations(title: str, generations: list[Generation]) -> None:
    print(f"\n== {title} ==")
    for g in generations:
        print(
            f"> {g.prompt!r}\n  {g.text.strip()!r}\n  ({g.new_tokens} tokens, {g.tokens_per_s:.1f} tokens/s in its batch)"
        )
    total_s = sum(_batch_seconds(generations))
    if generations and total_s > 0:
        new = sum(g.new_tokens for g in generations)
        print(f"  overall: {new} tokens in {total_s:.2f} s, {new / total_s:.1f} tokens/s ({len(generations)} prompts)")


def _batch_seconds(generations: list[Generation]) -> list[float]:
    """Each batch's time once: the prompts of a batch share it."""
    return [g.seconds for i, g in enumerate(generations) if i % BATCH == 0]


@dataclass
class Loaded:
    """A model ready to answer: its tokenizer, precision, and the format to ask it in."""

    model: torch.nn.Module
    tokenizer: object
    policy: PrecisionPolicy
    format: PromptFormat


def load_for_inference(adapter: str | None, model_name: str | None, precision: PrecisionConfig, device: str) -> Loaded:
    """A base model, a saved adapter on its base, or a full fine-tune (or merged) folder, with the
    prompt format its training recorded (else its chat template, else raw text)."""
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
    return Loaded(model, tokenizer, policy, format_for([adapter, source], tokenizer))

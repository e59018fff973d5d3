"""Predicting a run's memory before running it: the training step itself, on fake tensors.

The model is built from its config alone on the `meta` device, prepared by the set-up function
`train` runs (`training.setup.prepare_model`), its parameters replaced by fake tensors (shapes and
dtypes, no storage), and two optimizer steps of `train`'s own step code run under
`FakeTensorMode` with the same `TensorMemoryTracker` that measures real runs. So the prediction
covers any architecture transformers knows, with no formula per family.

The CPU stands in for CUDA here: a fake `cuda` device aborts a CPU-only PyTorch, and CPU autocast
casts the same matmuls to 16 bits (its op lists are close to CUDA's, not identical). Where the
CUDA path differs in what it keeps, the CUDA path is simulated: padding-free rows in 16 bits go
through flash attention's variable-length op (its shape-only implementation), not the CPU's
padded batch of segments, whose padded copies of q, k and v put 3,072 MiB too many into a
Llama-2-7B step of 8 x 512 (+10.1% on the H200; `attention.simulating`). `--device cpu`
simulates the CPU's paths.

One rank of several: under DDP it runs its share of the micro-batches and holds the all-reduce's
buffer. Under FSDP2 the model is sharded for real, by `sharding.shard_model`, over PyTorch's fake
process group (collectives that move no data): the simulated rank holds its shards, gathers each
layer's weights and reduce-scatters its gradients as a real rank does.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from solotune.config import QuantConfig, RunConfig
from solotune.data import Example, Pair
from solotune.errors import SolotuneError
from solotune.fastpaths import attention
from solotune.fastpaths.registry import FastPaths
from solotune.measure.memory import TensorMemoryTracker
from solotune.model.adapters import count_parameters
from solotune.model.precision import resolve_policy
from solotune.model.quant import BLOCKSIZE_4BIT, bitsandbytes
from solotune.model.quant import compute_dtype as quant_compute_dtype
from solotune.parallel import dist, sharding
from solotune.training.objective import objective_for
from solotune.training.optim import make_optimizer
from solotune.training.setup import prepare_model
from solotune.training.step import accumulate_gradients

# Shapes as published in each model's config.json (Llama / Mistral / Qwen2 code paths).
PRESETS = {
    "llama2-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "llama2-13b": dict(
        model_type="llama",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "llama3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
    ),
    "mistral-7b": dict(
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=32768,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "smollm2-360m": dict(
        model_type="llama",
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "smollm2-1.7b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}
HUB_PRESETS = {
    "meta-llama/Llama-2-7b-hf": "llama2-7b",
    "meta-llama/Llama-2-13b-hf": "llama2-13b",
    "meta-llama/Meta-Llama-3-8B": "llama3-8b",
    "mistralai/Mistral-7B-v0.1": "mistral-7b",
    "Qwen/Qwen2.5-7B": "qwen2.5-7b",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
    "HuggingFaceTB/SmolLM2-360M-Instruct": "smollm2-360m",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "smollm2-1.7b",
}
PRESET_HUB_IDS = {preset: hub_id for hub_id, preset in HUB_PRESETS.items()}


@dataclass
class Estimate:
    parts_mib: dict  # tracked_peak_mib and the four parts, as `train` reports them
    trainable: int
    total: int
    seconds: float

    def total_mib(self, overhead_mib: float) -> float:
        return self.parts_mib["tracked_peak_mib"] + overhead_mib


def model_config(name: str | None, trust_remote_code: bool = False) -> PretrainedConfig:
    """A model's config from a preset, a local config.json or folder, or the hub (config only)."""
    name = name or "smollm2-135m"
    preset = PRESETS.get(name.lower()) or PRESETS.get(HUB_PRESETS.get(name, ""))
    if preset:
        settings = dict(preset)
        return AutoConfig.for_model(settings.pop("model_type"), **settings)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SolotuneError(
            f"no config for model {name!r} ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
            f"pass a local config.json or folder, or a preset: {', '.join(PRESETS)}"
        ) from None


def estimate_memory(config: PretrainedConfig, cfg: RunConfig, seq_len: int) -> Estimate:
    """Simulate two optimizer steps of `cfg` at full-length micro-batches of `seq_len` tokens."""
    start = time.perf_counter()
    policy = resolve_policy(cfg.precision, "cpu", frozen_base=cfg.lora.enabled)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=policy.base_dtype)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    if cfg.quant.method != "none":  # as loading quantizes the base, before any set-up
        quantize_fake(model, cfg.quant, quant_compute_dtype(cfg.quant, policy.compute_dtype), fake_mode)
    model = prepare_model(model, cfg)  # train's own set-up (training.setup)
    counts = count_parameters(model)
    _make_parameters_fake(model, fake_mode)
    sharded = cfg.dist_mode() == "fsdp"
    with _fake_ranks(cfg.nproc) if sharded else contextlib.nullcontext() as mesh:
        if sharded:
            with fake_mode:
                sharding.shard_model(model, policy.compute_dtype, mesh)
        with attention.simulating("cpu" if cfg.device == "cpu" else "cuda"):
            parts = _simulate_steps(model, cfg, policy, seq_len, fake_mode, sharded)
    return Estimate(parts, counts.trainable, counts.total, time.perf_counter() - start)


@contextlib.contextmanager
def _fake_ranks(n: int):
    """A process group of `n` ranks in this process, whose collectives move no data; yields the
    ranks' DeviceMesh (made outside fake mode, where it reads its rank list)."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the "fake" backend)

    if torch_dist.is_initialized():
        raise SolotuneError("estimate: --dist fsdp is simulated in a process of its own, not inside a running job")
    torch_dist.init_process_group("fake", store=torch_dist.HashStore(), rank=0, world_size=n)
    try:
        yield init_device_mesh("cpu", (n,))
    finally:
        torch_dist.destroy_process_group()


def _simulate_steps(model, cfg: RunConfig, policy, seq_len: int, fake_mode: FakeTensorMode, sharded: bool) -> dict:
    """Two optimizer steps of one rank, under the tracker: its breakdown (`Estimate.parts_mib`)."""
    model.train()
    fast = FastPaths.asked(cfg.train)  # each assumed to apply, as it does to the models it was written for
    objective, units = _worst_case_units(cfg, fast, seq_len)
    batch = objective.batch(units, fast, pad_id=0)
    # A paged optimizer's state has the size of the unpaged one's; paging changes where it lives.
    # Made outside fake mode: bitsandbytes computes its code books from data when it is created.
    train_cfg = dataclasses.replace(cfg.train, optim=cfg.train.optim.removeprefix("paged_"))
    optimizer, _ = make_optimizer(model, train_cfg, total_steps=2)
    with fake_mode, warnings.catch_warnings(), fast.during_steps(model, seq_len):
        warnings.simplefilter("ignore")  # transformers' deprecation notes, once per simulated step
        tracker = TensorMemoryTracker(model, optimizer, torch.device("cpu"))
        with tracker:
            for _ in range(2):  # the second step holds the optimizer state the first created
                loss = accumulate_gradients(model, [batch] * cfg.train.grad_accum, policy, objective)
                if cfg.nproc > 1 and not sharded:  # DDP's all-reduce buffer, alive beside the gradients
                    dist.step_buffer([p.grad for p in model.parameters() if p.grad is not None], loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return {**tracker.parts_mib(), "state_after_update": tracker.state_after_update_mib()}


def _worst_case_units(cfg: RunConfig, fast: FastPaths, seq_len: int):
    """(objective, one rank's micro-batch of units) for the step to simulate: every sequence at full
    length, every position a target, the worst case of a step. A preference micro-batch holds
    `micro_batch()` pairs, two sequences each; DPO's reference is the adapter-off pass inside the
    step, or (precomputed) log-probs that cost nothing there."""
    objective = objective_for(cfg, fast)

    def sequence(i: int) -> Example:
        return Example([0] * seq_len, [0] * seq_len, i)

    if objective.name == "sft":
        return objective, [sequence(i) for i in range(cfg.micro_batch())]
    pairs = [Pair(sequence(i), sequence(i)) for i in range(cfg.micro_batch())]
    if objective.reference == "cached":
        objective = dataclasses.replace(objective, cache={p.record_index: [0.0, 0.0] for p in pairs})
    return objective, pairs


def _make_parameters_fake(model: torch.nn.Module, fake_mode: FakeTensorMode) -> None:
    """Replace meta parameters and buffers by fake CPU tensors, keeping tied weights tied.

    `Module.to()` cannot swap parameters made under FakeTensorMode, so they are set directly.
    """
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in list(table.items()):
                if t is None or isinstance(t, FakeTensor):  # None, or made fake already (quantized weights)
                    continue
                if id(t) not in memo:
                    with fake_mode:
                        new = torch.empty(t.shape, dtype=t.dtype)
                    memo[id(t)] = (
                        torch.nn.Parameter(new, requires_grad=t.requires_grad)
                        if isinstance(t, torch.nn.Parameter)
                        else new
                    )
                table[name] = memo[id(t)]


def print_estimate(est: Estimate, cfg: RunConfig, seq_len: int, overhead_mib: float, gpu_mib: float | None) -> None:
    """The breakdown, the total with the CUDA overhead, and whether it fits."""
    p = est.parts_mib
    micro = cfg.micro_batch()
    total = est.total_mib(overhead_mib)
    ranks = f"; per process of {cfg.nproc} ({cfg.dist_mode()})" if cfg.nproc > 1 else ""
    pairs = f" ({micro} pairs: {2 * micro} sequences)" if cfg.pref.method != "sft" else ""
    print(
        f"model {cfg.model.name or 'smollm2-135m'}: {est.total:,} parameters, {est.trainable:,} trainable "
        f"({f'LoRA r={cfg.lora.r}' if cfg.lora.enabled else 'full fine-tuning'}); "
        f"micro-batch {micro}{pairs} x {seq_len} tokens, {cfg.train.grad_accum} per step; mp {cfg.precision.mp}; "
        f"checkpointing {'on' if cfg.train.grad_checkpointing else 'off'}{ranks}"
    )
    if cfg.pref.method != "sft":
        print(f"  {objective_for(cfg, FastPaths.asked(cfg.train)).describe()}")
    print(
        f"  parameters       {p['parameters_mib']:>12,.1f} MiB\n  gradients        {p['gradients_mib']:>12,.1f} MiB\n"
        f"  optimizer state  {p['optimizer_state_mib']:>12,.1f} MiB\n  activations      {p['activations_mib']:>12,.1f} MiB\n"
        f"  tensor peak      {p['tracked_peak_mib']:>12,.1f} MiB\n  + CUDA overhead  {overhead_mib:>12,.1f} MiB\n"
        f"  = peak           {total:>12,.1f} MiB ({total * 2**20 / 1e6:,.1f} MB)   [simulated in {est.seconds:.1f} s]"
    )
    if gpu_mib is not None:
        verdict = "fits" if total <= gpu_mib else "does NOT fit"
        print(f"  {verdict} in {gpu_mib:,.0f} MiB (margin {gpu_mib - total:+,.0f} MiB)")


def quantize_fake(
    model: torch.nn.Module, cfg: QuantConfig, compute_dtype: torch.dtype, fake_mode: FakeTensorMode
) -> None:
    """Replace the linear layers transformers would quantize by bitsandbytes layers holding fake
    quantized weights: bitsandbytes' own quantization run on fake tensors, so the packed codes,
    the scales and (double quantization) their scales get exactly the real shapes and dtypes."""
    bnb = bitsandbytes(f"estimating --quant {cfg.method}")
    from transformers.quantizers.base import get_keys_to_not_convert

    keep_dense = set(get_keys_to_not_convert(model))  # the LM head and what is tied to it
    # bitsandbytes builds its 8-bit code book from data on first use, which fake tensors cannot
    # do: build it (it is cached) on a real tensor first.
    bnb.functional.quantize_blockwise(torch.ones(256))
    for name, linear in list(model.named_modules()):
        if not isinstance(linear, torch.nn.Linear) or name.rsplit(".", 1)[-1] in keep_dense or name in keep_dense:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        parent.register_module(name.rsplit(".", 1)[-1], _fake_quantized(bnb, linear, cfg, compute_dtype, fake_mode))


def _fake_quantized(
    bnb, linear: torch.nn.Linear, cfg: QuantConfig, compute_dtype: torch.dtype, fake_mode: FakeTensorMode
):
    out_f, in_f = linear.weight.shape
    has_bias = linear.bias is not None
    # Plain parameters carrying bitsandbytes' attributes: its Params4bit / Int8Params subclasses
    # cannot wrap a fake tensor, and the layers' forward reads only these attributes.
    if cfg.method == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=has_bias, has_fp16_weights=False, threshold=6.0, device="meta")
        with fake_mode:
            codes, scales = torch.empty(out_f, in_f, dtype=torch.int8), torch.empty(out_f, dtype=torch.float32)
        layer.weight = torch.nn.Parameter(codes, requires_grad=False)
        layer.weight.CB, layer.weight.SCB, layer.weight.has_fp16_weights = codes, scales, False
    else:
        layer = bnb.nn.Linear4bit(
            in_f,
            out_f,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=cfg.double_quant,
            quant_type=cfg.method,
            device="meta",
        )
        with fake_mode:
            packed, state = bnb.functional.quantize_4bit(
                torch.empty(out_f, in_f, dtype=compute_dtype),
                blocksize=BLOCKSIZE_4BIT,
                compress_statistics=cfg.double_quant,
                quant_type=cfg.method,
            )
        layer.weight = torch.nn.Parameter(packed, requires_grad=False)
        layer.weight.quant_state, layer.weight.quant_type = state, cfg.method
    if has_bias:
        layer.bias = linear.bias
    return layer


@dataclass
class Candidate:
    """One configuration of the search grid and its estimated peak (MiB, overhead included)."""

    lora: bool
    grad_checkpointing: bool
    micro_batch: int
    peak_mib: float
    quant: str = "none"  # the base's storage: none, or the 4-bit format QLoRA tries

    def train_command(self, cfg: RunConfig, seq_len: int) -> str:
        name = PRESET_HUB_IDS.get((cfg.model.name or "").lower(), cfg.model.name)  # train loads weights, not presets
        model = f" --model {name}" if name else ""
        return (
            f"solotune train{model} --mp {cfg.precision.mp} {'--lora' if self.lora else '--no-lora'} "
            f"{f'--quant {self.quant} ' if self.quant != 'none' else ''}"
            f"--batch {cfg.train.batch} --grad-accum {cfg.train.batch // self.micro_batch} "
            f"--max-len {seq_len}{' --grad-checkpointing' if self.grad_checkpointing else ''}"
        )

    def describe(self) -> str:
        kind = ("QLoRA " + self.quant.upper() if self.quant != "none" else "LoRA") if self.lora else "full"
        return f"{kind}, checkpointing {'on ' if self.grad_checkpointing else 'off'}, micro-batch {self.micro_batch}"


def search(
    config: PretrainedConfig, cfg: RunConfig, seq_len: int, gpu_mib: float, overhead_mib: float
) -> list[Candidate]:
    """Every (full / LoRA / QLoRA, checkpointing, micro-batch) that fits, fastest first.

    Micro-batches are tried largest first; the first that fits is simulated and the smaller ones
    are listed with it (activations only shrink with the micro-batch). Expected speed orders the
    result: no recomputation before checkpointing, then larger micro-batches, then a 16-bit base
    before a 4-bit one (de-quantizing costs time). QLoRA (NF4, double quantization) is tried when
    bitsandbytes is installed, unless the config already names a quantization.
    """
    fits = []
    micros = [m for m in (8, 4, 2, 1) if m <= cfg.train.batch and cfg.train.batch % m == 0]
    bases = [(True, cfg.quant.method), (False, "none")]
    if cfg.quant.method == "none" and importlib.util.find_spec("bitsandbytes"):
        bases.insert(1, (True, "nf4"))
    for lora, quant in bases:
        for ckpt in (False, True):
            for m in micros:
                trial = copy.deepcopy(cfg)
                trial.lora.enabled, trial.train.grad_checkpointing, trial.quant.method = lora, ckpt, quant
                trial.train.grad_accum = cfg.train.batch // m
                peak = estimate_memory(config, trial, seq_len).total_mib(overhead_mib)
                if peak <= gpu_mib:
                    fits += [Candidate(lora, ckpt, smaller, peak, quant) for smaller in micros if smaller <= m]
                    break
    return sorted(fits, key=lambda c: (c.grad_checkpointing, -c.micro_batch, c.quant != "none", not c.lora))


def print_search(found: list[Candidate], cfg: RunConfig, seq_len: int, gpu_mib: float) -> None:
    if not found:
        print(f"\nno configuration of the grid fits in {gpu_mib:,.0f} MiB at {seq_len} tokens; try a shorter --seq-len")
        return
    print(
        f"\nconfigurations that fit in {gpu_mib:,.0f} MiB (mp {cfg.precision.mp}, batch {cfg.train.batch}), fastest first:"
    )
    for c in found:
        print(f"  {c.describe()}: at most {c.peak_mib:,.0f} MiB")
    print(f"best: {found[0].train_command(cfg, seq_len)}")

"""The typed run configuration: defaults, YAML loading, CLI overrides and validation.

One dataclass tree is the schema and holds every default. YAML and the command line are both
parsed into it by the same converter, so a value means the same thing wherever it comes from,
and an unknown key is an error instead of a silent fallback to a default.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from solotune.errors import SolotuneError

# What a CUDA process holds beyond its tensors, which `estimate` adds to its tensor peak: the
# context (~500 MiB on recent GPUs) and the cuBLAS workspaces and allocator rounding (64-180 MiB
# measured on an H200, docs/estimate.md). `solotune estimate --overhead-mib` overrides it.
DEFAULT_CUDA_OVERHEAD_MIB = 700.0
REFERENCE_PROMPTS = [
    "Best Hiking place in Los Angeles for sunset is",
    "A brief message congratulating the team on the launch:\n\nHi everyone,\n\nI just",
]


def choices(*values: str) -> dict:
    """Field metadata restricting a string field to `values`."""
    return {"choices": values}


def switch(*values: str, on: str) -> dict:
    """Field metadata for a string field that is also an on/off switch: one of `values`, where a
    boolean (YAML's true / false, the CLI's bare `--flag` / `--no-flag`) means `on` / "off"."""
    return {"choices": values, "switch_on": on}


def switch_value(raw: Any, f: dataclasses.Field, from_cli: bool = False) -> Any:
    """`raw` for field `f`, a boolean turned into the switch's value where `f` is a switch."""
    on = f.metadata.get("switch_on")
    if on is None:
        return raw
    if from_cli and str(raw).lower() in ("true", "false"):
        raw = str(raw).lower() == "true"
    return (on if raw else "off") if isinstance(raw, bool) else raw


@dataclass
class ModelConfig:
    """Where the model comes from."""

    # A local Hugging Face folder, a hub id, or a .gguf file; None = the embedded default.
    name: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str = field(default="sdpa", metadata=choices("sdpa", "eager"))


@dataclass
class DataConfig:
    """Which records to train on and how to turn them into tokens."""

    # A .json / .jsonl / .parquet file or a hub data set name; None = the built-in data set.
    path: str | None = None
    split: str = "train"
    format: str = field(
        default="auto", metadata=choices("auto", "alpaca", "prompt_response", "messages", "text", "preference")
    )
    samples: int | None = None  # keep the first N records
    max_len: int = 512
    too_long: str = field(default="truncate", metadata=choices("truncate", "drop"))  # records over max_len
    on_bad_record: str = field(default="error", metadata=choices("error", "skip"))  # malformed records
    train_on_prompt: bool = False  # False: loss on response tokens only


@dataclass
class LoraConfig:
    """LoRA adapters (Hu et al., 2021); enabled=False means full fine-tuning."""

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # One dropout mask per layer input shared by the adapters that read it (q, k and v), not a
    # separate full-width mask for each (see model/dropout.py).
    shared_dropout: bool = True
    # "attention": the model's attention input projections (q, k and v in Llama, as the reference
    # experiment adapts; c_attn in GPT-2, qkv_proj in Phi-3, ...; see adapters.attention_projections).
    # "all-linear" adapts every linear layer but the LM head; or name the layers (q_proj v_proj).
    target_modules: list[str] = field(default_factory=lambda: ["attention"])


@dataclass
class PrecisionConfig:
    """Mixed precision and the storage dtype of the weights."""

    # auto: bf16 where the device has native bf16, else fp16 on CUDA, else off (fp32).
    mp: str = field(default="auto", metadata=choices("auto", "off", "bf16", "fp16"))
    # auto: frozen weights (LoRA) in the compute dtype, trainable weights (full) in fp32.
    base_dtype: str = field(default="auto", metadata=choices("auto", "fp32", "bf16", "fp16"))


@dataclass
class QuantConfig:
    """The frozen base stored in 4 or 8 bits via bitsandbytes (QLoRA); needs LoRA."""

    method: str = field(default="none", metadata=choices("none", "nf4", "fp4", "int8"))
    double_quant: bool = True  # 4-bit: store the per-block scales in 8 bits too
    # The dtype the de-quantized weights are multiplied in; auto: the run's mixed precision.
    compute_dtype: str = field(default="auto", metadata=choices("auto", "fp32", "bf16", "fp16"))


@dataclass
class TrainConfig:
    """The optimisation: batches, schedule, and the memory-saving switches of the loop."""

    batch: int = 8  # effective batch: records per optimizer step
    grad_accum: int = 1  # micro-batches per step; micro-batch size = batch / grad_accum
    grad_checkpointing: bool = False
    # Each micro-batch as one row of its records back to back: no compute on padding, the
    # same records per step and the same losses as padded batches (see attention.py).
    padding_free: bool = True
    # LM head + cross-entropy on response positions only, this many at a time, never the full
    # B x T x V logits (see loss.py); 0 computes the full logits.
    ce_chunk: int = 1024
    fused_swiglu: bool = True  # gated-SiLU MLPs keep 2 activations for backward, not 3 (swiglu.py)
    offload_activations: bool = False  # CUDA: keep saved activations in pinned CPU memory
    # adamw: fp32 moments; adamw8bit: 8-bit blockwise moments; paged_*: moments in CUDA unified
    # memory; sgd: no state (see optim.py).
    optim: str = field(default="adamw", metadata=choices("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit", "sgd"))
    # torch.compile each decoder layer for the steps the memory tracker does not follow (shapes
    # dynamic, a bounded number of graphs); its time is reported apart from the runtime. auto: on
    # only where it was measured to pay back (training.compile.choose_compile).
    compile: str = field(default="auto", metadata=switch("auto", "on", "off", on="on"))
    # Split the peak into parameters / gradients / optimizer state / activations: a Python hook
    # on every tensor op (memory.TensorMemoryTracker). peak: on a rehearsal of the largest step
    # before the loop (an update that changes nothing), then only on a step of the loop that can
    # still set the peak (normally none), so the loop runs untracked; always: every step; off:
    # the measured peak only.
    track_memory: str = field(default="peak", metadata=switch("peak", "always", "off", on="peak"))
    # Fused GPU kernels from Liger-Kernel (RMSNorm, RoPE; kernels.py): auto = on a CUDA GPU
    # where the liger-kernel package is installed, each checked against the plain forward, kept
    # only where a timed step is faster, never in a compiled run.
    kernels: str = field(default="auto", metadata=choices("auto", "liger", "none"))
    epochs: int = 1
    max_steps: int | None = None  # stop early after this many optimizer steps
    shuffle: bool = True  # a new seeded record order every epoch
    # Each epoch's largest step (records x the longest, then tokens: the data alone decides)
    # runs first, as HF's length-grouped sampler puts its longest batch first; the optimizer
    # state exists before it (optim.create_state). A run that does not fit stops in its first
    # step, and the memory breakdown's rehearsal of it (track_memory peak) covers the epoch.
    # Only with shuffle: unshuffled, the data's own order is kept.
    largest_first: bool = True
    lr: float = 2e-4
    schedule: str = field(default="cosine", metadata=choices("cosine", "linear", "constant"))
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    save_every: int = 0  # a checkpoint every N optimizer steps and at the end (0: only on Ctrl-C/SIGTERM)
    keep: int = 2  # checkpoints kept (the newest)


PREFERENCE_METHODS = ("dpo", "orpo", "simpo")
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}  # the papers' (and TRL's) defaults


@dataclass
class PrefConfig:
    """The training objective (training/objective.py): supervised fine-tuning, or preference tuning
    on {prompt, chosen, rejected} pairs: DPO (Rafailov et al., 2023), ORPO (Hong et al., 2024) or
    SimPO (Meng et al., 2024)."""

    method: str = field(default="sft", metadata=choices("sft", *PREFERENCE_METHODS))
    # DPO: how far the policy may move from the reference; SimPO: the reward scale. None: the
    # method's default (DPO 0.1, SimPO 2.0).
    beta: float | None = None
    label_smoothing: float = 0.0  # DPO: the chance a pair's label is flipped (conservative DPO)
    orpo_lambda: float = 0.1  # ORPO: the odds-ratio term's weight beside the SFT loss on chosen (--pref.lambda)
    gamma: float = 0.5  # SimPO: the target reward margin
    # DPO: the reference log-probs computed once before training (and kept in the run folder, so
    # that a resumed run reuses them) instead of a reference pass in every step. Full fine-tuning
    # always precomputes: its reference would otherwise need a frozen copy of the weights.
    precompute_ref: bool = False

    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.method, 0.0)


@dataclass
class GenerateConfig:
    """Generations before and after training (and for `solotune generate`)."""

    enabled: bool = True
    prompts: list[str] = field(default_factory=lambda: list(REFERENCE_PROMPTS))  # used verbatim
    # Wrapped in the data set's prompt template, to show what the fine-tuning taught.
    instructions: list[str] = field(
        default_factory=lambda: [
            "What is 27 + 15?",
            "Reverse the letters of the word 'garden'.",
        ]
    )
    max_new_tokens: int = 48
    do_sample: bool = False  # greedy by default, so before/after compare like with like
    # A KV cache allocated once at its full length (transformers' "static" cache), which CUDA
    # graphs and torch.compile need; the default cache grows with each token.
    static_cache: bool = False
    temperature: float = 0.7
    top_p: float = 0.9


@dataclass
class EvalConfig:
    """Held-out records: their loss during training, the task accuracy on them before and after
    (evaluate.py). On when `data` or `split` is given."""

    data: str | None = None  # held-out records from this file (the training data's formats)
    split: float = 0.0  # or hold out this fraction of the training records, picked by the seed
    every: int = 0  # the eval loss also every N optimizer steps (0: before and after training only)
    # How an answer is checked: exact (equal, whitespace stripped), contains, or none (loss only).
    # auto: exact on the built-in data set, whose answers are computed; none on other data.
    metric: str = field(default="auto", metadata=choices("auto", "exact", "contains", "none"))
    max_records: int = 32  # the task accuracy on at most this many held-out records
    keep_best: bool = False  # also save the adapter (or model) of the lowest eval loss, as best-adapter/

    @property
    def enabled(self) -> bool:
        return self.data is not None or self.split > 0


@dataclass
class ExportConfig:
    """The trained weights also as one GGUF file at the end of the run (export.py), in the run
    folder as model-<type>.gguf; its size and time go into metrics.json and the grid's tables."""

    gguf: str = field(default="none", metadata=choices("none", "f32", "f16", "bf16", "q8_0", "q4_0"))
    ollama: bool = False  # and an Ollama Modelfile beside it


@dataclass
class RunConfig:
    """Everything one `solotune train` run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pref: PrefConfig = field(default_factory=PrefConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    device: str = field(default="auto", metadata=choices("auto", "cpu", "cuda"))
    output_dir: str | None = None  # None: runs/<date>-<time>
    # Cap the run's memory as a smaller card would ("24GB", "512MiB"): CUDA: a per-process
    # fraction of the GPU; CPU: the process's data-segment limit. None: no cap.
    mem_limit: str | None = None
    # The C allocator behind CPU tensors (solotune.allocator): auto = tcmalloc or jemalloc where
    # installed, which keep far less freed memory than glibc's malloc.
    cpu_allocator: str = field(default="auto", metadata=choices("auto", "glibc", "jemalloc", "tcmalloc"))
    # Data parallel over this many local processes (GPUs), launched through torchrun (dist.py).
    nproc: int = 1
    # How the processes share the work: ddp = every rank holds the whole model and one all-reduce
    # sums the gradients (dist.py); fsdp = each rank holds 1/N of the weights, gradients and
    # optimizer state (sharding.py). auto: ddp under LoRA, fsdp for full fine-tuning.
    dist: str = field(default="auto", metadata=choices("auto", "ddp", "fsdp"))
    # Experiment trackers the run also reports to, a comma list (trackers.py): tensorboard, or none.
    report_to: str = "none"

    def micro_batch(self) -> int:
        """Records in one process's micro-batch: the step's `batch`, split `grad_accum` ways on
        each of `nproc` processes (validate makes it divide evenly)."""
        return self.train.batch // (self.train.grad_accum * self.nproc)

    def dist_mode(self) -> str:
        """What `dist` resolves to: "single" for one process, else "ddp" or "fsdp"."""
        if self.nproc == 1:
            return "single"
        if self.dist == "auto":
            return "ddp" if self.lora.enabled else "fsdp"
        return self.dist


# ---------------------------------------------------------------------------------------------
# Converting raw values (from YAML or from CLI strings) into the schema's types.


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, allows None) for `X | None`; (tp, False) otherwise."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def convert_value(raw: Any, tp: Any, where: str, from_cli: bool = False) -> Any:
    """Convert `raw` to type `tp`, or raise SolotuneError naming `where`."""
    inner, optional = _unwrap_optional(tp)
    if raw is None or (from_cli and optional and str(raw).lower() in ("none", "null")):
        if optional:
            return None
        raise SolotuneError(f"{where}: a value is required (expected {_type_name(inner)})")
    if typing.get_origin(inner) is list:
        items = raw.split(",") if from_cli and isinstance(raw, str) else raw
        if not isinstance(items, list):
            raise SolotuneError(f"{where}: expected a list of strings, got {raw!r}")
        return [convert_value(x, str, f"{where}[{i}]") for i, x in enumerate(items)]
    if inner is bool:
        if isinstance(raw, bool):
            return raw
        if from_cli and str(raw).lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return str(raw).lower() in ("true", "yes", "1", "on")
        raise SolotuneError(f"{where}: expected true or false, got {raw!r}")
    if inner is int:
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise SolotuneError(f"{where}: expected an integer, got {raw!r}")
        try:
            return int(raw)
        except ValueError:
            raise SolotuneError(f"{where}: expected an integer, got {raw!r}") from None
    if inner is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise SolotuneError(f"{where}: expected a number, got {raw!r}")
        try:
            return float(raw)
        except ValueError:
            raise SolotuneError(f"{where}: expected a number, got {raw!r}") from None
    if inner is str:
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise SolotuneError(f"{where}: expected a string, got {raw!r}")
        return str(raw)
    raise TypeError(f"unsupported config type {tp!r}")


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, "a list")


def build(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise SolotuneError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SolotuneError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(known)})")
    values = {}
    for name, raw in data.items():
        tp = hints[name]
        sub = f"{where}.{name}" if where != "config" else name
        if dataclasses.is_dataclass(tp):
            values[name] = build(tp, raw, sub)
        else:
            values[name] = convert_value(switch_value(raw, known[name]), tp, sub)
    return cls(**values)


def load_yaml(path: str | Path) -> RunConfig:
    """Read a YAML config file into a RunConfig (every key optional, no unknown keys)."""
    path = Path(path)
    if not path.is_file():
        raise SolotuneError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SolotuneError(f"{path}: not valid YAML: {e}") from None
    return build(RunConfig, data or {}, where=str(path))


def to_dict(cfg: Any) -> dict:
    """The config as plain data (for YAML / JSON output)."""
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# Leaves of the tree, for generating CLI options and applying overrides.


def leaf_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """Every leaf of the schema as (dotted path, type, field)."""
    leaves = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            leaves.extend(leaf_fields(tp, path + "."))
        else:
            leaves.append((path, tp, f))
    return leaves


def config_paths(paths, where: str):
    """`paths` (dotted config paths, as an iterable or a dict's keys), checked against the schema:
    each must name a leaf or a section of RunConfig. The tables of paths elsewhere (the CLI's
    aliases, what may change on resume, the trackers' hyperparameters, the ablation's axes) go
    through here, so that a renamed field fails at import, not by silently missing a table."""
    known = {path for path, _, _ in leaf_fields()}
    known |= {p.rsplit(".", 1)[0] for p in known if "." in p}
    unknown = [p for p in paths if p not in known]
    if unknown:
        raise AssertionError(f"{where}: not a config path: {', '.join(unknown)}")
    return paths


def get_path(config: dict, dotted: str) -> Any:
    """The value at `dotted` in a config as a dict (`to_dict`)."""
    for key in dotted.split("."):
        config = config[key]
    return config


def apply_override(cfg: RunConfig, dotted: str, raw: Any, from_cli: bool = True) -> None:
    """Set the leaf at `dotted` (e.g. "lora.r") from a raw value, converting and checking it."""
    *parents, name = dotted.split(".")
    node = cfg
    for p in parents:
        node = getattr(node, p)
    tp = typing.get_type_hints(type(node))[name]
    f = next(f for f in dataclasses.fields(node) if f.name == name)
    setattr(node, name, convert_value(switch_value(raw, f, from_cli), tp, f"--{dotted.replace('_', '-')}", from_cli))


def validate(cfg: RunConfig) -> RunConfig:
    """Check values and combinations that no type can express; raise on the first problem."""
    for path, _, f in leaf_fields():
        allowed = f.metadata.get("choices")
        value = _get(cfg, path)
        if allowed and value not in allowed:
            raise SolotuneError(f"{path}: {value!r} is not one of {', '.join(allowed)}")
    t, d, lo, g = cfg.train, cfg.data, cfg.lora, cfg.generate
    _require(t.batch >= 1, "train.batch", t.batch, "must be at least 1")
    _require(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be at least 1")
    _require(
        t.batch % t.grad_accum == 0,
        "train.grad_accum",
        t.grad_accum,
        f"must divide the batch ({t.batch}) so that every micro-batch has the same size; "
        f"try one of {[k for k in range(1, t.batch + 1) if t.batch % k == 0]}",
    )
    _require(t.epochs >= 1, "train.epochs", t.epochs, "must be at least 1")
    _require(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, "must be at least 1")
    _require(t.lr > 0, "train.lr", t.lr, "must be positive")
    _require(0 <= t.warmup_ratio < 1, "train.warmup_ratio", t.warmup_ratio, "must be in [0, 1)")
    _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    _require(t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, "must be >= 0")
    _require(t.save_every >= 0, "train.save_every", t.save_every, "must be >= 0 (0: only on a stop signal)")
    _require(t.keep >= 1, "train.keep", t.keep, "must be at least 1")
    _require(
        not (t.compile == "on" and t.track_memory == "always"),
        "train.compile",
        t.compile,
        "with --train.track-memory always every step runs eager (torch.compile cannot trace under the "
        "tracker's per-op hook); use --train.track-memory peak or off",
    )
    _require(t.ce_chunk >= 0, "train.ce_chunk", t.ce_chunk, "must be >= 0 (0: full logits)")
    _validate_nproc(cfg)
    _require(d.max_len >= 8, "data.max_len", d.max_len, "must be at least 8 tokens")
    _require(d.samples is None or d.samples >= 1, "data.samples", d.samples, "must be at least 1")
    _require(lo.r >= 1, "lora.r", lo.r, "must be at least 1")
    _require(lo.alpha > 0, "lora.alpha", lo.alpha, "must be positive")
    _require(0 <= lo.dropout < 1, "lora.dropout", lo.dropout, "must be in [0, 1)")
    _require(
        cfg.quant.method == "none" or lo.enabled,
        "quant.method",
        cfg.quant.method,
        "a quantized base cannot be trained itself; it needs LoRA (--lora)",
    )
    _require(len(lo.target_modules) >= 1, "lora.target_modules", lo.target_modules, "must name at least one module")
    _require(g.max_new_tokens >= 1, "generate.max_new_tokens", g.max_new_tokens, "must be at least 1")
    _require(g.temperature > 0, "generate.temperature", g.temperature, "must be positive")
    _require(0 < g.top_p <= 1, "generate.top_p", g.top_p, "must be in (0, 1]")
    _validate_eval(cfg.eval)
    _validate_pref(cfg.pref)
    parse_report_to(cfg.report_to)
    if cfg.mem_limit is not None:
        _require(parse_size(cfg.mem_limit) > 0, "mem_limit", cfg.mem_limit, "must be positive")
    return cfg


def _validate_eval(e: EvalConfig) -> None:
    _require(0 <= e.split < 1, "eval.split", e.split, "must be in [0, 1): the fraction of records held out")
    _require(
        not (e.split and e.data), "eval.split", e.split, f"and eval.data ({e.data}) both give held-out records: use one"
    )
    _require(e.every >= 0, "eval.every", e.every, "must be >= 0 (0: before and after training only)")
    _require(e.max_records >= 1, "eval.max_records", e.max_records, "must be at least 1")
    _require(
        e.enabled or not e.keep_best,
        "eval.keep_best",
        e.keep_best,
        "needs held-out records: --eval.split or --eval.data",
    )


def _validate_pref(p: PrefConfig) -> None:
    _require(p.beta is None or p.beta > 0, "pref.beta", p.beta, "must be positive")
    _require(0 <= p.label_smoothing < 0.5, "pref.label_smoothing", p.label_smoothing, "must be in [0, 0.5)")
    _require(p.orpo_lambda >= 0, "pref.orpo_lambda", p.orpo_lambda, "must be >= 0")
    _require(p.gamma >= 0, "pref.gamma", p.gamma, "must be >= 0")
    _require(
        not p.precompute_ref or p.method == "dpo",
        "pref.precompute_ref",
        p.precompute_ref,
        f"only DPO has a reference model ({p.method} needs none)",
    )


SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str, where: str = "mem_limit") -> int:
    """Bytes in "24GB" (decimal), "512MiB" (binary) or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].lower() not in SIZE_UNITS:
        raise SolotuneError(f"{where}: {text!r} is not a size like 24GB, 512MiB or 1.5GiB")
    return int(float(m[1]) * SIZE_UNITS[m[2].lower()])


def _validate_nproc(cfg: RunConfig) -> None:
    n, t = cfg.nproc, cfg.train
    _require(n >= 1, "nproc", n, "must be at least 1")
    _require(
        t.batch % (n * t.grad_accum) == 0,
        "nproc",
        n,
        f"times --grad-accum ({t.grad_accum}) must divide the batch ({t.batch}): each rank takes equal micro-batches",
    )
    if cfg.dist_mode() == "fsdp":
        _require(
            not cfg.lora.enabled,
            "dist",
            cfg.dist,
            "FSDP2 shards full fine-tuning; LoRA's trainable part is a few MB and its base is frozen: use --dist ddp",
        )
        _require(
            cfg.precision.mp != "fp16",
            "dist",
            cfg.dist,
            "FSDP2 runs in bf16 or fp32 here: fp16's gradient scaler does not take sharded gradients; use --mp bf16",
        )


def _require(ok: bool, path: str, value: Any, what: str) -> None:
    if not ok:
        raise SolotuneError(f"{path} = {value!r}: {what}")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")  # --report-to (trackers.py)


def parse_report_to(value: str) -> list[str]:
    """The tracker names of `--report-to a,b` ("none": no tracker)."""
    names = [n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in TRACKERS:
            raise SolotuneError(f"--report-to {name}: unknown tracker; supported: {', '.join(TRACKERS)}, or none")
    return names

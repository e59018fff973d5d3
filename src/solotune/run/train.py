"""A `solotune train` run, from config to artifacts.

Flow: config -> precision policy and device checks -> tokenizer + data (checked before any model
work) -> model, prepared for LoRA or full fine-tuning (training.setup) -> set-up self-check of the
fast paths (selfcheck) -> generations before -> the loop (loop, step) -> the trained weights ->
generations after -> metrics.json and the summary (metrics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
import transformers

from solotune import artifacts
from solotune.artifacts import grid_of
from solotune.config import RunConfig, TrainConfig, parse_report_to, parse_size, to_dict, validate
from solotune.data import DataStats, read_records, tokenize_records
from solotune.errors import SolotuneError, is_out_of_memory
from solotune.fastpaths.kernels import choose_kernels
from solotune.fastpaths.registry import FastPaths
from solotune.measure import allocator
from solotune.measure.flops import matmul_peak_flops
from solotune.measure.memory import apply_memory_limit
from solotune.model.adapters import save_trained
from solotune.model.models import copy_gguf_origin, load_tokenizer, resolve_model_source
from solotune.model.precision import PrecisionPolicy, resolve_policy
from solotune.model.quant import save_record
from solotune.parallel import dist, sharding
from solotune.prompting import PromptFormat, copy_format, format_of_data
from solotune.run.evaluate import Evaluation, evaluation_for
from solotune.run.generate import Generation, eval_inputs, generate, print_generations
from solotune.run.metrics import RunOutcome, collect_metrics, library_versions, print_summary
from solotune.run.trackers import RunIdentity, Trackers, run_summary
from solotune.training import checkpoint
from solotune.training.checkpoint import Checkpointer
from solotune.training.loop import train_loop
from solotune.training.objective import Objective, objective_for, reference_log_probs
from solotune.training.setup import ModelSetup, set_up_model

GENERATIONS_BEFORE_FILE = "generations-before.json"  # kept for a resumed run
EVAL_BEFORE_FILE = "eval-before.json"  # likewise
REFERENCE_FILE = "reference-logps.json"  # DPO's precomputed reference log-probs, likewise


def run_training(cfg: RunConfig, resume: bool = False) -> dict:
    """A whole `solotune train` run; returns the metrics it also writes to metrics.json.

    `resume`: continue the unfinished run in `cfg.output_dir` from its newest checkpoint.
    """
    validate(cfg)
    transformers.set_seed(cfg.train.seed)
    policy = resolve_policy(cfg.precision, cfg.device, frozen_base=cfg.lora.enabled)
    world = dist.init(cfg.nproc, policy.device)
    if not world.main:
        sys.stdout = open(os.devnull, "w")  # for the process's life: rank 0 speaks for the job
    print(policy.describe())
    check_device_support(cfg.train, policy.device)
    if cfg.dist_mode() == "fsdp" and policy.scaler.is_enabled():  # --mp auto chose fp16 (no bf16 here)
        raise SolotuneError("--dist fsdp: this GPU has no bf16 and FSDP2 does not run fp16 here; use --mp off")
    print(allocator.describe(cfg.cpu_allocator))
    if cfg.mem_limit:
        print(apply_memory_limit(parse_size(cfg.mem_limit), policy.device))
    # Rank 0 makes the run folder and writes in it; the others read its checkpoints.
    try:
        with artifacts.run_folder(cfg.output_dir) if world.main else contextlib.nullcontext() as out_dir:
            out_dir = Path(dist.broadcast(str(out_dir) if world.main else None))
            if world.main:
                artifacts.write_yaml(out_dir / artifacts.CONFIG_FILE, to_dict(cfg))
            with _trackers(cfg, out_dir, world) as trackers:
                return _run(RunScope(cfg, policy, out_dir, resume, world), trackers)
    finally:
        dist.finish()


def _trackers(cfg: RunConfig, out_dir: Path, world: dist.World) -> Trackers:
    """The experiment trackers rank 0 reports to (a missing library fails here, before any model
    work); a run that fails is closed in them as failed."""
    grid = grid_of(out_dir)
    run = RunIdentity(out_dir, to_dict(cfg), library_versions(), grid.name if grid else None)
    return Trackers(parse_report_to(cfg.report_to) if world.main else [], run)


@dataclasses.dataclass(frozen=True)
class RunScope:
    """What every part of one run shares: its settings and precision, its folder, whether it
    continues an unfinished run, and this process's place in the job."""

    cfg: RunConfig
    policy: PrecisionPolicy
    out_dir: Path
    resume: bool
    world: dist.World


@dataclasses.dataclass
class RunData:
    """The run's data, read and tokenized before any model work, with what is held out."""

    source: str  # where the model is loaded from
    tokenizer: object
    examples: list  # the units to train on: Examples, or preference Pairs
    stats: DataStats
    format: str
    prompt_format: PromptFormat  # how the data put prompts to the model: recorded with the weights
    evaluation: Evaluation | None


def _run(scope: RunScope, trackers: Trackers) -> dict:
    cfg, policy, world = scope.cfg, scope.policy, scope.world
    data = _read_data(cfg)
    checkpoints = _checkpointer(cfg, data.examples, scope.out_dir, scope.resume)
    if world.main:  # beside the run's weights, whichever folder they are saved in (_save_weights)
        data.prompt_format.save(scope.out_dir)
    setup = set_up_model(cfg, policy, world, data.source, data.examples, data.tokenizer.pad_token_id)
    model, fast, tokenizer, evaluation = setup.model, setup.fast, data.tokenizer, data.evaluation
    objective = _objective(setup, data, scope)

    # Under FSDP2 every rank takes part in each forward (it holds a shard of every layer), so
    # every rank generates, in step; rank 0 keeps what they generated.
    generates = world.main or setup.sharded
    before = _generations_before(model, tokenizer, scope, data.prompt_format) if generates else []
    if evaluation:
        if cfg.eval.keep_best:
            evaluation.held_out.on_best = lambda step: _save_weights(model, tokenizer, scope, step)
        _evaluate_before(evaluation, model, tokenizer, fast, objective, scope)
        if trackers:
            trackers.log(0, {"eval/loss": evaluation.results["loss_before"]})
    loop = train_loop(
        model, data.examples, tokenizer.pad_token_id, policy, cfg.train, fast=fast, objective=objective,
        compiling=setup.compiling, checkpoints=checkpoints, world=world, held_out=evaluation.held_out if evaluation else None,
        log=trackers.log if trackers else None,
    )  # fmt: skip
    # The trained weights first: nothing after the loop (generations, the matmul peak) can lose them.
    saved = _save_weights(model, tokenizer, scope)
    after = _generate(model, tokenizer, cfg, policy, data.prompt_format) if generates and cfg.generate.enabled else []
    if evaluation:  # every rank: under FSDP2 each forward needs them all
        evaluation.run("after", model, tokenizer, policy, fast, len(loop.losses), objective)
    if not world.main:
        return {}
    if setup.quantized:
        save_record(saved, cfg.quant, policy.compute_dtype)
    outcome = RunOutcome(
        cfg=cfg,
        policy=policy,
        source=data.source,
        load_s=setup.load_s,
        params=setup.params,
        data_stats=data.stats,
        data_format=data.format,
        fast_paths=fast,
        quantized=setup.quantized,
        loop=loop,
        before=before,
        after=after,
        saved=saved,
        # Measured after the loop (and cached) on this rank's device and threads; the job has N of them.
        matmul_peak_flops=matmul_peak_flops(
            policy.device, policy.compute_dtype, at_least=loop.flops / world.size / loop.runtime_s
        )
        * world.size,
        evaluation=evaluation.metrics(loop.eval_curve, len(loop.losses)) if evaluation else None,
        objective=_objective_metrics(objective),
    )
    return _write_results(outcome, scope.out_dir, trackers)


def _read_data(cfg: RunConfig) -> RunData:
    """The records, tokenized with the model's tokenizer, the held-out ones set apart (before
    any model work: a missing or unreadable data file fails first)."""
    pairs = cfg.pref.method != "sft"
    records = read_records(cfg.data, pairs)
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model)
    examples, stats, data_format = tokenize_records(records, tokenizer, cfg.data, pairs)
    _print_data(examples, stats, data_format, cfg)
    prompt_format = _prompt_format(records, data_format, tokenizer, cfg)
    print(prompt_format.describe())
    examples, evaluation = evaluation_for(cfg, records, examples, data_format, tokenizer)
    if evaluation:
        print(evaluation.describe())
    return RunData(source, tokenizer, examples, stats, data_format, prompt_format, evaluation)


def _prompt_format(records, data_format: str, tokenizer, cfg: RunConfig) -> PromptFormat:
    """How this run's data puts prompts to the model. Preference pairs: in the chat template where
    they are messages, in the Alpaca template for the built-in ones, else as given."""
    first = next((r.fields for r in records if r.problem is None and isinstance(r.fields, dict)), {})
    chat_pairs = any(isinstance(first.get(k), list) for k in ("prompt", "chosen"))
    fmt = format_of_data(data_format, tokenizer, chat_pairs, alpaca_pairs=cfg.data.path is None)
    return dataclasses.replace(fmt, origin="this run's data")


def _write_results(outcome: RunOutcome, out_dir: Path, trackers: Trackers) -> dict:
    """metrics.json, the export, the trackers' last values and the summary; returns the metrics."""
    cfg, n_steps = outcome.cfg, len(outcome.loop.losses)
    metrics = collect_metrics(outcome)
    if cfg.export.gguf != "none":
        metrics["export"] = _export(cfg, outcome.saved, out_dir)
    if trackers:
        if outcome.evaluation:
            after = {k.removesuffix("_after"): v for k, v in outcome.evaluation.items() if k.endswith("_after")}
            trackers.log(n_steps, {f"eval/{k}": v for k, v in after.items() if isinstance(v, float)})
        trackers.finish(n_steps, run_summary(metrics))
    artifacts.write_json(out_dir / artifacts.METRICS_FILE, metrics)
    if outcome.before:
        print_generations("before fine-tuning", outcome.before)
        print_generations("after fine-tuning", outcome.after)
    print_summary(metrics, out_dir)
    return metrics


def _export(cfg: RunConfig, saved: Path, out_dir: Path) -> dict:
    """--export.gguf: the saved weights (an adapter merged first) as one GGUF file."""
    from solotune.run.export import export_gguf

    kind = "adapter" if cfg.lora.enabled else "model"
    result = export_gguf(
        out_dir / f"model-{cfg.export.gguf}.gguf", cfg.export.gguf, ollama=cfg.export.ollama, **{kind: str(saved)}
    )
    return dataclasses.asdict(result)


def _objective(setup: ModelSetup, data: RunData, scope: RunScope) -> Objective:
    """The run's objective; DPO's reference log-probs computed now, before any step, where it
    takes them from a cache (a resumed run reads its first part's)."""
    objective = objective_for(scope.cfg, setup.fast)
    print(objective.describe())
    if objective.reference != "cached":
        return objective
    saved = scope.out_dir / REFERENCE_FILE
    if scope.resume and saved.is_file():
        cache = {int(k): v for k, v in artifacts.read_json(saved)["logps"].items()}
        print(f"reference: log-probs of {len(cache)} pairs read from {saved.name} (computed before step 1)")
    else:
        start = time.perf_counter()
        held = data.evaluation.held_out.examples if data.evaluation else []
        micro = scope.cfg.micro_batch()
        cache = reference_log_probs(
            setup.model, data.examples + held, setup.fast, data.tokenizer.pad_token_id, scope.policy, micro
        )
        seconds = time.perf_counter() - start
        print(f"reference: log-probs of {len(cache)} pairs computed in {seconds:.1f} s, kept in {saved.name}")
        if scope.world.main:
            artifacts.write_json(saved, {"seconds": seconds, "logps": cache})
    return dataclasses.replace(objective, cache=cache)


def _objective_metrics(objective: Objective) -> dict:
    """metrics.json's `objective`: the method and its settings (no cache)."""
    if objective.name == "sft":
        return {"method": "sft"}
    return {k: v for k, v in dataclasses.asdict(objective).items() if k != "cache"}


def _print_data(examples: list, stats, data_format: str, cfg: RunConfig) -> None:
    unit = "pairs" if cfg.pref.method != "sft" else "examples"
    print(
        f"data: {len(examples)} {unit} ({data_format}) from {cfg.data.path or 'the built-in data set'}, "
        f"{stats.tokens:,} tokens, {stats.truncated} truncated, {stats.dropped} dropped"
    )
    if stats.skipped:
        print(f"data: {stats.skipped} malformed records skipped, e.g. " + "; ".join(stats.skip_reasons))


def _checkpointer(cfg: RunConfig, examples: list, out_dir: Path, resume: bool) -> Checkpointer:
    """Checkpointing for this run; when resuming, the checkpoint to start from, checked against
    this run's config and data before any model work."""
    run_fingerprint = checkpoint.fingerprint(to_dict(cfg), examples)
    start = None
    if resume:
        start = checkpoint.latest(out_dir)
        if start is None:
            raise SolotuneError(f"--resume: no complete checkpoint in {out_dir / checkpoint.CHECKPOINTS_DIR}")
        checkpoint.check_compatible(start.state["fingerprint"], run_fingerprint, start.path)
    return Checkpointer(out_dir, cfg.train.save_every, cfg.train.keep, run_fingerprint, start)


def _evaluate_before(
    evaluation: Evaluation, model, tokenizer, fast: FastPaths, objective: Objective, scope: RunScope
) -> None:
    """The held-out loss and accuracy before training; a resumed run reuses its first part's."""
    saved = scope.out_dir / EVAL_BEFORE_FILE
    if scope.resume and saved.is_file():
        evaluation.results.update(artifacts.read_json(saved))
        evaluation.held_out.best = evaluation.results["loss_before"]
        return
    evaluation.run("before", model, tokenizer, scope.policy, fast, 0, objective)
    if scope.world.main:
        artifacts.write_json(saved, evaluation.results)


def _save_weights(model, tokenizer, scope: RunScope, best_step: int | None = None) -> Path:
    """Save the trained adapter (or model); returns its folder. `best_step`: --eval.keep-best's
    copy of the lowest eval loss so far, beside the final weights, with its step."""
    cfg, world = scope.cfg, scope.world
    name = "adapter" if cfg.lora.enabled else "model"
    folder = scope.out_dir / (name if best_step is None else f"best-{name}")
    if sharding.is_sharded(model):  # every rank gathers, rank 0 writes
        sharding.save_whole(model, tokenizer, folder, world.main)
    elif world.main:
        save_trained(model, tokenizer, folder)
    if world.main:
        copy_gguf_origin(resolve_model_source(cfg.model), folder)  # for `solotune export`
        copy_format(scope.out_dir, folder)  # how to ask it: generate, chat, merge and export read it
    if world.main and best_step is not None:
        artifacts.write_json(folder / "best.json", {"step": best_step})
    return folder


def _generate(model, tokenizer, cfg: RunConfig, policy, fmt: PromptFormat) -> list[Generation]:
    """`generate`, drawing from a generator seeded by the run's seed: ranks generating in step
    (FSDP2) draw the same tokens, so they stop after the same number of forwards.

    The sample generations are a report, not the run: where transformers cannot generate with
    this model, the run goes on without them and says why in one line."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if policy.device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed)
        try:
            return generate(model, tokenizer, eval_inputs(cfg.generate, fmt, tokenizer), cfg.generate, policy)
        except Exception as e:
            if is_out_of_memory(e) or isinstance(e, SolotuneError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(
                f"generations: skipped, transformers could not generate with this model ({type(e).__name__}: {first})"
            )
            return []


def _generations_before(model, tokenizer, scope: RunScope, fmt: PromptFormat) -> list[Generation]:
    """The generations before training; a resumed run reuses those its first part recorded."""
    saved = scope.out_dir / GENERATIONS_BEFORE_FILE
    if not scope.cfg.generate.enabled:
        return []
    if scope.resume and saved.is_file():
        return [Generation.from_dict(g) for g in artifacts.read_json(saved)["generations"]]
    before = _generate(model, tokenizer, scope.cfg, scope.policy, fmt)
    if scope.world.main:
        artifacts.write_json(saved, {"generations": [g.as_dict() for g in before]})
    return before


def check_device_support(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse, before any model work, the settings that need a GPU when the run has none.

    Every device-dependent refusal lives here, so that a run fails on the first one in one line.
    """
    choose_kernels(cfg.kernels, device)  # --train.kernels liger without a GPU or the package
    if device.type == "cuda":
        return
    if cfg.offload_activations:
        raise SolotuneError(
            "train.offload_activations moves activations from the GPU to CPU memory; it needs --device cuda"
        )
    if cfg.optim.startswith("paged"):
        raise SolotuneError(
            f"--optim {cfg.optim}: paged optimizers keep their state in CUDA unified memory and need a GPU; "
            "on the CPU use --optim adamw8bit or adamw"
        )

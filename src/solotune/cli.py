"""The `solotune` command: train, ablate, report, estimate, generate, chat, merge, export.

Every leaf of the config tree is an option (`--lora.r 8`, `--train.grad-accum 4`), and the
common ones have short aliases (`--mp`, `--grad-accum`, `--batch`, ...). Errors the user can
fix are printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing
import warnings

from solotune.config import (
    DEFAULT_CUDA_OVERHEAD_MIB,
    GenerateConfig,
    PrecisionConfig,
    RunConfig,
    apply_override,
    config_paths,
    leaf_fields,
    load_yaml,
)
from solotune.errors import OUT_OF_MEMORY_EXIT, USER_ERROR_EXIT, SolotuneError

ALIASES = {
    "model.name": ["--model"],
    "data.path": ["--data"],
    "data.samples": ["--samples"],
    "data.max_len": ["--max-len"],
    "lora.enabled": ["--lora"],
    "lora.target_modules": ["--target-modules"],
    "precision.mp": ["--mp"],
    "precision.base_dtype": ["--base-dtype"],
    "quant.method": ["--quant"],
    "train.optim": ["--optim"],
    "train.batch": ["--batch"],
    "train.grad_accum": ["--grad-accum"],
    "train.grad_checkpointing": ["--grad-checkpointing"],
    "train.epochs": ["--epochs"],
    "train.max_steps": ["--max-steps"],
    "train.lr": ["--lr"],
    "train.seed": ["--seed"],
    "pref.method": ["--method"],
    "pref.orpo_lambda": ["--pref.lambda"],
    "nproc": ["--nproc", "--processes", "--gpus"],
}
config_paths(ALIASES, "cli.ALIASES")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per config leaf, named by its dotted path, plus the aliases above."""
    for path, tp, f in leaf_fields():
        names = list(dict.fromkeys([f"--{path.replace('_', '-')}"] + ALIASES.get(path, [])))
        kwargs = {"dest": path, "default": argparse.SUPPRESS, "help": f"default: {_default_of(f)}"}
        if tp is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        elif "switch_on" in f.metadata:  # --x (its "on" value), --x VALUE, --no-x ("off")
            on, values = f.metadata["switch_on"], f.metadata["choices"]
            parser.add_argument(*names, nargs="?", const=on, metavar="|".join(values), **kwargs)
            negated = [n.replace("--", "--no-", 1) for n in names]
            parser.add_argument(*negated, action="store_const", const="off", dest=path, default=argparse.SUPPRESS)
        elif typing.get_origin(tp) is list:
            parser.add_argument(*names, nargs="+", metavar="VALUE", **kwargs)
        else:
            parser.add_argument(
                *names, metavar=path.rsplit(".", 1)[-1].upper(), choices=f.metadata.get("choices"), **kwargs
            )


def _default_of(f) -> object:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """YAML file (if any), then each option given on the command line, in schema order."""
    cfg = load_yaml(args.config) if args.config else RunConfig()
    given = vars(args)
    for path, _, _ in leaf_fields():
        if path in given:
            apply_override(cfg, path, given[path])
    return cfg


def train_config(args: argparse.Namespace) -> RunConfig:
    """The configuration `solotune train` runs: with --resume, the stopped run's own config with
    any options given now on top (checked against the checkpoint's before training goes on)."""
    if not args.resume:
        return config_from_args(args)
    from solotune.artifacts import CONFIG_FILE
    from solotune.training.checkpoint import find_run

    run_dir = find_run(args.resume)
    args.config = args.config or str(run_dir / CONFIG_FILE)
    cfg = config_from_args(args)
    cfg.output_dir = str(run_dir)
    return cfg


def cmd_train(args: argparse.Namespace) -> None:
    from solotune.run.train import run_training

    run_training(train_config(args), resume=bool(args.resume))


def cmd_ablate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from solotune.experiment.ablate import parse_axes, run_grid
    from solotune.experiment.report import LiveReport, write_report

    cfg = config_from_args(args)
    if args.resume:
        grid_dir = run_grid(cfg, [], Path(args.resume), resume=True, timeout_s=args.cell_timeout, watch=LiveReport)
    else:
        out = Path(cfg.output_dir) if cfg.output_dir else None
        axes = parse_axes(args.axes)
        grid_dir = run_grid(cfg, axes, out, resume=False, timeout_s=args.cell_timeout, watch=LiveReport)
    print(f"report: {write_report(grid_dir)}")


def cmd_report(args: argparse.Namespace) -> None:
    from pathlib import Path

    from solotune.artifacts import GRID_FILE
    from solotune.experiment.report import write_report

    folder = Path(args.grid)
    if not (folder / GRID_FILE).is_file():
        raise SolotuneError(f"{folder} is not an ablation grid folder (no {GRID_FILE})")
    print(f"report: {write_report(folder)}")


def cmd_estimate(args: argparse.Namespace) -> None:
    from solotune.config import parse_size, validate
    from solotune.experiment.estimate import estimate_memory, model_config, print_estimate, print_search, search

    cfg = validate(config_from_args(args))
    seq_len = args.seq_len or cfg.data.max_len
    est = estimate_memory(model_config(cfg.model.name, cfg.model.trust_remote_code), cfg, seq_len)
    gpu_mib = parse_size(args.gpu_mem, "--gpu-mem") / 2**20 if args.gpu_mem else None
    print_estimate(est, cfg, seq_len, args.overhead_mib, gpu_mib)
    if args.search:
        if gpu_mib is None:
            raise SolotuneError("--search needs --gpu-mem, the memory to fit in")
        print_search(
            search(model_config(cfg.model.name, cfg.model.trust_remote_code), cfg, seq_len, gpu_mib, args.overhead_mib),
            cfg,
            seq_len,
            gpu_mib,
        )


def cmd_generate(args: argparse.Namespace) -> None:
    from solotune.prompting import RAW, PromptFormat
    from solotune.run.generate import eval_inputs, generate, load_for_inference, print_generations

    loaded = load_for_inference(args.adapter, args.model, PrecisionConfig(mp=args.mp), args.device)
    fmt = RAW if args.raw else loaded.format
    print(fmt.describe())
    cfg = GenerateConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, static_cache=args.static_cache)
    if args.prompt or args.instruction:  # --prompt in the model's format, --instruction in Alpaca's
        ask = [fmt.ask(p, loaded.tokenizer) for p in args.prompt]
        ask += [PromptFormat("alpaca").ask(i, loaded.tokenizer) for i in args.instruction]
    else:
        ask = eval_inputs(cfg, fmt, loaded.tokenizer)
    name = args.adapter or args.model or "embedded default"
    print_generations(f"generations ({name})", generate(loaded.model, loaded.tokenizer, ask, cfg, loaded.policy))


def cmd_chat(args: argparse.Namespace) -> None:
    from solotune.prompting import RAW
    from solotune.run.chat import chat
    from solotune.run.generate import load_for_inference

    loaded = load_for_inference(args.adapter, args.model, PrecisionConfig(mp=args.mp), args.device)
    if args.raw:
        loaded.format = RAW
    cfg = GenerateConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        static_cache=args.static_cache,
    )
    chat(loaded, cfg, interactive=sys.stdin.isatty())


def cmd_merge(args: argparse.Namespace) -> None:
    from solotune.model.adapters import merge_to_folder

    merge_to_folder(args.adapter, args.output, args.model)


def cmd_export(args: argparse.Namespace) -> None:
    from solotune.run.export import describe, export_gguf

    result = export_gguf(args.gguf, args.type, args.adapter, args.model or args.base, args.ollama)
    print(describe(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="solotune", description="Fine-tune a causal LM on one GPU or a CPU, measured."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_ablate, _add_estimate, _add_report, _add_generate, _add_chat, _add_merge, _add_export):
        add(sub)
    return parser


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="fine-tune a model (default: the embedded SmolLM2-135M on the built-in data)")
    train.add_argument("config", nargs="?", help="a YAML config file; options below override it")
    train.add_argument(
        "--resume",
        metavar="RUN",
        help="continue a stopped run from its newest checkpoint: "
        "its folder, or 'latest' (the newest unfinished run under runs/)",
    )
    add_config_options(train)
    train.set_defaults(func=cmd_train)


def _add_ablate(sub) -> None:
    ablate = sub.add_parser(
        "ablate", help="run every combination of the techniques, one process per cell; tables + HTML report"
    )
    ablate.add_argument("config", nargs="?", help="a YAML config file shared by every cell; options below override it")
    ablate.add_argument(
        "--axes",
        default="ga,mp,lora",
        help="comma-separated axes from ga, mp, lora, gc, pf, cce, swiglu, sdrop (default: ga,mp,lora)",
    )
    ablate.add_argument(
        "--resume", metavar="GRID_DIR", help="finish an interrupted grid: run only the cells without a result"
    )
    ablate.add_argument(
        "--cell-timeout", type=float, metavar="SECONDS", help="stop a cell that runs longer (it becomes X)"
    )
    add_config_options(ablate)
    ablate.set_defaults(func=cmd_ablate)


def _add_estimate(sub) -> None:
    estimate = sub.add_parser("estimate", help="predict a configuration's memory from the model's config alone")
    estimate.add_argument("config", nargs="?", help="the YAML config file that train takes; options below override it")
    estimate.add_argument("--seq-len", type=int, help="tokens per sequence (default: --max-len, every sequence full)")
    estimate.add_argument("--gpu-mem", help="does it fit in this much, e.g. 24GB or 80GiB")
    estimate.add_argument(
        "--search", action="store_true", help="list the configurations that fit in --gpu-mem, fastest first"
    )
    estimate.add_argument(
        "--overhead-mib",
        type=float,
        default=DEFAULT_CUDA_OVERHEAD_MIB,
        help="CUDA context + cuBLAS workspaces + allocator slack",
    )
    add_config_options(estimate)
    estimate.set_defaults(func=cmd_estimate)


def _add_report(sub) -> None:
    report = sub.add_parser("report", help="rebuild the tables and report.html of a grid")
    report.add_argument("grid", help="the grid folder, e.g. runs/ablate-<id>")
    report.set_defaults(func=cmd_report)


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="generate from prompts with a base model or a saved adapter, timed")
    _inference_options(gen)
    gen.add_argument(
        "--prompt", action="append", default=[], help="a prompt, in the format the model was trained in (repeatable)"
    )
    gen.add_argument(
        "--instruction", action="append", default=[], help="an instruction, wrapped in the Alpaca template (repeatable)"
    )
    gen.set_defaults(func=cmd_generate)


def _add_chat(sub) -> None:
    chat = sub.add_parser(
        "chat", help="talk with a base model, an adapter or a merged model (/reset, /exit); stdin: one turn a line"
    )
    _inference_options(chat)
    chat.add_argument("--temperature", type=float, default=GenerateConfig.temperature, help="with --do-sample")
    chat.add_argument("--top-p", type=float, default=GenerateConfig.top_p, help="with --do-sample")
    chat.set_defaults(func=cmd_chat)


def _inference_options(parser: argparse.ArgumentParser) -> None:
    """What `generate` and `chat` share: which model, how it is asked, decoding and device."""
    parser.add_argument("--adapter", help="a saved adapter (or full fine-tune) folder, e.g. runs/<run>/adapter")
    parser.add_argument("--model", help="base model (default: the one the adapter names, else the embedded default)")
    parser.add_argument(
        "--raw", action="store_true", help="send the text as given, not in the format the model was trained in"
    )
    parser.add_argument("--max-new-tokens", type=int, default=GenerateConfig.max_new_tokens)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument(
        "--static-cache", action="store_true", help="a KV cache allocated once at full length (CUDA graphs, compile)"
    )
    parser.add_argument("--mp", default="auto", choices=("auto", "off", "bf16", "fp16"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def _add_merge(sub) -> None:
    merge = sub.add_parser("merge", help="merge a LoRA adapter into its base model and save a plain HF model")
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--output", required=True, help="folder for the merged model")
    merge.add_argument("--model", help="base model (default: the one the adapter names)")
    merge.set_defaults(func=cmd_merge)


def _add_export(sub) -> None:
    from solotune.run.export import SUPPORTED, TYPES

    export = sub.add_parser(
        "export",
        help="write a fine-tuned model as one GGUF file (llama.cpp, Ollama, LM Studio)",
        description=f"Supported: {', '.join(SUPPORTED)}, with BPE tokenizers (byte-level or SentencePiece).",
    )
    given = export.add_mutually_exclusive_group(required=True)
    given.add_argument("--adapter", help="a LoRA or QLoRA adapter folder (runs/<run>/adapter): merged first")
    given.add_argument("--model", help="a full fine-tuned or merged model folder (runs/<run>/model)")
    export.add_argument("--base", help="with --adapter: its base model (default: the one the adapter names)")
    export.add_argument("--gguf", required=True, help="the file to write, e.g. model.gguf")
    export.add_argument("--type", default="f16", help=f"the 2-D weights' type: {', '.join(TYPES)} (norms stay f32)")
    export.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile beside it")
    export.set_defaults(func=cmd_export)


def quiet_libraries() -> None:
    """Our own progress bar and summary say what matters; silence the libraries' chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """The command. Called with argv=None (the `solotune` command itself), a training run first
    re-executes the process with the chosen CPU allocator, before torch is imported."""
    args = build_parser().parse_args(argv)
    try:
        if argv is None and args.func is cmd_train:
            from solotune.measure.allocator import reexec_with
            from solotune.parallel import dist

            cfg = train_config(args)
            if cfg.nproc > 1 and not dist.launched_by_torchrun():
                from solotune.config import validate
                from solotune.parallel.launch import check_devices, launch

                validate(cfg)  # one line here, not one per rank under torchrun
                check_devices(cfg.nproc, cfg.device)
                return launch(cfg.nproc, sys.argv[1:])  # torchrun starts this command on each rank
            reexec_with(cfg.cpu_allocator, sys.argv[1:])
        quiet_libraries()
        args.func(args)
    except SolotuneError as e:
        print(f"solotune: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", USER_ERROR_EXIT)
    except KeyboardInterrupt:
        print("solotune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from solotune.errors import is_out_of_memory

        lost = _lost_a_rank(e)
        if lost:
            print(f"solotune: error: {lost}", file=sys.stderr)
            return 1
        if not is_out_of_memory(e):
            raise
        print(f"solotune: error: out of memory: {str(e).strip().splitlines()[0][:300]}", file=sys.stderr)
        return OUT_OF_MEMORY_EXIT
    return 0


def _lost_a_rank(e: BaseException) -> str | None:
    """Under torchrun, a collective that failed because another rank is gone: one line for it
    (the launcher names the rank that failed first), not this rank's traceback."""
    import torch.distributed as torch_dist

    from solotune.parallel import dist

    # Gloo reports a peer that died as a plain RuntimeError from its transport.
    gloo_peer_gone = isinstance(e, RuntimeError) and any(m in str(e) for m in ("closed by peer", "reset by peer"))
    if not (dist.launched_by_torchrun() and (isinstance(e, torch_dist.DistError) or gloo_peer_gone)):
        return None
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    reason = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:200]  # less gloo's source location
    return f"rank {dist.current().rank}: another rank of the job is gone ({reason})"


if __name__ == "__main__":
    sys.exit(main())

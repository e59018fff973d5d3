"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder `checkpoints/step-NNNNNN/` in the run folder:
  trainable.safetensors  the trainable weights (the adapter, or the whole model when full)
  optimizer.safetensors  the optimizer's tensors (AdamW moments and step counts)
  rng.safetensors        torch's CPU and CUDA generator states
  state.json             the step, the optimizer's hyper-parameters, the scheduler, the
                         gradient scaler, Python's and NumPy's RNG states, the loop's records so
                         far (losses, tokens, time) and the fingerprint of the run's config + data
Safetensors and JSON only: loading one runs no pickled code. It is written into a hidden
temporary folder, every file flushed to disk, then renamed: a folder named step-* is always
complete, whatever moment the process was killed at.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from solotune.artifacts import METRICS_FILE
from solotune.config import config_paths
from solotune.data import sequences_of
from solotune.errors import SolotuneError
from solotune.parallel import sharding

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
# Config entries that may change between a run and its resumption without changing the maths.
# Settings that change neither the maths nor the data: a run may resume with others.
FREE_ON_RESUME = {
    "output_dir",
    "mem_limit",
    "cpu_allocator",
    "generate",
    "train.save_every",
    "train.keep",
    "train.track_memory",
    "train.compile",
}
config_paths(FREE_ON_RESUME, "checkpoint.FREE_ON_RESUME")


@dataclass
class Checkpoint:
    path: Path
    step: int  # optimizer steps completed
    state: dict  # the parsed state.json


def fingerprint(config: dict, examples) -> dict:
    """What must be the same to resume: the config (less FREE_ON_RESUME) and the tokenized data."""
    digest = hashlib.sha256()
    for e in sequences_of(examples):
        digest.update(json.dumps([e.input_ids, e.labels]).encode())
    kept = {}
    for section, value in config.items():
        if section in FREE_ON_RESUME:
            continue
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if f"{section}.{k}" not in FREE_ON_RESUME}
        kept[section] = value
    return {"config": kept, "data_sha256": digest.hexdigest()}


def check_compatible(saved: dict, current: dict, where: Path) -> None:
    """Refuse a checkpoint whose config or data differs, naming each difference."""
    diffs = []
    if saved["data_sha256"] != current["data_sha256"]:
        diffs.append("the training data (its tokens differ)")
    for section in sorted(set(saved["config"]) | set(current["config"])):
        a, b = saved["config"].get(section), current["config"].get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                f"{section}.{k}: {a.get(k)!r} there, {b.get(k)!r} now"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            diffs.append(f"{section}: {a!r} there, {b!r} now")
    if diffs:
        raise SolotuneError(f"cannot resume from {where}: it was made with a different run; " + "; ".join(diffs))


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class Payload:
    """What a checkpoint keeps of the run after optimizer step `step`."""

    step: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object  # torch.amp.GradScaler (fp16) or one that is off
    records: dict  # the loop's measurements so far (loop.LoopResult, less the memory report)
    # Every rank's `rng_state()` in a run of several processes (rank 0 writes them all); None:
    # this process's alone.
    rank_rngs: list[dict] | None = None
    # `trained_state(model, optimizer)`, where it was gathered already (FSDP2).
    trained: tuple[dict, dict] | None = None


def save(run_dir: Path, payload: Payload, run_fingerprint: dict, keep: int) -> Path:
    """Write the checkpoint of `payload.step` atomically; keep only the newest `keep`. Returns
    its folder."""
    step, rank_rngs = payload.step, payload.rank_rngs or [rng_state()]
    trainable, optimizer_state = payload.trained or trained_state(payload.model, payload.optimizer)
    root = run_dir / CHECKPOINTS_DIR
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt_tensors, opt_rest = _split_optimizer_state(optimizer_state)
    # Rank 0's generators under their plain names, the other ranks' prefixed "rank<r>.".
    rng_tensors = {
        (name if r == 0 else f"rank{r}.{name}"): t
        for r, rng in enumerate(rank_rngs)
        for name, t in rng["torch"].items()
    }
    state = {
        "step": step,
        "optimizer": opt_rest,
        "scheduler": payload.scheduler.state_dict(),
        "scaler": payload.scaler.state_dict(),
        "python_rng": rank_rngs[0]["python"],
        "numpy_rng": rank_rngs[0]["numpy"],
        "other_ranks_rng": [{"python": rng["python"], "numpy": rng["numpy"]} for rng in rank_rngs[1:]],
        "records": payload.records,
        "fingerprint": run_fingerprint,
    }
    files = {"trainable.safetensors": trainable, "optimizer.safetensors": opt_tensors, "rng.safetensors": rng_tensors}
    try:
        for name, tensors in files.items():
            save_file(tensors, tmp / name)
        (tmp / STATE_FILE).write_text(json.dumps(state))
        _fsync_folder(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written left behind
        if not _disk_full(e):
            raise
        needed = sum(t.numel() * t.element_size() for tensors in files.values() for t in tensors.values())
        raise SolotuneError(_disk_full_message(run_dir, step, needed)) from None
    if final.exists():  # the same step saved again (e.g. interrupted right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_path(root)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _disk_full(e: BaseException) -> bool:
    """ENOSPC or a quota, as an OSError or as safetensors' own error (which carries the OS's)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text or "os error 28" in text


def _disk_full_message(run_dir: Path, step: int, needed_bytes: int) -> str:
    free = shutil.disk_usage(run_dir).free
    last = latest(run_dir)
    resume = (
        f"the last complete checkpoint, {last.path}, is intact: free some space and continue with "
        f"solotune train --resume {run_dir}"
        if last
        else "no checkpoint was written before it"
    )
    return (
        f"checkpoint of step {step}: the disk is full ({needed_bytes / 2**20:,.1f} MiB to write, "
        f"{free / 2**20:,.1f} MiB free under {run_dir}); nothing of it was kept, and {resume}"
    )


def trained_state(model, optimizer, keep: bool = True) -> tuple[dict, dict]:
    """The trainable weights by name (on the CPU) and the optimizer's state dict, each tensor whole.

    Under FSDP2 each rank holds a shard of every tensor: every rank must call, each tensor is
    gathered in turn, and only where `keep` (rank 0) is it kept, one tensor at a time in memory.
    """
    trainable = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = sharding.full_tensor(p.detach())
            if keep:
                trainable[name] = whole.contiguous().cpu()
    sd = optimizer.state_dict()
    state = {}
    for index, per_param in sd["state"].items():
        whole = {k: sharding.full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in per_param.items()}
        if keep:
            state[index] = whole
    return trainable, {**sd, "state": state}


def _split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state dict as flat tensors (for safetensors) and the rest (for JSON)."""
    tensors, rest = {}, {"param_groups": sd["param_groups"], "scalars": {}}
    storages = set()  # safetensors refuses shared storage: bitsandbytes shares its code books

    def split(prefix: str, entries: dict) -> None:  # nested: bitsandbytes keeps its 8-bit state in a dict
        for key, value in entries.items():
            if isinstance(value, dict):
                split(f"{prefix}{key}.", value)
            elif isinstance(value, torch.Tensor):
                shared = value.untyped_storage()._cdata in storages
                storages.add(value.untyped_storage()._cdata)
                tensors[f"{prefix}{key}"] = value.detach().to("cpu", copy=shared).contiguous()
            else:
                rest["scalars"][f"{prefix}{key}"] = value

    for index, per_param in sd["state"].items():
        split(f"{index}.", per_param)
    return tensors, rest


def rng_state() -> dict:
    """This process's random generators: torch's (CPU and CUDA), Python's and NumPy's."""
    return {"torch": _torch_rng_tensors(), "python": _python_rng_state(), "numpy": _numpy_rng_state()}


def _torch_rng_tensors() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _fsync_folder(folder: Path) -> None:
    for f in folder.iterdir():
        _fsync_path(f)
    _fsync_path(folder)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Reading


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of a run folder, or None. Temporary folders are ignored."""
    folders = sorted(p for p in (run_dir / CHECKPOINTS_DIR).glob("step-*") if (p / STATE_FILE).is_file())
    for folder in reversed(folders):
        try:
            state = json.loads((folder / STATE_FILE).read_text())
        except (OSError, ValueError):
            continue  # unreadable: fall back to the one before
        return Checkpoint(folder, int(state["step"]), state)
    return None


def restore(ckpt: Checkpoint, model, optimizer, scheduler, scaler, rank: int = 0) -> dict:
    """Load weights, optimizer, scheduler, scaler and every RNG from `ckpt`; returns its records.

    `rank`: the process whose generators to take, in a run of several (dist.py).
    """
    try:
        trainable = load_file(ckpt.path / "trainable.safetensors")
        opt_tensors = load_file(ckpt.path / "optimizer.safetensors")
        rng = load_file(ckpt.path / "rng.safetensors")
    except (OSError, ValueError, RuntimeError) as e:
        raise SolotuneError(
            f"checkpoint {ckpt.path} is damaged ({e}); remove it to resume from the one before"
        ) from None
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in trainable]
    if missing:
        raise SolotuneError(f"checkpoint {ckpt.path} lacks trainable weights such as {missing[0]}")
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(sharding.shard_like(value, params[name]))
    optimizer.load_state_dict(
        _as_optimizer_params(_join_optimizer_state(opt_tensors, ckpt.state["optimizer"]), optimizer)
    )
    scheduler.load_state_dict(ckpt.state["scheduler"])
    if ckpt.state["scaler"]:
        scaler.load_state_dict(ckpt.state["scaler"])
    if rank == 0:
        _restore_rng(rng, ckpt.state)
    else:
        prefix = f"rank{rank}."
        others = ckpt.state.get("other_ranks_rng", [])
        if len(others) < rank:
            raise SolotuneError(f"cannot resume from {ckpt.path} as rank {rank}: it holds {len(others) + 1} ranks")
        mine = others[rank - 1]
        own_state = {"python_rng": mine["python"], "numpy_rng": mine["numpy"]}
        _restore_rng({k[len(prefix) :]: t for k, t in rng.items() if k.startswith(prefix)}, own_state)
    return ckpt.state["records"]


def _as_optimizer_params(sd: dict, optimizer) -> dict:
    """`sd` with each state tensor laid out as its parameter (under FSDP2: this rank's shard)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sd["state"] = {
        index: {
            k: sharding.shard_like(v, params[int(index)]) if isinstance(v, torch.Tensor) else v
            for k, v in entry.items()
        }
        for index, entry in sd["state"].items()
    }
    return sd


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        index, *parents, key = flat.split(".")
        node = state.setdefault(int(index), {})
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _restore_rng(rng: dict[str, torch.Tensor], state: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def find_run(requested: str, runs_root: Path = Path("runs")) -> Path:
    """The run folder for `--resume`: a path, or "latest" (the newest unfinished run with a checkpoint)."""
    if requested != "latest":
        run = Path(requested)
        if latest(run) is None:
            raise SolotuneError(f"--resume {requested}: no complete checkpoint in {run / CHECKPOINTS_DIR}")
        return run
    newest = {p: latest(p) for p in runs_root.glob("*") if not (p / METRICS_FILE).exists()}
    candidates = {p: c.path.stat().st_mtime for p, c in newest.items() if c is not None}
    if not candidates:
        raise SolotuneError(f"--resume latest: no unfinished run with a checkpoint under {runs_root}/")
    return max(candidates, key=candidates.get)


@dataclass
class Checkpointer:
    """When and where the loop saves, and the checkpoint it resumes from (if any)."""

    run_dir: Path
    save_every: int  # optimizer steps between checkpoints (and one at the end); 0 = only on a stop signal
    keep: int
    fingerprint: dict
    resume_from: Checkpoint | None = None

    def due(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0


class StopRequests:
    """SIGINT and SIGTERM ask the loop to stop after the current step (and save); a second
    SIGINT stops at once."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self) -> StopRequests:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

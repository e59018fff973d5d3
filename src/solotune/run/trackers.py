"""Experiment trackers (`--report-to`): a run's numbers in the tools people follow runs in,
written through each tool's own library, offline.

Each step logs the loss, learning rate, gradient norm and seconds; each evaluation its loss;
the end of the run the peak memory and its breakdown, tokens/s, the eval loss and task
accuracy. The run's resolved configuration and library versions go with it, and its switches
as hyperparameters, so that the tracker's own compare view lays an ablation grid's cells side
by side (`solotune ablate` runs each cell as a run of its own, named after the cell and grouped
by the grid's folder).

Where each one writes, offline:
- tensorboard: event files in the run folder's `tensorboard/` (`tensorboard --logdir runs/`).
- mlflow: `MLFLOW_TRACKING_URI` if set, else MLflow's own default, a SQLite store
  `mlflow.db` in the working directory (`mlflow ui`); experiment `solotune`
  (`MLFLOW_EXPERIMENT_NAME`).
- wandb: an offline run in the run folder's `wandb/` (`wandb sync` uploads it);
  `WANDB_MODE=online` streams instead. Project `solotune` (`WANDB_PROJECT`).
- trackio: its local store (`TRACKIO_DIR`, default under the Hugging Face cache; `trackio show`),
  project `solotune`.

A run that fails is closed as failed where the tracker knows the state (MLflow, W&B).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from pathlib import Path

from solotune.config import config_paths, get_path
from solotune.errors import SolotuneError

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
PROJECT = "solotune"  # the experiment / project every run goes into, unless the tracker's variable says

# The switches shown as hyperparameters: what tells an ablation's cells apart, and the scale.
HPARAMS = {
    "lora": "lora.enabled",
    "lora_r": "lora.r",
    "mp": "precision.mp",
    "quant": "quant.method",
    "batch": "train.batch",
    "grad_accum": "train.grad_accum",
    "grad_checkpointing": "train.grad_checkpointing",
    "lr": "train.lr",
    "optim": "train.optim",
    "max_len": "data.max_len",
    "method": "pref.method",
}
config_paths(HPARAMS.values(), "trackers.HPARAMS")


def _library(tracker: str, module: str, extra: str):
    """Import a tracker's library, or fail in one line naming what to install."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise SolotuneError(
            f"--report-to {tracker}: the {extra} package is not installed; "
            f"pip install 'solotune[{tracker}]' (or {extra})"
        ) from None


def hparams(config: dict) -> dict:
    """The run's switches, by short name (`HPARAMS`)."""
    return {name: get_path(config, path) for name, path in HPARAMS.items()}


def flatten(config: dict, prefix: str = "") -> dict:
    """`{"train": {"lr": 1e-3}}` -> `{"train.lr": 1e-3}`: the form MLflow's params take."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class RunIdentity:
    """How a run is named in a tracker: its folder's name, and the grid it belongs to, if any."""

    def __init__(self, folder: Path, config: dict, versions: dict, group: str | None):
        self.folder, self.config, self.versions, self.group = folder, config, versions, group
        self.name = folder.name


class TensorBoard:
    """A run's scalars, config and hyperparameters in TensorBoard event files."""

    def __init__(self, run: RunIdentity):
        writer = _library("tensorboard", "torch.utils.tensorboard", "tensorboard").SummaryWriter
        self.writer = writer(str(run.folder / TENSORBOARD_DIR))
        self.run = run
        text = json.dumps({**run.config, "versions": run.versions}, indent=2)
        self.writer.add_text("config", f"```\n{text}\n```")

    def log(self, step: int, values: dict) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def finish(self, step: int, summary: dict) -> None:
        """The run's results at its last step, and the switches with them (HParams view)."""
        self.log(step, summary)
        switches = {name: _hparam(value) for name, value in hparams(self.run.config).items()}
        self.writer.add_hparams(switches, {f"hparam/{k}": v for k, v in summary.items()}, run_name=".")
        self.writer.close()

    def abort(self) -> None:
        self.writer.close()


def _hparam(value):
    """A number or a string: TensorBoard's writer would store a boolean as the number 1 or 0."""
    return value if isinstance(value, (int, float, str)) and not isinstance(value, bool) else str(value)


class MLflow:
    """A run in an MLflow experiment: the config as params, the switches and grid as tags."""

    def __init__(self, run: RunIdentity):
        mlflow = _library("mlflow", "mlflow", "mlflow-skinny")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        uri = mlflow.get_tracking_uri()
        if uri.split(":")[0].split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql"):
            _library("mlflow", "sqlalchemy", "sqlalchemy")  # a database store needs both
            _library("mlflow", "alembic", "alembic")

        for name in ("mlflow", "alembic"):  # the store's set-up logs INFO lines a user cannot act on
            logging.getLogger(name).setLevel(logging.WARNING)
        self.Metric = Metric
        self.client = MlflowClient(uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        tags = {
            **{f"solotune.{k}": str(v) for k, v in hparams(run.config).items()},
            **{f"version.{k}": v for k, v in run.versions.items()},
            **({"solotune.grid": run.group} if run.group else {}),
            "solotune.folder": str(run.folder.resolve()),
        }
        self.run_id = self.client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in flatten(run.config).items()])
        print(f"mlflow: run {run.name} in experiment {experiment_name} at {uri}")

    def log(self, step: int, values: dict) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, float(v), now, step) for k, v in values.items()])

    def finish(self, step: int, summary: dict) -> None:
        self.log(step, summary)
        self.client.set_terminated(self.run_id, "FINISHED")

    def abort(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")


class WandB:
    """A W&B run, offline unless `WANDB_MODE` says otherwise; the end-of-run numbers are its summary."""

    def __init__(self, run: RunIdentity):
        wandb = _library("wandb", "wandb", "wandb")
        mode = os.environ.get("WANDB_MODE", "offline")
        folder = run.folder / WANDB_DIR
        folder.mkdir(exist_ok=True)
        # Quiet, and nothing a user did not ask for: no console capture, no code or git probing.
        settings = wandb.Settings(silent=True, console="off", save_code=False, disable_git=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=run.name,
            group=run.group,
            config={**run.config, "versions": run.versions},
            tags=[f"{k}={v}" for k, v in hparams(run.config).items()],
            dir=str(run.folder),
            mode=mode,
            settings=settings,
        )
        where = f"offline run in {self.run.dir.removesuffix('/files')}" if mode == "offline" else f"{mode} run"
        print(f"wandb: {where}" + (" (`wandb sync` uploads it)" if mode == "offline" else ""))

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def finish(self, step: int, summary: dict) -> None:
        self.run.summary.update(summary)
        self.run.finish()

    def abort(self) -> None:
        self.run.finish(exit_code=1)


class Trackio:
    """A run in trackio's local store (its dashboard: `trackio show --project solotune`)."""

    def __init__(self, run: RunIdentity):
        self.trackio = trackio = _library("trackio", "trackio", "trackio")
        with contextlib.redirect_stdout(io.StringIO()):  # its banner: five lines of how to view it
            self.run = trackio.init(
                project=PROJECT,
                name=run.name,
                group=run.group,
                config={**run.config, "versions": run.versions},
                auto_log_cpu=False,
                auto_log_gpu=False,
            )
        print(f"trackio: run {run.name} in project {PROJECT} (trackio show --project {PROJECT})")

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def finish(self, step: int, summary: dict) -> None:
        self.log(step, summary)
        self.abort()

    def abort(self) -> None:
        """Close the run (trackio keeps no finished or failed state). Through the module, which
        also forgets the run: its exit hook would otherwise close it again, printing as it does."""
        with contextlib.redirect_stdout(io.StringIO()):
            self.trackio.finish()


TRACKERS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB, "trackio": Trackio}


class Trackers:
    """Every tracker a run reports to, as one; a context that closes them, as failed on an error."""

    def __init__(self, names: list[str], run: RunIdentity):
        self.trackers = []
        for name in names:  # one that cannot start closes those already started
            try:
                self.trackers.append(TRACKERS[name](run))
            except BaseException:
                self.close_failed()
                raise

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is not None:
            self.close_failed()

    def log(self, step: int, values: dict) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        for t in self.trackers:
            t.log(step, values)

    def finish(self, step: int, summary: dict) -> None:
        summary = {k: v for k, v in summary.items() if v is not None}
        while self.trackers:
            self.trackers.pop(0).finish(step, summary)

    def close_failed(self) -> None:
        while self.trackers:
            with contextlib.suppress(Exception):  # the run's own error is the one to report
                self.trackers.pop().abort()


def run_summary(metrics: dict) -> dict:
    """The end-of-run numbers a tracker gets, from metrics.json's."""
    t, mem, e = metrics["train"], metrics["memory"], metrics.get("eval") or {}
    summary = {
        "summary/peak_mib": mem["peak_mib"],
        "summary/tensor_peak_mib": mem["tracked_peak_mib"],
        **{
            f"summary/{part}_mib": mem[f"{part}_mib"]
            for part in ("parameters", "gradients", "optimizer_state", "activations")
        },
        "summary/tokens_per_s": t["tokens_per_s"],
        "summary/runtime_s": t["runtime_s"],
        "summary/avg_loss": t["avg_loss"],
        "summary/final_loss": t["final_loss"],
        "summary/eval_loss": e.get("loss_after"),
    }
    for when in ("before", "after"):
        if f"accuracy_{when}" in e:
            summary[f"summary/accuracy_{when}"] = e[f"accuracy_{when}"]["accuracy"]
    return summary

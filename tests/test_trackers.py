"""Experiment trackers: what a run writes, read back with each tracker's own reader and compared
with metrics.json."""

import json
import os
import struct
import subprocess
import sys

import pytest

from solotune.cli import main
from solotune.run.trackers import flatten

for library in ("tensorboard", "mlflow", "wandb", "trackio"):
    pytest.importorskip(library, reason=f"{library} is not installed (the trackers extra)")

STEP_TAGS = ("train/loss", "train/lr", "train/grad_norm")
METRICS_KEYS = {"train/loss": "loss_curve", "train/lr": "lr", "train/grad_norm": "grad_norms"}


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    """One run reporting to all four trackers, each writing into this test's folder. A process
    of its own: trackio fixes its store's folder when it is imported."""
    root = tmp_path_factory.mktemp("tracked")
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "TRACKIO_DIR": str(root / "trackio"),
        "WANDB_MODE": "offline",
    }
    out = root / "run"
    args = ["train", "--model", str(tiny_model_dir), "--samples", "20", "--batch", "4", "--max-len", "400",
            "--mp", "off", "--eval.split", "0.2", "--eval.every", "2", "--no-generate.enabled",
            "--report-to", "tensorboard,mlflow,wandb,trackio", "--output-dir", str(out)]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "solotune.cli", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "INFO" not in done.stderr and "wandb:" not in done.stderr
    assert "Trackio" not in done.stdout  # its own banners are kept off the run's output
    return root, out, json.loads((out / "metrics.json").read_text()), done.stdout


def expected_curves(m: dict) -> dict:
    """Each logged name: its (step, value) pairs as metrics.json has them."""
    curves = {tag: list(enumerate(m["train"][key], start=1)) for tag, key in METRICS_KEYS.items()}
    curves["eval/loss"] = [tuple(point) for point in m["eval"]["loss_curve"]]
    return curves


def test_tensorboard_holds_the_runs_numbers(tracked_run):
    """Every step's loss, learning rate and gradient norm, the eval curve and the end-of-run
    summary, read back with TensorBoard's event reader; the switches are its hyperparameters
    (the HParams view compares an ablation's cells)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, out, m, _ = tracked_run
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    for tag, curve in expected_curves(m).items():  # stored as float32
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(tag)] == curve
    n = m["train"]["steps"]
    assert [(e.step, e.value) for e in events.Scalars("summary/peak_mib")] == [
        (n, pytest.approx(m["memory"]["peak_mib"]))
    ]
    assert events.Scalars("summary/accuracy_after")[0].value == pytest.approx(m["eval"]["accuracy_after"]["accuracy"])
    assert any(tag.startswith("config") for tag in events.Tags()["tensors"])
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["mp"].string_value == "off" and hparams["lora"].string_value == "True"
    assert hparams["batch"].number_value == 4


def test_mlflow_holds_the_runs_numbers(tracked_run):
    """Read with MlflowClient: each step's metrics, the summary, the whole config as params and
    the switches and versions as tags; the run is finished."""
    from mlflow.tracking import MlflowClient

    root, out, m, stdout = tracked_run
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("solotune").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    for tag, curve in expected_curves(m).items():
        assert [(p.step, p.value) for p in client.get_metric_history(run.info.run_id, tag)] == curve
    assert run.data.metrics["summary/peak_mib"] == m["memory"]["peak_mib"]
    assert run.data.metrics["summary/tokens_per_s"] == m["train"]["tokens_per_s"]
    assert run.data.params == {k: str(v) for k, v in flatten(m["config"]).items()}
    assert run.data.tags["solotune.lora"] == "True" and run.data.tags["version.torch"] == m["versions"]["torch"]
    assert "solotune.grid" not in run.data.tags  # not a grid's cell
    assert f"mlflow: run run in experiment solotune at sqlite:///{root / 'mlflow.db'}" in stdout


def wandb_records(path):
    """The protobuf records of a W&B run file (`run-<id>.wandb`): LevelDB's log format, 32 KiB
    blocks of chunks, each with a 7-byte header (checksum, length, kind: 1 whole, 2-4 pieces),
    after a 7-byte file header. The records are W&B's own `Record` messages."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the rest of a block is padding
            pos += left
            continue
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def wandb_run(folder) -> tuple:
    """The run record, its history rows by step and its summary, from an offline run's file."""
    [path] = (folder / "wandb").glob("offline-run-*/run-*.wandb")
    run, history, summary = None, {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            history[record.history.step.num] = items(record.history.item)
        elif kind == "summary":
            summary.update(items(record.summary.update))
    return run, history, summary


def items(entries) -> dict:
    """A W&B record's name -> value entries (a name with a slash may come as its parts)."""
    return {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}


def test_wandb_offline_holds_the_runs_numbers(tracked_run):
    """The offline run's file, read with W&B's own record schema: each step's row, the summary,
    the config with the versions, the switches as tags."""
    _, out, m, stdout = tracked_run
    run, history, summary = wandb_run(out)
    assert run.display_name == "run" and "lora=True" in run.tags and "mp=off" in run.tags
    config = items(run.config.update)
    assert config["train"] == m["config"]["train"] and config["versions"]["torch"] == m["versions"]["torch"]
    for tag, curve in expected_curves(m).items():
        assert [(step, row[tag]) for step, row in sorted(history.items()) if tag in row] == curve
    assert summary["summary/peak_mib"] == m["memory"]["peak_mib"]
    assert summary["summary/accuracy_after"] == m["eval"]["accuracy_after"]["accuracy"]
    assert "wandb: offline run in" in stdout and "wandb sync" in stdout


def test_trackio_holds_the_runs_numbers(tracked_run):
    """Read with trackio's own storage reader, in a process of its own (its store's folder is
    fixed when it is imported)."""
    root, out, m, _ = tracked_run
    reader = (
        "import json, trackio; s = trackio.SQLiteStorage; "
        "print(json.dumps([s.get_logs('solotune', 'run'), s.get_run_config('solotune', 'run')]))"
    )
    env = {**os.environ, "TRACKIO_DIR": str(root / "trackio")}
    done = subprocess.run([sys.executable, "-c", reader], env=env, capture_output=True, text=True, check=True)
    logs, config = json.loads(done.stdout.strip().splitlines()[-1])
    for tag, curve in expected_curves(m).items():
        assert [(row["step"], row[tag]) for row in logs if tag in row] == curve
    assert [row["summary/peak_mib"] for row in logs if "summary/peak_mib" in row] == [m["memory"]["peak_mib"]]
    assert config["lora"] == m["config"]["lora"] and config["versions"]["peft"] == m["versions"]["peft"]


def test_an_ablation_grid_is_one_run_per_cell_grouped_by_the_grid(tiny_model_dir, tmp_path, monkeypatch):
    """MLflow's compare view and W&B's group: each cell a run named after it, with its switches."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the cells' processes inherit it
    grid = tmp_path / "grid"
    args = ["ablate", "--axes", "lora", "--model", str(tiny_model_dir), "--samples", "8", "--batch", "4",
            "--max-steps", "1", "--mp", "off", "--no-generate.enabled", "--report-to", "mlflow,wandb",
            "--output-dir", str(grid)]  # fmt: skip
    assert main(args) == 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("solotune").experiment_id])
    cells = {r.info.run_name: r.data for r in runs}
    assert set(cells) == {"lora-on", "lora-off"}
    assert {d.tags["solotune.grid"] for d in cells.values()} == {"grid"}
    assert cells["lora-on"].tags["solotune.lora"] == "True" and cells["lora-off"].params["lora.enabled"] == "False"
    for cell in ("lora-on", "lora-off"):
        run, _, summary = wandb_run(grid / "cells" / cell)
        assert run.run_group == "grid" and run.display_name == cell
        metrics = json.loads((grid / "cells" / cell / "metrics.json").read_text())
        assert summary["summary/peak_mib"] == cells[cell].metrics["summary/peak_mib"] == metrics["memory"]["peak_mib"]


def test_trackers_that_cannot_be_used_are_refused_in_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    base = ["train", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o")]
    assert main([*base, "--report-to", "comet"]) == 2
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert main([*base, "--report-to", "tensorboard"]) == 2
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main([*base, "--report-to", "wandb"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3
    assert "unknown tracker" in errors[0] and "tensorboard, mlflow, wandb, trackio" in errors[0]
    assert "the tensorboard package is not installed" in errors[1] and "solotune[tensorboard]" in errors[1]
    assert "the wandb package is not installed" in errors[2] and "solotune[wandb]" in errors[2]
    assert not (tmp_path / "o").exists()


def test_a_failed_run_is_closed_as_failed(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A run that stops on an error is FAILED in MLflow, not left RUNNING."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = ["train", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.jsonl"),
            "--report-to", "mlflow", "--output-dir", str(tmp_path / "o")]  # fmt: skip
    assert main(args) == 2
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("solotune").experiment_id])
    assert run.info.status == "FAILED"
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

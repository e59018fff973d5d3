"""Checkpoints and resumption: a run killed with SIGKILL and resumed ends bitwise where an
uninterrupted run ends; SIGTERM saves and says how to resume; bad checkpoints are refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from solotune.testing import save_model_folder
from solotune.training.checkpoint import latest

STEPS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Big enough that a step takes tens of milliseconds, so a kill lands mid-run."""
    return save_model_folder(tmp_path_factory.mktemp("resume-model"), hidden_size=256, num_hidden_layers=4)


def train_cmd(model_dir, out, *extra):
    return [
        sys.executable,
        "-m",
        "solotune.cli",
        "train",
        "--model",
        str(model_dir),
        "--samples",
        str(4 * STEPS),
        "--batch",
        "4",
        "--mp",
        "off",
        "--lora.dropout",
        "0.1",
        "--no-generate.enabled",
        "--output-dir",
        str(out),
        *extra,
    ]


def run(cmd, check=True):
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def start_and_stop_at(cmd, out: Path, step: int, sig: int) -> tuple[int, str]:
    """Start a run, send `sig` as soon as the checkpoint of `step` exists; (exit status, stderr)."""
    log = out.parent / f"{out.name}.stderr"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / f"step-{step:06d}").exists():
            assert proc.poll() is None, f"the run ended before its step-{step} checkpoint: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
            time.sleep(0.005)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    return proc.returncode, log.read_text()


def finished(out: Path):
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics["train"]["loss_curve"], load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    run(train_cmd(model_dir, out))
    return finished(out)


def test_sigkill_then_resume_ends_bitwise_where_an_uninterrupted_run_ends(model_dir, reference, tmp_path):
    out = tmp_path / "run"
    status, _ = start_and_stop_at(train_cmd(model_dir, out, "--train.save-every", "2"), out, 4, signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    step = latest(out).step
    assert 4 <= step < STEPS  # killed mid-run, after at least the step-4 checkpoint
    resumed = run(train_cmd(model_dir, out, "--resume", str(out)))
    assert f"resumed from {out / 'checkpoints'}" in resumed.stdout
    losses, weights = finished(out)
    ref_losses, ref_weights = reference
    assert losses == ref_losses  # the whole curve, the part before the kill included
    assert weights.keys() == ref_weights.keys()
    for name, w in weights.items():
        assert torch.equal(w, ref_weights[name]), name
    # Our artifacts are safetensors, JSON and YAML (and the tokenizer's own files): nothing pickled.
    kinds = {f.suffix for f in out.rglob("*") if f.is_file()}
    assert kinds <= {".safetensors", ".json", ".yaml", ".jinja", ".txt", ".model", ".md"}, kinds


def test_sigterm_saves_a_checkpoint_and_names_the_resume_command(model_dir, reference, tmp_path):
    out = tmp_path / "run"
    status, stderr = start_and_stop_at(train_cmd(model_dir, out, "--train.save-every", "3"), out, 3, signal.SIGTERM)
    assert status == 130
    message = stderr.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in message and f"solotune train --resume {out}" in message
    assert "Traceback" not in stderr
    assert latest(out).step >= 3
    run(train_cmd(model_dir, out, "--resume", str(out)))
    assert finished(out)[0] == reference[0]


def test_a_half_written_checkpoint_is_ignored(model_dir, tmp_path):
    """What a kill during a checkpoint write leaves (a temporary folder) never counts as a checkpoint."""
    out = tmp_path / "run"
    start_and_stop_at(train_cmd(model_dir, out, "--train.save-every", "2"), out, 2, signal.SIGKILL)
    good = latest(out)
    partial = out / "checkpoints" / f".tmp-step-{good.step + 2:06d}"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"\0" * 100)
    assert latest(out).path == good.path
    run(train_cmd(model_dir, out, "--resume", str(out)))
    assert (out / "metrics.json").exists()


def test_resuming_with_another_config_or_data_is_refused(model_dir, tmp_path):
    out = tmp_path / "run"
    start_and_stop_at(train_cmd(model_dir, out, "--train.save-every", "2"), out, 2, signal.SIGKILL)
    refused = run(train_cmd(model_dir, out, "--resume", str(out), "--lr", "1e-3"), check=False)
    assert refused.returncode == 2
    assert "different run" in refused.stderr and "train.lr: 0.0002 there, 0.001 now" in refused.stderr
    refused = run(train_cmd(model_dir, out, "--resume", str(out), "--samples", "40"), check=False)
    assert refused.returncode == 2 and "the training data" in refused.stderr
    assert "Traceback" not in refused.stderr
    missing = run(train_cmd(model_dir, tmp_path / "nothing", "--resume", str(tmp_path / "nothing")), check=False)
    assert missing.returncode == 2 and "no complete checkpoint" in missing.stderr


def test_a_full_disk_while_a_checkpoint_is_written_stops_in_one_line(tokenizer, tmp_path, monkeypatch):
    """Measured before: safetensors' traceback ("No space left on device (os error 28)") and a
    half-written .tmp-step folder. Now one line naming the space needed and free and the
    checkpoint to resume from, which stays intact, and nothing of the failed one is kept."""
    import safetensors.torch

    from solotune.config import LoraConfig, TrainConfig
    from solotune.errors import SolotuneError
    from solotune.model.adapters import apply_lora
    from solotune.testing import make_model
    from solotune.training import checkpoint
    from solotune.training.optim import make_optimizer

    model = apply_lora(make_model(tokenizer), LoraConfig(r=4))
    optimizer, scheduler = make_optimizer(model, TrainConfig(), total_steps=4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    first = checkpoint.save(tmp_path, checkpoint.Payload(1, model, optimizer, scheduler, scaler, {}), {}, keep=2)

    def fill_the_disk(tensors, path):
        path.write_bytes(b"\0" * 100)  # part of a file, as a full disk leaves it
        raise safetensors.SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(checkpoint, "save_file", fill_the_disk)
    with pytest.raises(SolotuneError) as stopped:
        checkpoint.save(tmp_path, checkpoint.Payload(2, model, optimizer, scheduler, scaler, {}), {}, keep=2)
    message = str(stopped.value)
    assert message.startswith("checkpoint of step 2: the disk is full (") and "\n" not in message
    assert "MiB to write" in message and "MiB free under" in message
    assert f"the last complete checkpoint, {first}, is intact" in message and f"--resume {tmp_path}" in message
    assert not list((tmp_path / checkpoint.CHECKPOINTS_DIR).glob(".tmp-step-*"))
    assert latest(tmp_path).path == first and load_file(first / "trainable.safetensors")


def test_dpo_resumes_with_the_reference_log_probs_of_its_start(model_dir, tmp_path):
    """--pref.precompute-ref, killed after step 1 and resumed: the resumed run reads the reference
    log-probs its first part computed before step 1 (computed again from the half-trained adapter,
    they would differ, and so would every later loss), and finishes."""
    dpo = ("--method", "dpo", "--pref.precompute-ref", "--train.save-every", "1", "--lr", "1e-2", "--samples", "20")
    out = tmp_path / "killed"
    code, _ = start_and_stop_at(train_cmd(model_dir, out, *dpo), out, 1, signal.SIGKILL)
    assert code == -signal.SIGKILL
    computed = (out / "reference-logps.json").read_text()
    resumed = run(train_cmd(model_dir, out, *dpo, "--resume", str(out)))
    assert "reference: log-probs of 20 pairs read from reference-logps.json" in resumed.stdout
    assert (out / "reference-logps.json").read_text() == computed
    assert len(finished(out)[0]) == 5

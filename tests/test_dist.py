"""Data parallel through torchrun on the CPU (gloo): two processes train exactly as one does."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from solotune.cli import main


@pytest.fixture
def data_file(tmp_path):
    f = tmp_path / "data.jsonl"
    rows = [{"prompt": f"{i} plus {i} is" + " x" * (i % 5), "response": f" {2 * i}" + "." * (i % 3)} for i in range(16)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def run_args(model_dir, data_file, out, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data_file), "--output-dir", str(out), "--batch", "4",
            "--max-steps", "3", "--mp", "off", "--lora.dropout", "0", "--no-generate.enabled", *extra]  # fmt: skip


def test_two_processes_train_exactly_as_one_with_accumulation(tiny_model_dir, data_file, tmp_path):
    """`--nproc 2` (torchrun, gloo) against one process with `--grad-accum 2`, LoRA dropout on: the
    same micro-batches and the same dropout masks (keyed to the records, not to the process), so
    the same per-step losses and the same adapter, to 1e-5 (fp32)."""
    dropout = ["--lora.dropout", "0.1"]
    assert main(run_args(tiny_model_dir, data_file, tmp_path / "one", "--grad-accum", "2", *dropout)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "solotune.cli",
            *run_args(tiny_model_dir, data_file, tmp_path / "two", "--nproc", "2", *dropout),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["train"]["loss_curve"] == pytest.approx(one["train"]["loss_curve"], rel=1e-5)
    assert two["train"]["tokens"] == one["train"]["tokens"]  # the job's, summed over the ranks
    assert len(two["memory"]["per_rank_peak_mib"]) == 2
    weights = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, rtol=1e-5, atol=1e-7, msg=name)
    assert proc.stdout.count("trainable params:") == 2  # rank 0 alone speaks: the start line and the summary


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dist", "fsdp"], "FSDP2 shards full fine-tuning"),
        (["--grad-accum", "4"], "times --grad-accum (4) must divide the batch (4)"),
    ],
)
def test_what_two_processes_cannot_do_is_refused_in_one_line(
    tiny_model_dir, data_file, tmp_path, capsys, extra, message
):
    assert main(run_args(tiny_model_dir, data_file, tmp_path / "o", "--nproc", "2", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_killed_rank_stops_the_job_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    """Two processes, LoRA dropout on (each rank draws its own masks), a checkpoint every 2 steps.
    One rank is killed with SIGKILL after the step-4 checkpoint: the job stops without a finished
    run; `--resume` then ends bitwise where an uninterrupted two-process run ends."""
    from solotune.testing import save_model_folder

    model = save_model_folder(tmp_path / "m", hidden_size=256, num_hidden_layers=4)  # tens of ms a step

    def cmd(out, *extra):
        return [sys.executable, "-m", "solotune.cli", "train", "--model", str(model), "--samples", "48", "--batch",
                "4", "--mp", "off", "--lora.dropout", "0.1", "--no-generate.enabled", "--train.save-every", "2",
                "--nproc", "2", "--output-dir", str(out), *extra]  # fmt: skip

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    reference = subprocess.run(cmd(tmp_path / "ref"), capture_output=True, text=True, env=env, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "run"
    job = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "step-000004").exists():
        assert job.poll() is None and time.monotonic() < deadline, "no step-4 checkpoint"
        time.sleep(0.005)
    # solotune -> torchrun -> the two ranks
    (torchrun,) = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    ranks = subprocess.run(["pgrep", "-P", torchrun], capture_output=True, text=True).stdout.split()
    os.kill(int(ranks[-1]), signal.SIGKILL)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0 and not (out / "metrics.json").exists()
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if not line.startswith("train:")]
    assert "Traceback" not in "\n".join(errors)  # neither a rank's nor torchrun's
    assert any(line.startswith("solotune: error: the job stopped: rank") and "SIGKILL" in line for line in errors)

    resumed = subprocess.run(
        [sys.executable, "-m", "solotune.cli", "train", "--resume", str(out)], capture_output=True, text=True, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    curves = [json.loads((run / "metrics.json").read_text())["train"]["loss_curve"] for run in (tmp_path / "ref", out)]
    assert curves[0] == curves[1]
    ref, mine = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (tmp_path / "ref", out))
    assert all(torch.equal(ref[k], mine[k]) for k in ref)


# ---------------------------------------------------------------------------------------------
# FSDP2: full fine-tuning, each rank holding half of the training state


FSDP_ARGS = ["--no-lora", "--samples", "13", "--batch", "4", "--mp", "off", "--generate.max-new-tokens", "6",
             "--generate.prompts", "2 plus 2 is", "--train.save-every", "2", "--train.track-memory", "always"]  # fmt: skip


def fsdp_cmd(model_dir, data_file, out, *extra):
    return [sys.executable, "-m", "solotune.cli", "train", "--model", str(model_dir), "--data", str(data_file),
            "--output-dir", str(out), *FSDP_ARGS, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """One process with --grad-accum 2 and two FSDP2 processes, on the same data and model.

    13 records in steps of 4: the last step has one record, so one rank has no share of it
    and must still join every gather and reduce-scatter. Generation runs before and after
    training: on every rank, in step, as FSDP2 needs.
    """
    from solotune.testing import save_model_folder

    root = tmp_path_factory.mktemp("fsdp")
    model = save_model_folder(root / "m", hidden_size=128, num_hidden_layers=4)
    data = root / "data.jsonl"
    rows = [{"prompt": f"{i} plus {i} is" + " x" * (i % 5), "response": f" {2 * i}" + "." * (i % 3)} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    runs = {
        "one": fsdp_cmd(model, data, root / "one", "--grad-accum", "2"),
        "two": fsdp_cmd(model, data, root / "two", "--nproc", "2"),
    }
    procs = {
        name: subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300) for name, cmd in runs.items()
    }
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    return root, procs, env


def test_fsdp_full_finetune_trains_exactly_as_one_process(fsdp_runs):
    """Two FSDP2 processes against one process with --grad-accum 2 (fp32): the same per-step
    losses and saved model to 1e-5, the same generations after training."""
    root, procs, _ = fsdp_runs
    assert "dist: fsdp over 2 processes" in procs["two"].stdout
    one, two = (json.loads((root / r / "metrics.json").read_text()) for r in ("one", "two"))
    assert len(two["train"]["loss_curve"]) == 4
    assert two["train"]["loss_curve"] == pytest.approx(one["train"]["loss_curve"], rel=1e-5)
    assert two["train"]["tokens"] == one["train"]["tokens"]
    assert [g["text"] for g in two["generations"]["after"]] == [g["text"] for g in one["generations"]["after"]]
    weights = [load_file(root / r / "model" / "model.safetensors") for r in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, rtol=1e-5, atol=1e-5, msg=name)
    config = json.loads((root / "two" / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # loadable as one process saved it


def test_fsdp_ranks_each_hold_half_the_training_state(fsdp_runs):
    """Parameters, gradients and optimizer state after an update, measured by the tensor tracker
    on rank 0: half the single process's, each within 10%."""
    root, _, _ = fsdp_runs
    one, two = (
        json.loads((root / r / "metrics.json").read_text())["memory"]["state_after_update"] for r in ("one", "two")
    )
    for part in ("parameters_mib", "gradients_mib", "optimizer_state_mib"):
        assert one[part] > 0
        assert two[part] == pytest.approx(one[part] / 2, rel=0.10), part


def test_fsdp_resume_ends_bitwise_where_the_uninterrupted_run_ends(fsdp_runs, tmp_path):
    """A copy of the two-process run, cut back to its step-2 checkpoint, resumed: the same losses
    and the very same model, bit for bit (each rank restores its shard from the whole tensors)."""
    import shutil

    root, _, env = fsdp_runs
    cut = tmp_path / "cut"
    shutil.copytree(root / "two", cut)
    for finished in ("metrics.json", "model", "checkpoints/step-000004"):
        shutil.rmtree(cut / finished) if (cut / finished).is_dir() else (cut / finished).unlink()
    resumed = subprocess.run(
        [sys.executable, "-m", "solotune.cli", "train", "--resume", str(cut)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step 2 of 4" in resumed.stdout
    curves = [json.loads((run / "metrics.json").read_text())["train"]["loss_curve"] for run in (root / "two", cut)]
    assert curves[0] == curves[1]
    ref, mine = (load_file(run / "model" / "model.safetensors") for run in (root / "two", cut))
    assert all(torch.equal(ref[k], mine[k]) for k in ref)


def test_the_launcher_passes_the_ranks_output_and_keeps_torchruns_report_apart():
    """What torchrun writes on a failed job (log lines, its traceback, its table) is returned, not
    shown; the ranks' lines and progress redraws pass, each error line once."""
    import io

    from solotune.parallel.launch import first_failure, relay

    stream = (
        b"train:  50%|#####     | 1/2\rtrain: 100%|##########| 2/2\n"
        b"solotune: error: rank 0: another rank of the job is gone (Connection closed by peer)\n"
        b"solotune: error: rank 0: another rank of the job is gone (Connection closed by peer)\n"
        b"W1202 04:45:27.375000 12055 api.py:1028] Sending process 12060 closing signal SIGTERM\n"
        b'Traceback (most recent call last):\n  File "run.py", line 1\n'
        b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        b"Root Cause (first observed failure):\n[0]:\n  time      : 2026-12-02_04:45:07\n"
        b"  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 11983)\n"
    )
    read, write = os.pipe()
    os.write(write, stream)
    os.close(write)
    shown = io.BytesIO()
    report = relay(read, shown)
    os.close(read)
    assert shown.getvalue() == (
        b"train:  50%|#####     | 1/2\rtrain: 100%|##########| 2/2\n"
        b"solotune: error: rank 0: another rank of the job is gone (Connection closed by peer)\n"
    )
    assert report.startswith(b"W1202") and b"ChildFailedError" in report
    assert first_failure(report) == "rank 1 was killed by SIGKILL"
    assert first_failure(report.replace(b"-9 (pid", b"2 (pid")) == "rank 1 exited with status 2"


def test_more_processes_than_gpus_is_refused_before_any_starts(monkeypatch):
    from solotune.errors import SolotuneError
    from solotune.parallel.launch import check_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SolotuneError, match=r"--nproc 2 but this machine has 1 GPUs visible"):
        check_devices(2, "auto")
    check_devices(1, "auto")
    check_devices(2, "cpu")  # processes on the CPU need no GPU each

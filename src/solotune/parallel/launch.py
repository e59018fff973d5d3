"""Starting a job of N local processes through torchrun, and saying in one line how it ended.

`solotune train --nproc N` runs `torchrun --standalone --nproc-per-node N -m solotune.cli ...`
as a child and relays the ranks' output as it comes: rank 0's lines and progress bar (the other
ranks print nothing, dist.py), and each `solotune: error:` line once, however many ranks print
it. torchrun's own report of a failed job (its log lines, its traceback, its table of failures)
is kept out of the terminal: it goes to a file, and one line names the rank that failed first
and how (`rank 1 was killed by SIGKILL`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile

from solotune.errors import SolotuneError

# torchrun's logger ("W1202 04:45:27.375000 12055 .../api.py:1028] Sending process ...")
TORCHRUN_LOG_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ")
TORCHRUN_TRACEBACK = b"Traceback (most recent call last):"  # the ranks' own are prefixed "[rankN]:"
ERROR_PREFIX = b"solotune: error:"


def check_devices(nproc: int, device: str) -> None:
    """Refuse, before any process starts, more local ranks than GPUs (on a CUDA machine)."""
    import torch

    if device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise SolotuneError(
            f"--nproc {nproc} but this machine has {torch.cuda.device_count()} GPUs visible: one process a GPU "
            "(CUDA_VISIBLE_DEVICES selects them); or --device cpu"
        )


def launch(nproc: int, argv: list[str]) -> int:
    """Run `solotune <argv>` on `nproc` local ranks under torchrun; returns the job's exit status."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    # torchrun's own parser takes `--nproc` for an abbreviation of its `--nproc-per-node`, even
    # among the script's arguments: the ranks get the option under its other name.
    argv = [a.replace("--nproc", "--processes", 1) if a.split("=")[0] == "--nproc" else a for a in argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # the cores, shared
    sys.stdout.flush()
    job = subprocess.Popen([*torchrun, "-m", "solotune.cli", *argv], stderr=subprocess.PIPE, env=env)
    try:
        report = relay(job.stderr.fileno(), sys.stderr.buffer)
    except KeyboardInterrupt:  # torchrun got the same Ctrl-C and stops the ranks
        report = b""
    status = job.wait()
    if status != 0 and report:
        with tempfile.NamedTemporaryFile("wb", prefix="solotune-torchrun-", suffix=".log", delete=False) as f:
            f.write(report)
        print(
            f"solotune: error: the job stopped: {first_failure(report)} (torchrun's report: {f.name})", file=sys.stderr
        )
    return status


def relay(fd: int, out) -> bytes:
    """Copy what arrives on `fd` to `out` until it closes, less torchrun's report (returned).

    Chunks are passed on as soon as they end a line or a progress-bar redraw (`\\r`), so the bar
    moves as it would in one process.
    """
    pending, report, errors_seen = b"", [], set()
    in_report = False
    while chunk := os.read(fd, 65536):
        pending += chunk
        cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
        ready, pending = pending[:cut], pending[cut:]
        for piece in re.split(rb"(?<=[\n\r])", ready):
            if not piece:
                continue
            in_report = in_report or piece.startswith(TORCHRUN_TRACEBACK)
            if in_report or TORCHRUN_LOG_LINE.match(piece):
                report.append(piece)
            elif piece.startswith(ERROR_PREFIX):
                if piece not in errors_seen:
                    errors_seen.add(piece)
                    out.write(piece)
            else:
                out.write(piece)
        out.flush()
    out.write(pending)
    out.flush()
    return b"".join(report)


def first_failure(report: bytes) -> str:
    """'rank R exited with status S' or 'rank R was killed by SIGNAL', from torchrun's table."""
    text = report.decode(errors="replace")
    root = text.split("Root Cause", 1)[-1]
    rank = re.search(r"rank\s*:\s*(\d+)", root)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    if not (rank and code):
        return "a rank failed"
    status = int(code[1])
    if status < 0:
        try:
            return f"rank {rank[1]} was killed by {signal.Signals(-status).name}"
        except ValueError:
            pass
    return f"rank {rank[1]} exited with status {status}"

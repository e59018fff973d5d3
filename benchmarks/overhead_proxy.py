"""A CPU proxy for the overhead-bound regime of a small model on a big GPU.

A tiny, deep model (16 layers x hidden 64, random weights, byte-level tokens) and micro-batches
of 8 records of about 64 tokens (prompt/response records made here, no template): a step of
tens of milliseconds, where dispatch and Python, not arithmetic, decide the speed, as they do
for a 1B model on an H200. On it, `vs_trl.py --focus
overhead` measures solotune with the memory breakdown on the peak steps (the default), on no
step and on every step, and the peer (TRL SFTTrainer + PEFT) at micro-batches 8/4/2/1, each run
its own process (setsid), alternating, medians over the repeats. Needs the bench extra (TRL).

    setsid .venv/bin/python benchmarks/overhead_proxy.py --out benchmarks/results/overhead_proxy-<machine>-<date>.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from solotune.testing import save_model_folder

SHAPE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=4)


def short_records(n: int) -> list[dict]:
    """Prompt/response records of 46 to 66 byte-level tokens (the EOS included), lengths varied."""
    words = "one two three four five six seven eight nine ten".split()
    return [
        {
            "prompt": f"Q{i}: " + " ".join(words[(i + j) % 10] for j in range(3)),
            "response": " " + " ".join(words[(2 * i + j) % 10] for j in range(6 + i % 4)),
        }
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=512, help="N records: N / 8 steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-micro", default="8,4,2,1", help="the peer's micro-batch sizes (8: its fastest only)")
    parser.add_argument("--out", help="also write the table here (markdown)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = save_model_folder(Path(tmp) / "deep-tiny", **SHAPE)
        data = Path(tmp) / "records.json"
        data.write_text(json.dumps(short_records(args.records)))
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("vs_trl.py")),
            "--focus",
            "overhead",
            "--model",
            str(model),
            "--data",
            str(data),
            "--records",
            str(args.records),
            "--max-len",
            "64",
            "--precisions",
            "fp32",
            "--repeats",
            str(args.repeats),
            "--peer-micro",
            args.peer_micro,
        ] + (["--out", args.out] if args.out else [])
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()

"""The CPU allocator: which one a run asks for, gets, and reports."""

import json
import subprocess
import sys

import pytest

from solotune.cli import main
from solotune.errors import SolotuneError
from solotune.measure import allocator
from solotune.measure.allocator import choose

INSTALLED = {name: allocator.find_library(name) for name in allocator.LIBRARIES}


def finder(*installed):
    return lambda name: f"/usr/lib/lib{name}.so" if name in installed else None


def test_auto_prefers_tcmalloc_then_jemalloc_then_glibc():
    assert choose("auto", finder("jemalloc", "tcmalloc")) == ("tcmalloc", "/usr/lib/libtcmalloc.so")
    assert choose("auto", finder("jemalloc")) == ("jemalloc", "/usr/lib/libjemalloc.so")
    assert choose("auto", finder()) == ("glibc", None)
    assert choose("glibc", finder("jemalloc")) == ("glibc", None)
    assert choose("jemalloc", finder("jemalloc", "tcmalloc")) == ("jemalloc", "/usr/lib/libjemalloc.so")


def test_a_named_allocator_that_is_missing_is_an_error_not_a_fallback():
    with pytest.raises(
        SolotuneError, match=r"--cpu-allocator jemalloc: libjemalloc is not installed .*apt install libjemalloc2"
    ):
        choose("jemalloc", finder("tcmalloc"))


def test_the_command_reports_a_missing_allocator_in_one_line(monkeypatch, tmp_path, capsys):
    """The `solotune` command itself (argv from the command line) stops before any work."""
    monkeypatch.setattr(allocator, "find_library", finder())
    monkeypatch.delenv(allocator.REEXEC_MARK, raising=False)
    monkeypatch.setattr(
        sys, "argv", ["solotune", "train", "--cpu-allocator", "tcmalloc", "--output-dir", str(tmp_path / "o")]
    )
    assert main() == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("solotune: error: --cpu-allocator tcmalloc: libtcmalloc_minimal is not installed")
        and "\n" not in err
    )
    assert not (tmp_path / "o").exists()


def train(tiny_model_dir, tmp_path, requested):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "response": f" {i + 1}"}) + "\n" for i in range(4)))
    out = tmp_path / requested
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "solotune.cli",
            "train",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--batch",
            "4",
            "--mp",
            "off",
            "--no-generate.enabled",
            "--cpu-allocator",
            requested,
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("cpu allocator:"))
    return header, json.loads((out / "metrics.json").read_text())["machine"]["cpu_allocator"]


def test_glibc_runs_glibc_and_auto_runs_what_is_installed(tiny_model_dir, tmp_path):
    """What the run reports is read from the process's own memory map."""
    header, running = train(tiny_model_dir, tmp_path, "glibc")
    assert (header, running) == ("cpu allocator: glibc (--cpu-allocator glibc)", "glibc")
    header, running = train(tiny_model_dir, tmp_path, "auto")
    assert running == choose("auto")[0]
    assert header == (
        f"cpu allocator: {running} (auto: installed here)"
        if running != "glibc"
        else "cpu allocator: glibc (auto: neither tcmalloc nor jemalloc is installed; "
        "`apt install libtcmalloc-minimal4` lowers the CPU peak)"
    )


@pytest.mark.parametrize(
    "name",
    [n for n, lib in INSTALLED.items() if lib]
    or [pytest.param("jemalloc", marks=pytest.mark.skip(reason="neither tcmalloc nor jemalloc is installed"))],
)
def test_a_named_allocator_is_loaded_into_the_run(tiny_model_dir, tmp_path, name):
    """The command re-executes itself with the library preloaded (where the system has it)."""
    header, running = train(tiny_model_dir, tmp_path, name)
    assert (header, running) == (f"cpu allocator: {name} (--cpu-allocator {name})", name)

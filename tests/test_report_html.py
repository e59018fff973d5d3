"""The HTML report in a real browser: headless Chromium (Debian's `chromium` package).

Not in the default suite (it needs Chromium); run it with `make test-report`. The screenshot
stays in pytest's temporary folder (`--basetemp DIR` to choose it) for a person to look at.
"""

import json
import shutil
import subprocess

import pytest

from solotune.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)"),
]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
]


def chromium(tmp_path, *args):
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_report_renders_with_its_plots_and_no_console_errors(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i} plus one is", "response": f" {i + 1}"}) + "\n" for i in range(8))
    )
    grid = tmp_path / "grid"
    assert (
        main(
            [
                "ablate",
                "--axes",
                "lora,gc",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data),
                "--output-dir",
                str(grid),
                "--max-steps",
                "2",
                "--batch",
                "4",
                "--mp",
                "off",
                "--generate.max-new-tokens",
                "4",
                "--eval.split",
                "0.25",
                "--eval.metric",
                "contains",
            ]
        )
        == 0
    )
    url = (grid / "report.html").resolve().as_uri()

    dom = chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0
    assert dom.stdout.count("<img") == 3 and "Table 2" in dom.stdout and "Generations" in dom.stdout
    assert "Held-out evaluation" in dom.stdout and "accuracy (contains) before → after" in dom.stdout
    console_errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and "rror" in line]
    assert not console_errors, console_errors

    shot = tmp_path / "report.png"  # the loss plot holds the eval curves beside the training curves
    result = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", url)
    assert result.returncode == 0 and shot.is_file()
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    colours = len(set(image.resize((300, 600)).getdata()))
    assert colours > 50, "the screenshot looks blank: the plots did not render"


def test_a_grid_in_the_middle_shows_a_partial_table_and_its_running_cell(tiny_model_dir, tmp_path):
    """The live page in Chromium: a 2-cell grid, its second cell set back to running (its result
    removed, the live report told it runs, at step 1 of 2): the page shows the done cell's
    numbers, the running cell's loss, the partial Table 2, and reloads itself; no console errors."""
    from solotune.experiment.report import LiveReport

    grid = tmp_path / "grid"
    argv = ["ablate", "--axes", "lora", "--model", str(tiny_model_dir), "--output-dir", str(grid), "--samples", "8"]
    assert main(argv + ["--max-steps", "2", "--batch", "4", "--mp", "off", "--no-generate.enabled"]) == 0
    results = json.loads((grid / "results.json").read_text())
    running = sorted(results)[-1]
    (grid / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != running}))
    live = LiveReport(grid, cells_to_run=2)
    live.cell_seconds = [results[sorted(results)[0]]["cell_s"]]
    live.cell_started(running)
    live.last_write = 0  # as if LIVE_REFRESH_S had passed
    live.cell_progress(1, 2, 1.2345)
    url = (grid / "report.html").resolve().as_uri()

    dom = chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0
    assert "Running: 1 done, 1 running" in dom.stdout and "1.2345" in dom.stdout and "1 of 2" in dom.stdout
    assert "Table 2" in dom.stdout and "…" in dom.stdout and 'http-equiv="refresh"' in dom.stdout
    console_errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and "rror" in line]
    assert not console_errors, console_errors
    shot = tmp_path / "live.png"
    result = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", url)
    assert result.returncode == 0 and shot.is_file()
    from PIL import Image

    assert len(set(Image.open(shot).convert("RGB").resize((300, 400)).getdata())) > 20, "a blank page"

import json

import pytest

from solotune.cli import main
from solotune.config import RunConfig
from solotune.errors import SolotuneError
from solotune.experiment.ablate import AXES, cell_argv, failure_reason, parse_axes, plan_cells
from solotune.experiment.report import axis_effects, load_grid, table1_rows, table2_text
from solotune.testing import save_model_folder


def test_cells_cover_every_combination_in_the_reference_order():
    cfg = RunConfig()
    cells = plan_cells(cfg, parse_axes("ga,mp,lora"))
    assert [c.name for c in cells[:3]] == ["ga-off_mp-off_lora-off", "ga-off_mp-off_lora-on", "ga-off_mp-on_lora-off"]
    assert len(cells) == 8 and len({c.name for c in cells}) == 8
    on = cells[-1].overrides
    assert (
        on["train.grad_accum"] == cfg.train.batch
        and on["lora.enabled"] is True
        and on["precision.mp"] in ("bf16", "fp16")
    )
    argv = cell_argv("base.yaml", "out", cells[0])
    assert "--no-lora.enabled" in argv and argv[argv.index("--train.grad-accum") + 1] == "1"
    with pytest.raises(SolotuneError, match="unknown axis qlora; choose from ga, mp, lora, gc, swiglu, pf"):
        parse_axes("lora,qlora")
    assert set(AXES) == {
        "ga", "mp", "lora", "gc", "pf", "cce", "swiglu", "sdrop", "compile", "quant", "optim", "base", "method"
    }  # fmt: skip
    methods = plan_cells(cfg, parse_axes("method"))
    assert [c.name for c in methods] == ["method-sft", "method-dpo", "method-orpo", "method-simpo"]
    assert methods[1].overrides == {"pref.method": "dpo", "data.format": "preference"}
    assert [c.overrides for c in plan_cells(cfg, parse_axes("quant,optim"))[-1:]] == [
        {"quant.method": "nf4", "train.optim": "adamw8bit"}
    ]
    assert plan_cells(cfg, parse_axes("compile"))[1].overrides == {"train.compile": "on"}
    plain = plan_cells(cfg, parse_axes("pf,cce,swiglu,sdrop"))[0].overrides
    assert plain == {
        "train.padding_free": False,
        "train.ce_chunk": 0,
        "train.fused_swiglu": False,
        "lora.shared_dropout": False,
    }


def test_resume_and_report_need_a_grid_folder(tmp_path, capsys):
    assert main(["ablate", "--resume", str(tmp_path)]) == 2
    assert main(["report", str(tmp_path)]) == 2
    assert "not an ablation grid folder" in capsys.readouterr().err


def test_failure_reasons():
    assert failure_reason(3, "train: 10%\rsolotune: error: out of memory: can't allocate").startswith(
        "OOM (can't allocate"
    )
    assert "OOM killer" in failure_reason(-9, "")
    assert failure_reason(1, "Traceback ...\nValueError: boom\n") == "ValueError: boom"


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """Big enough (80 M parameters) that full fine-tuning needs ~1 GiB more than LoRA."""
    return save_model_folder(tmp_path_factory.mktemp("wide"), hidden_size=1024, num_hidden_layers=8)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": "x" * 50, "response": "y" * 20}) + "\n" for _ in range(8)))
    return f


def ablate_args(model, data, out, *extra):
    return [
        "ablate",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--batch",
        "4",
        "--mp",
        "off",
        "--no-generate.enabled",
        *extra,
    ]


def test_a_cell_out_of_memory_is_an_X_and_the_grid_completes(wide_model_dir, data_file, tmp_path, capsys):
    # Measured on this project's machine: the LoRA cell runs within 1.0 GiB of data segment,
    # the full fine-tune needs more than 1.3 GiB (gradients + AdamW state of 80 M weights).
    assert (
        main(ablate_args(wide_model_dir, data_file, tmp_path / "grid", "--axes", "lora", "--mem-limit", "1.15GiB")) == 0
    )
    results = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert results["lora-on"]["status"] == "ok"
    assert results["lora-off"]["status"] == "X" and results["lora-off"]["reason"].startswith("OOM")
    table = (tmp_path / "grid" / "table2.txt").read_text()
    assert table.splitlines()[1].split()[2] == "X"  # "Peak MiB" row, LoRA OFF column
    assert (tmp_path / "grid" / "report.html").stat().st_size > 10_000
    assert "LoRA ON" not in capsys.readouterr().err


def test_resume_runs_only_the_missing_cells(tiny_model_dir, data_file, tmp_path):
    """Also: cells with held-out records (--eval.split) get Table 2's eval rows and the report's
    evaluation section; Table 1 gives each part's maximum, and the split at the peak after it."""
    grid = tmp_path / "grid"
    evaluated = ("--eval.split", "0.25", "--eval.metric", "contains")
    assert main(ablate_args(tiny_model_dir, data_file, grid, "--axes", "gc", *evaluated)) == 0
    rows = [line.split()[0] for line in (grid / "table2.txt").read_text().splitlines()]
    assert rows[-2:] == ["Eval", "Accuracy"]  # an Accuracy row only where some cell measured it
    html = (grid / "report.html").read_text()
    assert "Held-out evaluation" in html and "accuracy (contains) before → after" in html
    table1 = (grid / "table1.md").read_text()
    assert "activations (max)" in table1 and "At the tensor peak" in table1
    results = json.loads((grid / "results.json").read_text())
    kept = (grid / "cells" / "gc-off" / "metrics.json").stat().st_mtime_ns
    del results["gc-on"]
    (grid / "results.json").write_text(json.dumps(results))
    (grid / "cells" / "gc-on" / "metrics.json").unlink()
    assert main(["ablate", "--resume", str(grid)]) == 0
    assert set(json.loads((grid / "results.json").read_text())) == {"gc-off", "gc-on"}
    assert (grid / "cells" / "gc-off" / "metrics.json").stat().st_mtime_ns == kept
    assert (grid / "cells" / "gc-on" / "metrics.json").is_file()
    g = load_grid(grid)
    effects = axis_effects(g)
    assert effects[0].startswith("GC (): peak ") and "activations" in effects[0]
    assert main(["report", str(grid)]) == 0
    assert "GC" in table2_text(g).splitlines()[0]


def test_a_cell_without_memory_breakdown_is_reported_with_dashes(tiny_model_dir, data_file, tmp_path):
    """A cell run with --train.track-memory off (or from an older version) shows its parts as "–"."""
    grid = tmp_path / "grid"
    assert main(ablate_args(tiny_model_dir, data_file, grid, "--axes", "gc")) == 0
    metrics_path = grid / "cells" / "gc-on" / "metrics.json"
    m = json.loads(metrics_path.read_text())
    m["memory"].update(
        dict.fromkeys([k for k in m["memory"] if k.endswith("_mib") and k not in ("peak_mib", "reserved_mib")])
    )
    metrics_path.write_text(json.dumps(m))
    g = load_grid(grid)
    assert table1_rows(g)[2][1:6] == ["–"] * 5 and table1_rows(g)[2][-1] != "–"
    assert "activations 0" not in axis_effects(g)[0] and "→ – MiB" in axis_effects(g)[0]
    assert main(["report", str(grid)]) == 0


def test_the_quant_and_optim_axes_show_smaller_parameters_and_optimizer_state(tmp_path, data_file):
    """4-bit base and 8-bit AdamW as ablation axes, end to end, on a model with 256-wide layers."""
    model = save_model_folder(tmp_path / "m", hidden_size=256, num_hidden_layers=2)
    assert main(ablate_args(model, data_file, tmp_path / "grid", "--axes", "quant,optim", "--lora.r", "32")) == 0
    mem = {c.name: c.metrics["memory"] for c in load_grid(tmp_path / "grid").cells}
    assert mem["quant-on_optim-off"]["parameters_mib"] < 0.75 * mem["quant-off_optim-off"]["parameters_mib"]
    assert mem["quant-off_optim-on"]["optimizer_state_mib"] < 0.3 * mem["quant-off_optim-off"]["optimizer_state_mib"]
    cells = tmp_path / "grid" / "cells"
    assert (cells / "quant-on_optim-off" / "adapter" / "solotune-quantization.json").is_file()  # for generate / merge
    assert not (cells / "quant-off_optim-off" / "adapter" / "solotune-quantization.json").exists()


def test_a_running_grid_has_a_page_that_shows_its_cells_and_reloads_until_done(tmp_path, monkeypatch):
    """The live report (report.LiveReport): while a grid runs, report.html says which cells are
    done (here one X), running (with its step and loss so far) and waiting, shows the partial
    Table 2 and the time left, and reloads itself; the final report does not."""
    from solotune import artifacts
    from solotune.experiment import report
    from solotune.experiment.report import LiveReport, write_report

    cells = plan_cells(RunConfig(), parse_axes("lora,gc"))
    axes = [{"key": a.key, "label": a.label, "values": list(a.values)} for a in parse_axes("lora,gc")]
    artifacts.write_json(tmp_path / "grid.json", {"axes": axes, "cells": [vars(c) for c in cells]})
    artifacts.write_json(
        tmp_path / "results.json", {cells[0].name: {"status": "X", "reason": "OOM (test)", "cell_s": 30.0}}
    )
    live = LiveReport(tmp_path, cells_to_run=4)
    live.cell_seconds = [30.0]  # as if this invocation had finished the first cell
    live.cell_started(cells[1].name)
    monkeypatch.setattr(report, "LIVE_REFRESH_S", 0)  # every progress line rewrites the page
    live.cell_progress(2, 4, 0.6931)
    page = (tmp_path / "report.html").read_text()
    assert "http-equiv='refresh'" in page and "Running: 1 running, 2 waiting, 1 X; about 1.2 min left" in page
    assert "<td>running</td><td>2 of 4</td><td>0.6931</td>" in page and "X (OOM (test))" in page
    assert "Table 2" in page and "…" in page  # the partial table: cells not yet run
    write_report(tmp_path)  # the grid done: the final page
    assert "refresh" not in (tmp_path / "report.html").read_text()


def test_the_progress_line_of_a_cell_is_read_for_the_live_report():
    from solotune.experiment.ablate import PROGRESS

    stderr = (
        b"train:   0%|          | 0/3 [00:00<?, ?step/s]\r"
        b"train:  67%|######6   | 2/3 [00:06<00:03,  3.01s/step, loss=0.6852, reward_acc=0.75, peak_mib=1851]"
    )
    assert PROGRESS.findall(stderr) == [(b"2", b"3", b"0.6852")]

"""Tables and the HTML report of a grid, from its saved results alone (no torch needed).

Table 2 (the reference study's layout): peak memory, runtime and more for every cell, `X` for a
cell that did not finish. Table 1: each cell's tensor peak broken into parameters, gradients,
optimizer state and activations, and what each technique changed, in words and numbers.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

from solotune.artifacts import CELLS_DIR, GRID_FILE, METRICS_FILE
from solotune.experiment.ablate import RESULTS_FILE

REPORT_FILE = "report.html"
PARTS = ("parameters", "gradients", "optimizer_state", "activations")
PART_LABELS = {
    "parameters": "parameters",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations",
}


@dataclass
class CellResult:
    name: str
    values: dict  # axis key -> value
    status: str  # "ok", "X", or "pending"
    reason: str
    metrics: dict | None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Grid:
    folder: Path
    axes: list[dict]  # {"key", "label", "values"}
    cells: list[CellResult]

    def label(self, cell: CellResult, sep: str = " ") -> str:
        """The cell's switches, e.g. "GA OFF MP ON LoRA ON"; sep="\n" puts one axis on each line (plots)."""
        return sep.join(f"{a['label']} {cell.values[a['key']]}" for a in self.axes)


def load_grid(folder: Path) -> Grid:
    grid = json.loads((folder / GRID_FILE).read_text())
    results_path = folder / RESULTS_FILE
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    cells = []
    for c in grid["cells"]:
        r = results.get(c["name"], {"status": "pending"})
        metrics_path = folder / CELLS_DIR / c["name"] / METRICS_FILE
        metrics = json.loads(metrics_path.read_text()) if r["status"] == "ok" and metrics_path.exists() else None
        status = "pending" if r["status"] == "ok" and metrics is None else r["status"]  # its files were removed
        cells.append(CellResult(c["name"], c["values"], status, r.get("reason", ""), metrics))
    return Grid(folder, grid["axes"], cells)


METRIC_ROWS = [  # (row label, how to read it from metrics.json, format)
    ("Peak MiB", lambda m: m["memory"]["peak_mib"], "{:,.1f}"),
    ("Tensor MiB", lambda m: m["memory"]["tracked_peak_mib"], "{:,.1f}"),
    ("Time s", lambda m: m["train"]["runtime_s"], "{:,.1f}"),
    ("Tokens/s", lambda m: m["train"]["tokens_per_s"], "{:,.0f}"),
    ("Avg loss", lambda m: m["train"]["avg_loss"], "{:.4f}"),
    ("Final loss", lambda m: m["train"]["final_loss"], "{:.4f}"),
    ("Trainable", lambda m: m["params"]["trainable"], "{:,}"),
]


def _accuracy(m: dict) -> str | None:
    e = m.get("eval") or {}
    if "accuracy_after" not in e:
        return None
    return f"{100 * e['accuracy_before']['accuracy']:.0f}% → {100 * e['accuracy_after']['accuracy']:.0f}%"


OPTIONAL_ROWS = [  # where the cells held records out (--eval.split / --eval.data), or exported (--export.gguf)
    ("Eval loss", lambda m: (m.get("eval") or {}).get("loss_after"), "{:.4f}"),
    ("Accuracy", _accuracy, "{}"),
    ("Reward acc", lambda m: (m.get("eval") or {}).get("reward_accuracy_after"), "{:.0%}"),  # preference cells
    ("Margin", lambda m: (m.get("eval") or {}).get("margin_after"), "{:+.3f}"),
    ("GGUF MiB", lambda m: (m.get("export") or {}).get("mib"), "{:,.1f}"),
    ("Export s", lambda m: (m.get("export") or {}).get("seconds"), "{:.1f}"),
]


def metric_rows(grid: Grid) -> list[tuple]:
    """Table 2's rows, and the eval rows that some finished cell has a value for."""
    done = [c for c in grid.cells if c.ok]
    return METRIC_ROWS + [row for row in OPTIONAL_ROWS if any(row[1](c.metrics) is not None for c in done)]


def cell_value(cell: CellResult, read, fmt: str) -> str:
    if not cell.ok:
        return _not_run(cell)
    return _fmt(read(cell.metrics), fmt)


def _not_run(cell: CellResult) -> str:
    """A cell without numbers: X where it failed, … where it has not run (yet)."""
    return "X" if cell.status == "X" else "…"


def _fmt(value, fmt: str = "{:,.1f}") -> str:
    """A number for a table; a dash where it was not measured (e.g. no memory breakdown)."""
    return "–" if value is None else fmt.format(value)


def table2_text(grid: Grid) -> str:
    """The reference layout: one header row per axis, one column per cell."""
    rows = metric_rows(grid)
    width = max(12, *(len(cell_value(c, r, f)) + 2 for c in grid.cells for _, r, f in rows))
    lines, span = [], len(grid.cells)
    for axis in grid.axes:
        span //= len(axis["values"])
        repeats = len(grid.cells) // (span * len(axis["values"]))
        heads = [v.center(width * span) for _ in range(repeats) for v in axis["values"]]
        lines.append(f"{axis['label']:<12}" + "".join(heads))
    for label, read, fmt in rows:
        lines.append(f"{label:<12}" + "".join(cell_value(c, read, fmt).rjust(width) for c in grid.cells))
    return "\n".join(lines)


def table2_rows(grid: Grid) -> list[list[str]]:
    """Table 2 in long form (a row per cell) for Markdown and CSV."""
    metrics = metric_rows(grid)
    rows = [[a["label"] for a in grid.axes] + [label for label, _, _ in metrics] + ["note"]]
    for c in grid.cells:
        rows.append([c.values[a["key"]] for a in grid.axes] + [cell_value(c, r, f) for _, r, f in metrics] + [c.reason])
    return rows


def part_maxima(mem: dict) -> dict:
    """Each part's own maximum over the run (MiB); runs measured before it was recorded: the
    split at the peak."""
    return mem.get("part_max") or {f"{p}_mib": mem[f"{p}_mib"] for p in PARTS}


def table1_rows(grid: Grid) -> list[list[str]]:
    """Table 1: what each cell holds of each part at most (MiB), each part's maximum wherever in
    the step it falls, with the tensor and measured peaks."""
    rows = [["cell"] + [f"{PART_LABELS[p]} (max)" for p in PARTS] + ["tensor peak", "measured peak"]]
    for c in grid.cells:
        if not c.ok:
            rows.append([grid.label(c)] + [_not_run(c)] * 6)
            continue
        mem = c.metrics["memory"]
        most = part_maxima(mem) if mem["tracked_peak_mib"] is not None else {}
        rows.append(
            [grid.label(c)]
            + [_fmt(most.get(p + "_mib")) for p in PARTS]
            + [_fmt(mem["tracked_peak_mib"]), _fmt(mem["peak_mib"])]
        )
    return rows


def peak_split_rows(grid: Grid) -> list[list[str]]:
    """The second view: the tensor peak of every cell split into its four parts at that moment
    (MiB); it explains the peak."""
    rows = [["cell"] + [PART_LABELS[p] for p in PARTS] + ["tensor peak", "runtime, untracked", "measured peak"]]
    for c in grid.cells:
        if not c.ok:
            rows.append([grid.label(c)] + [_not_run(c)] * 7)
            continue
        mem = c.metrics["memory"]
        rows.append(
            [grid.label(c)]
            + [_fmt(mem[p + "_mib"]) for p in PARTS]
            + [_fmt(mem["tracked_peak_mib"]), _fmt(mem["untracked_mib"]), _fmt(mem["peak_mib"])]
        )
    return rows


def axis_effects(grid: Grid) -> list[str]:
    """For each axis, what switching it on changed, with every other axis at its first value."""
    sentences = []
    for axis in grid.axes:
        base = {a["key"]: a["values"][0] for a in grid.axes}
        off = _find(grid, base)
        on = _find(grid, {**base, axis["key"]: axis["values"][-1]})
        context = ", ".join(f"{a['label']} {base[a['key']]}" for a in grid.axes if a is not axis)
        sentences.append(_effect_sentence(axis["label"], off, on, context))
    return sentences


def _find(grid: Grid, values: dict) -> CellResult:
    return next(c for c in grid.cells if c.values == values)


def _effect_sentence(label: str, off: CellResult, on: CellResult, context: str) -> str:
    if not (off.ok and on.ok):
        state = lambda c: "ran" if c.ok else "not run yet" if c.status == "pending" else f"X ({c.reason or c.status})"  # noqa: E731
        return f"{label} ({context}): OFF {state(off)}, ON {state(on)}."
    a, b = off.metrics["memory"], on.metrics["memory"]
    most_a, most_b = (part_maxima(m) if m["tracked_peak_mib"] is not None else {} for m in (a, b))
    changes = [f"{PART_LABELS[p]} {_fmt(most_a.get(p + '_mib'))} → {_fmt(most_b.get(p + '_mib'))} MiB" for p in PARTS]
    ta, tb = off.metrics["train"]["runtime_s"], on.metrics["train"]["runtime_s"]
    return (
        f"{label} ({context}): peak {a['peak_mib']:,.1f} → {b['peak_mib']:,.1f} MiB "
        f"({_ratio(a['peak_mib'], b['peak_mib'])}); at most {'; '.join(changes)}; runtime {ta:,.1f} → {tb:,.1f} s "
        f"({_ratio(ta, tb)})."
    )


def _ratio(before: float, after: float) -> str:
    if before <= 0 or after <= 0:
        return "n/a"
    return f"{before / after:.2f}x less" if after < before else f"{after / before:.2f}x more"


def markdown_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


@dataclass
class Progress:
    """Where a running grid is: the running cell, its last step and loss, the time left."""

    running: str | None = None  # the running cell's name; None between cells
    step: int = 0
    steps: int = 0
    loss: float | None = None
    eta_s: float | None = None


LIVE_REFRESH_S = 10  # while a grid runs, its page reloads itself, and is rewritten, this often


class LiveReport:
    """report.html kept current while `solotune ablate` runs: rewritten whole (plots too) after each
    cell, and without plots (a few tens of ms) as a cell starts and every LIVE_REFRESH_S seconds
    of its progress; the page reloads itself until the grid is done. The time left is the mean
    time of the cells this invocation has finished, times the cells still to run (the running
    one by the steps it has left)."""

    def __init__(self, folder: Path, cells_to_run: int):
        self.folder, self.to_run = folder, cells_to_run
        self.cell_seconds: list[float] = []
        self.progress = Progress()
        self.last_write = 0.0

    def cell_started(self, name: str) -> None:
        self.progress = Progress(running=name, eta_s=self._eta(0.0))
        self._write(plots=False)

    def cell_progress(self, step: int, steps: int, loss: float | None) -> None:
        p = self.progress
        p.step, p.steps, p.loss = step, steps, loss
        p.eta_s = self._eta(step / steps if steps else 0.0)
        if time.monotonic() - self.last_write >= LIVE_REFRESH_S:
            self._write(plots=False)

    def cell_finished(self, seconds: float) -> None:
        self.cell_seconds.append(seconds)
        self.progress = Progress(eta_s=self._eta(0.0))
        if len(self.cell_seconds) < self.to_run:  # the last cell's report is the final one (cli)
            self._write(plots=True)

    def _eta(self, running_done: float) -> float | None:
        if not self.cell_seconds:
            return None
        left = self.to_run - len(self.cell_seconds) - running_done
        return max(0.0, left) * sum(self.cell_seconds) / len(self.cell_seconds)

    def _write(self, plots: bool) -> None:
        write_report(self.folder, self.progress, plots=plots)
        self.last_write = time.monotonic()


def write_report(folder: Path, progress: Progress | None = None, plots: bool = True) -> Path:
    """Write every table and report.html into the grid folder; return the report path. A final
    report (`progress` None) also prints Table 2; a running grid's page shows its `progress` and
    reloads itself (LiveReport)."""
    from solotune.artifacts import write_atomic

    grid = load_grid(folder)
    text = table2_text(grid)
    write_atomic(folder / "table2.txt", text + "\n")
    write_atomic(folder / "table2.md", markdown_table(table2_rows(grid)) + "\n")
    buf = io.StringIO()
    csv.writer(buf).writerows(table2_rows(grid))
    write_atomic(folder / "table2.csv", buf.getvalue())
    effects = axis_effects(grid)
    write_atomic(
        folder / "table1.md",
        markdown_table(table1_rows(grid))
        + "\n\n"
        + "\n".join(f"- {e}" for e in effects)
        + "\n\nAt the tensor peak:\n\n"
        + markdown_table(peak_split_rows(grid))
        + "\n",
    )
    write_atomic(folder / REPORT_FILE, render_html(grid, text, effects, progress, plots))
    if progress is None:
        print(f"\n{text}\n")
        for e in effects:
            print(f"- {e}")
    return folder / REPORT_FILE


# ---------------------------------------------------------------------------------------------
# HTML


def render_html(
    grid: Grid, table2: str, effects: list[str], progress: Progress | None = None, plots: bool = True
) -> str:
    """A self-contained page: tables, plots as inline PNGs, generations, config and machine; while
    the grid runs (`progress`), which cells are done, running and waiting first."""
    done = [c for c in grid.cells if c.ok]
    first = done[0].metrics if done else {}
    sections = [
        f"<h1>solotune ablation: {html.escape(grid.folder.name)}</h1>",
        *(_html_progress(grid, progress) if progress else []),
        "<h2>Table 2: every combination</h2>",
        f"<pre>{html.escape(table2)}</pre>",
        _html_table(table2_rows(grid)),
        "<h2>Table 1: where the memory goes</h2>",
        "<p>Each part's own maximum over the run, wherever in the step it falls.</p>",
        _html_table(table1_rows(grid)),
        "<ul>" + "".join(f"<li>{html.escape(e)}</li>" for e in effects) + "</ul>",
        "<h3>At the tensor peak</h3>",
        _html_table(peak_split_rows(grid)),
    ]
    if done and plots:
        sections += [
            "<h2>Memory breakdown at the peak</h2>",
            _img(_plot_breakdown(grid, done)),
            "<h2>Runtime and throughput</h2>",
            _img(_plot_speed(grid, done)),
            "<h2>Loss curves</h2>",
            _img(_plot_losses(grid, done)),
            *_html_preference(grid, done),
            *_html_evaluation(grid, done),
            "<h2>Generations</h2>",
            _html_generations(grid, done),
            "<h2>Configuration, machine, versions</h2>",
            f"<pre>{html.escape(json.dumps({k: first.get(k) for k in ('machine', 'versions', 'device', 'config')}, indent=2))}</pre>",
        ]
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "pre{background:#f6f6f6;padding:1em;overflow-x:auto}img{max-width:100%}"
    )
    refresh = f"<meta http-equiv='refresh' content='{LIVE_REFRESH_S}'>" if progress else ""
    head = f"<head><meta charset='utf-8'>{refresh}<title>solotune report</title><style>{style}</style></head>"
    return f"<!DOCTYPE html><html>{head}<body>{''.join(sections)}</body></html>\n"


def _html_progress(grid: Grid, progress: Progress) -> list[str]:
    """The running grid: each cell's state, the running cell's loss so far, the time left."""
    states = {"done": 0, "running": 0, "waiting": 0, "X": 0}
    rows = [["cell", "state", "step", "loss so far"]]
    for c in grid.cells:
        step = loss = ""
        if c.ok:
            state = "done"
        elif c.status == "X":
            state = "X"
        elif c.name == progress.running:
            state = "running"
            step = f"{progress.step} of {progress.steps}" if progress.steps else "starting"
            loss = f"{progress.loss:.4f}" if progress.loss is not None else ""
        else:
            state = "waiting"
        states[state] += 1
        rows.append([grid.label(c, sep=" "), state + (f" ({c.reason})" if state == "X" else ""), step, loss])
    left = f"; about {progress.eta_s / 60:.1f} min left" if progress.eta_s is not None else ""
    counts = ", ".join(f"{n} {state}" for state, n in states.items() if n)
    return [
        f"<h2 id='progress'>Running: {counts}{left}</h2>",
        f"<p>This page reloads every {LIVE_REFRESH_S} s until the grid is done.</p>",
        _html_table(rows),
    ]


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _html_evaluation(grid: Grid, done: list[CellResult]) -> list[str]:
    """The held-out evaluation: accuracy before -> after and the eval loss of each cell."""
    evaluated = [c for c in done if c.metrics.get("eval")]
    if not evaluated:
        return []
    e0 = evaluated[0].metrics["eval"]
    rows = [["cell", "eval loss before → after", f"accuracy ({e0['metric']}) before → after", "records"]]
    for c in evaluated:
        e = c.metrics["eval"]
        rows.append(
            [
                grid.label(c),
                f"{e['loss_before']:.4f} → {e['loss_after']:.4f}",
                _accuracy(c.metrics) or "–",
                str(e["records"]),
            ]
        )
    return [f"<h2>Held-out evaluation ({html.escape(e0['source'])})</h2>", _html_table(rows)]


def _html_generations(grid: Grid, done: list[CellResult]) -> str:
    out = []
    before = done[0].metrics["generations"]["before"]
    if not before:
        return "<p>Generation was disabled in this grid.</p>"
    for i, g in enumerate(before):
        out.append(
            f"<h3>{html.escape(g['prompt'])}</h3><p><b>before</b> ({g['seconds']:.2f} s): {html.escape(g['text'])}</p><ul>"
        )
        for c in done:
            a = c.metrics["generations"]["after"][i]
            out.append(f"<li><b>{html.escape(grid.label(c))}</b> ({a['seconds']:.2f} s): {html.escape(a['text'])}</li>")
        out.append("</ul>")
    return "".join(out)


def _img(png: bytes) -> str:
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _figure().close(fig)
    return buf.getvalue()


def _plot_breakdown(grid: Grid, done: list[CellResult]) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(11, 4.5))
    labels = [grid.label(c, sep="\n") for c in done]
    bottom = [0.0] * len(done)
    for part in PARTS:
        vals = [c.metrics["memory"][part + "_mib"] or 0.0 for c in done]  # no breakdown: an empty bar
        ax.bar(labels, vals, bottom=bottom, label=PART_LABELS[part])
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, (top, c) in enumerate(zip(bottom, done)):  # the measured peak also holds the runtime
        ax.annotate(f"measured {c.metrics['memory']['peak_mib']:,.0f}", (x, top), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("MiB at the tensor peak")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    return _png(fig)


def _plot_speed(grid: Grid, done: list[CellResult]) -> bytes:
    plt = _figure()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [grid.label(c, sep="\n") for c in done]
    a1.bar(labels, [c.metrics["train"]["runtime_s"] for c in done], color="tab:gray")
    a1.set_ylabel("training loop, s")
    a2.bar(labels, [c.metrics["train"]["tokens_per_s"] for c in done], color="tab:green")
    a2.set_ylabel("non-padding tokens/s")
    for a in (a1, a2):
        a.tick_params(axis="x", labelsize=6)
    return _png(fig)


def _html_preference(grid: Grid, done: list[CellResult]) -> list[str]:
    """The preference cells' reward accuracy and margin per step (none: no section)."""
    tuned = [c for c in done if c.metrics["train"].get("stats")]
    if not tuned:
        return []
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name, label in zip(axes, ("reward_accuracy", "margin"), ("reward accuracy", "reward margin")):
        for c in tuned:
            curve = c.metrics["train"]["stats"][name]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=grid.label(c))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{label} (the step's pairs)")
        ax.legend(fontsize=7)
    return ["<h2>Preference tuning</h2>", _img(_png(fig))]


def _plot_losses(grid: Grid, done: list[CellResult]) -> bytes:
    """The training loss of every cell; beside it, the eval loss where records were held out."""
    plt = _figure()
    evaluated = [c for c in done if c.metrics.get("eval")]
    fig, axes = plt.subplots(1, 2 if evaluated else 1, figsize=(11, 4), squeeze=False)
    ax = axes[0][0]
    for c in done:
        curve = c.metrics["train"]["loss_curve"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=grid.label(c))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over response tokens)")
    ax.legend(fontsize=7)
    if evaluated:
        ev = axes[0][1]
        for c in evaluated:
            steps, losses = zip(*c.metrics["eval"]["loss_curve"])
            ev.plot(steps, losses, marker="s", markersize=3, label=grid.label(c))
        ev.set_xlabel("optimizer step (0: before training)")
        ev.set_ylabel("eval loss (held-out records)")
        ev.legend(fontsize=7)
    return _png(fig)

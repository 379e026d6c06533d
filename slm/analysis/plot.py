"""`slm plot`: the curves of one or more runs, read from their `metrics.jsonl` and `run.json`, as one PNG.

Four panels: train loss and eval loss against tokens seen (log tokens), the learning rate, and, for
a suite, the last eval loss of each run against its parameter count. From an eval table of
`slm eval --out` instead (`plot_table`): every checkpoint's eval loss against tokens (time), and
each run's final loss against parameters on log-log axes, one line per architecture with the fitted
power law loss = a * N^b and its exponent b (scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slm.core.errors import SlmError
from slm.core.paths import partial_file
from slm.core.run_folder import METRICS, checked_run_folder, read_metrics, read_run_record

TRAIN_LOSS, EVAL_LOSS, LR = "loss/train/total", "metrics/eval/CrossEntropy", "lr-AdamW/group0"


@dataclass
class RunCurves:
    """A run folder's curves as `slm plot` draws them: its name, metrics.jsonl's rows and run.json."""

    name: str
    rows: list[dict]
    info: dict = field(default_factory=dict)  # run.json

    @property
    def parameters(self) -> int | None:
        """The run's parameter count, from its run.json (None where it records none)."""
        return self.info.get("parameters")

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Return the tokens seen and the values of metric `key` at every row that logged it as a float."""
        points = [(row["tokens"], row[key]) for row in self.rows if isinstance(row.get(key), float)]
        return [t for t, _ in points], [v for _, v in points]


def read_run(folder: Path) -> RunCurves:
    """Read a run folder of slm/train.py (checkpoints/RUN_NAME): its metrics and parameter count."""
    checked_run_folder(folder)
    if not (folder / METRICS).is_file():
        raise SlmError(f"{folder} has no {METRICS}: give the run folder of slm/train.py (its save_folder, "
                       "e.g. checkpoints/RUN_NAME)")
    rows = read_metrics(folder)
    info = read_run_record(folder) or {}
    if not rows:
        raise SlmError(f"{folder / METRICS} is empty: the run has not logged a batch yet")
    return RunCurves(info.get("run_name", folder.name), rows, info)


def save_figure(fig, out: Path) -> Path:
    """Save the figure as the PNG `out`, written whole or not at all."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with partial_file(out) as tmp:
            fig.savefig(tmp, dpi=110)
    except OSError as e:
        raise SlmError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        plt.close(fig)
    return out


def _label(run: RunCurves) -> str:
    """Return the run's legend label: its name, with its parameter count in millions where known."""
    return f"{run.name} ({run.parameters / 1e6:.3g}M)" if run.parameters else run.name


def plot_runs(folders: list[Path], out: Path) -> Path:
    """Draw the runs' curves, overlaid, into the PNG `out` (written whole or not at all)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(Path(f)) for f in folders]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = [(axes[0, 0], TRAIN_LOSS, "train loss", True), (axes[0, 1], EVAL_LOSS, "eval loss", True),
              (axes[1, 0], LR, "learning rate", False)]
    for ax, key, title, log in panels:
        for run in runs:
            tokens, values = run.series(key)
            ax.plot(tokens, values, marker="o" if len(tokens) < 20 else None, markersize=3, label=_label(run))
        ax.set(title=title, xlabel="tokens seen", ylabel=title)
        if log:
            ax.set(xscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize="small")

    ax = axes[1, 1]
    families: dict[str, list[tuple[int, float, str]]] = {}  # one line per architecture
    for run in runs:
        if run.parameters and run.series(EVAL_LOSS)[1]:
            family = run.info.get("config", {}).get("model", {}).get("class", "?")
            families.setdefault(family, []).append((run.parameters, run.series(EVAL_LOSS)[1][-1], run.name))
    if sum(map(len, families.values())) >= 2:
        for family, points in sorted(families.items()):
            points.sort()
            ax.plot([p for p, _, _ in points], [loss for _, loss, _ in points], marker="o", label=family)
            for params, loss, name in points:
                ax.annotate(name, (params, loss), fontsize="small", textcoords="offset points", xytext=(4, 4))
        ax.set(xscale="log")
        ax.legend(fontsize="small")
        ax.grid(True, which="both", alpha=0.3)
    else:
        ax.text(0.5, 0.5, "loss vs parameters:\ngive two or more runs that have evaluated", ha="center",
                va="center", transform=ax.transAxes)
    ax.set(title="last eval loss vs parameters", xlabel="parameters (embeddings included)", ylabel="eval loss")

    return save_figure(fig, out)


def power_law(parameters: list[float], losses: list[float]) -> tuple[float, float]:
    """Return (a, b) of loss = a * parameters^b, fitted by least squares in log-log space."""
    import numpy as np

    b, log_a = np.polyfit(np.log(parameters), np.log(losses), 1)
    return float(np.exp(log_a)), float(b)


def plot_table(table: Path, out: Path, metric: str = "CrossEntropy") -> Path:
    """Draw the eval table's time and scale panels into the PNG `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slm.analysis.evaluate import read_table

    rows = [row for row in read_table(table) if row["metric"] == metric and row["tokens"] is not None]
    if not rows:
        raise SlmError(f"{table} has no {metric} rows with tokens: fill it with `slm eval RUN... --out {table}`")
    runs: dict[str, list[dict]] = {}
    for row in rows:
        runs.setdefault(row["run"] or row["model"], []).append(row)
    fig, (time_ax, scale_ax) = plt.subplots(1, 2, figsize=(13, 5))
    for run, points in sorted(runs.items()):
        points.sort(key=lambda r: r["tokens"])
        time_ax.plot([r["tokens"] for r in points], [r["value"] for r in points], marker="o", markersize=3,
                     label=f"{run} ({points[-1]['parameters'] / 1e6:.3g}M)")
    time_ax.set(title=f"eval {metric} over training", xlabel="tokens seen", ylabel=metric, xscale="log")
    time_ax.grid(True, which="both", alpha=0.3)
    time_ax.legend(fontsize="small")
    families: dict[str, list[tuple[int, float]]] = {}
    for points in runs.values():
        final = max(points, key=lambda r: r["tokens"])
        families.setdefault(final["architecture"] or "?", []).append((final["parameters"], final["value"]))
    for family, points in sorted(families.items()):
        points.sort()
        params, losses = [p for p, _ in points], [v for _, v in points]
        line = scale_ax.plot(params, losses, marker="o", linestyle="", label=family)[0]
        if len(points) >= 2:
            a, b = power_law(params, losses)
            scale_ax.plot(params, [a * n**b for n in params], color=line.get_color(),
                          label=f"{family}: {a:.3g} N^{b:.3f}")
    scale_ax.set(title=f"final {metric} vs parameters", xlabel="parameters (embeddings included)", ylabel=metric,
                 xscale="log", yscale="log")
    scale_ax.grid(True, which="both", alpha=0.3)
    scale_ax.legend(fontsize="small")
    return save_figure(fig, out)

"""Plots for the dashboard: small PNGs rendered with matplotlib's Agg backend.

Figures are built with `matplotlib.figure.Figure` and an Agg canvas, never through `pyplot`: no
global state, no GUI backend, and safe in the threads that Prefect runs tasks in.
"""
from __future__ import annotations

import io
import math


def loss_points(log_history: list[dict], key: str = "loss") -> list[tuple[int, float]]:
    """(step, value) of every finite `key` entry of a Trainer `log_history`, by step."""
    points = {}
    for entry in log_history:
        value, step = entry.get(key), entry.get("step")
        if isinstance(value, (int, float)) and isinstance(step, (int, float)) and math.isfinite(value):
            points[int(step)] = float(value)
    return sorted(points.items())


def final_train_loss(log_history: list[dict]) -> float | None:
    """The mean training loss the Trainer logs once at the end (`train_loss`), if finite."""
    values = [e["train_loss"] for e in log_history if isinstance(e.get("train_loss"), (int, float))]
    return float(values[-1]) if values and math.isfinite(values[-1]) else None


def confusion_png(labels: list[str], matrix: list[list[int]], title: str = "Confusion matrix", dpi: int = 80) -> bytes:
    """A heatmap PNG of a confusion matrix (rows: reference, columns: predicted), each cell annotated
    with its count."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(matrix)
    side = 2.6 + 0.5 * len(labels)
    fig = Figure(figsize=(side + 1.5, side), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set(title=title, xlabel="predicted", ylabel="reference", xticks=range(len(labels)),
           yticks=range(len(labels)), xticklabels=labels, yticklabels=labels)
    ax.tick_params(axis="x", labelrotation=45, labelsize="small")
    ax.tick_params(axis="y", labelsize="small")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize="small",
                color="white" if n > counts.max() / 2 else "black")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def loss_curve_png(log_history: list[dict], title: str = "Training loss", width: float = 6.0,
                   height: float = 3.0, dpi: int = 80) -> bytes:
    """A PNG (`width` x `height` inches at `dpi`: 480x240 pixels by default) of the training loss
    per logged step in a `transformers` Trainer `log_history` (the model's `train_log.json`), with
    `eval_loss` if it was logged and the run's mean training loss as a dashed line.

    A run shorter than its `logging_steps` logs no per-step loss; the PNG then says so.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train, evals, mean = loss_points(log_history), loss_points(log_history, "eval_loss"), final_train_loss(log_history)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, marker="o" if len(train) <= 30 else None, markersize=3, linewidth=1.5,
                label="training loss")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, marker="s", markersize=3, linewidth=1.5, label="eval loss")
    if mean is not None:
        ax.axhline(mean, color="grey", linestyle="--", linewidth=1, label=f"mean training loss {mean:.4f}")
    if not train and not evals:
        last_step = max((int(e["step"]) for e in log_history if isinstance(e.get("step"), (int, float))), default=0)
        ax.set_xlim(0, max(last_step, 1))
        ax.text(0.5, 0.5, "no per-step loss logged\n(fewer steps than logging_steps)", ha="center",
                va="center", transform=ax.transAxes, color="grey")
    rates = loss_points(log_history, "learning_rate")
    if rates:
        lr_axis = ax.twinx()
        steps, values = zip(*rates)
        lr_axis.plot(steps, values, color="tab:green", linewidth=1, alpha=0.6, label="learning rate")
        lr_axis.set_ylabel("learning rate", color="tab:green")
        lr_axis.tick_params(axis="y", labelcolor="tab:green", labelsize="small")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if train or evals or mean is not None:
        ax.legend(loc="upper right", fontsize="small", frameon=False)
    ax.set(title=title, xlabel="step", ylabel="loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def metric_trend_png(versions: list[dict], title: str, width: float = 6.0, height: float = 2.6, dpi: int = 80) -> bytes:
    """A PNG of every numeric metric of the registered `versions` (registry entries, oldest first) by
    version, promoted versions marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = sorted({k for v in versions for k, x in v["metrics"].items() if isinstance(x, (int, float))
                    and math.isfinite(x)})
    xs = list(range(len(versions)))  # positions, labelled with the versions (a metric may be missing in some)
    for name in names:
        ys = [v["metrics"].get(name, math.nan) for v in versions]
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5, label=name)
        promoted = [(x, y) for x, y, v in zip(xs, ys, versions) if v.get("promoted") and math.isfinite(y)]
        if promoted:
            px, py = zip(*promoted)
            ax.scatter(px, py, s=60, facecolors="none", edgecolors="black", linewidths=1)
    ax.set_xticks(xs, [f"v{v['version']}" for v in versions])
    if not names:
        ax.text(0.5, 0.5, "no versions registered", ha="center", va="center", transform=ax.transAxes, color="grey")
    else:
        ax.legend(loc="lower right", fontsize="small", frameon=False)
    ax.set(title=title, xlabel="version (circled: promoted)", ylabel="metric")
    ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def drift_png(runs: list[dict], reference: dict | None, threshold: float, title: str,
              width: float = 9.0, height: float = 2.8, dpi: int = 80) -> bytes:
    """A PNG of what moved in batch inference: left, each figure's PSI against the version's reference over
    `runs` (inference-run records, oldest first; the drift `threshold` dashed); right, the shares of each
    category figure (labels, finish reasons) in the `reference` (`monitoring.summary` of the version's
    figures) beside those of the latest run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    trend, shares = fig.subplots(1, 2, width_ratios=(3, 2))
    xs = list(range(len(runs)))
    for name in sorted({k for r in runs for k in r.get("drift", {})}):
        trend.plot(xs, [r.get("drift", {}).get(name, math.nan) for r in runs], marker="o", markersize=3,
                   linewidth=1.5, label=name)
    trend.axhline(threshold, color="grey", linestyle="--", linewidth=1)
    trend.set_xticks(xs, [r["time"][5:16].replace("T", " ") for r in runs], rotation=30, fontsize="x-small")
    trend.set(title=f"{title}: PSI against the reference", ylabel="PSI")
    if trend.lines[1:]:  # a figure's line besides the threshold's
        trend.legend(loc="upper left", fontsize="small", frameon=False)
    trend.grid(True, alpha=0.3)
    latest = runs[-1].get("figures", {}) if runs else {}
    categories = {f: ref for f, ref in (reference or {}).items()
                  if isinstance(ref, dict) and isinstance(latest.get(f), dict)}  # shares, not quantiles
    bars = [(f"{figure}: {k}", ref.get(k, 0.0), latest[figure].get(k, 0.0))
            for figure, ref in categories.items() for k in sorted(set(ref) | set(latest[figure]))][:12]
    if bars:
        ys = list(range(len(bars)))
        shares.barh([y + 0.2 for y in ys], [b[1] for b in bars], height=0.4, label="reference")
        shares.barh([y - 0.2 for y in ys], [b[2] for b in bars], height=0.4, label="latest run")
        shares.set_yticks(ys, [b[0] for b in bars], fontsize="x-small")
        shares.invert_yaxis()
        shares.legend(loc="lower right", fontsize="small", frameon=False)
    else:
        shares.text(0.5, 0.5, "no category figures", ha="center", va="center", transform=shares.transAxes,
                    color="grey")
    shares.set(title="shares: reference vs latest run", xlabel="share of rows")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()

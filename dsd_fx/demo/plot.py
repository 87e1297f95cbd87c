"""The demo's picture: the D -> S -> D run beside its dense baseline, drawn on an Agg canvas.

`matplotlib.figure.Figure` with `FigureCanvasAgg`: no pyplot, no global backend switch.
"""
from __future__ import annotations

from typing import Sequence

PHASE_SHADE = {"dense": "0.93", "sparse": "#fde7e7", "redense": "#e7f0fd"}
PHASE_LABEL = {"dense": "dense", "sparse": "sparse", "redense": "re-dense"}
COLOURS = {"dsd": "tab:blue", "baseline": "tab:orange"}
NAMES = {"dsd": "D → S → D", "baseline": "dense baseline (one run with DSD until the sparse phase; same epochs, same lr drop)"}


def new_figure(rows: int, height: float, sharex: bool = True):
    """A Figure of `rows` stacked axes (sharing x by default), attached to an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=sharex, squeeze=False)[:, 0]
    return fig, list(axes)


def shade_phases(axes, bounds: Sequence[tuple[str, int, int]], width: float = 1) -> None:
    """Shade each phase's epochs (points `width` apart) on every axis and name the phases above the first."""
    for ax in axes:
        for name, first, last in bounds:
            ax.axvspan(first - width / 2, last + width / 2, color=PHASE_SHADE[name], zorder=0)
            ax.axvline(first - width / 2, color="0.4", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
    for name, first, last in bounds:
        axes[0].text((first + last) / 2, 1.02, PHASE_LABEL[name], transform=axes[0].get_xaxis_transform(),
                     ha="center", fontsize=9)


def zoom_on_late_epochs(ax, curves: dict[str, list[dict]], bounds) -> None:
    """Scale the accuracy axis to the epochs after the first phase, where the runs differ by a point or two."""
    after = bounds[0][2] if len(bounds) > 1 else 0
    late = [r["accuracy"] for rows in curves.values() for r in rows if r["epoch"] > after]
    if late:
        lo, hi = min(late), max(late)
        pad = max(0.01, (hi - lo) * 0.5)
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))


def plot_training(curves: dict[str, list[dict]], bounds, path: str, title: str, sad=()) -> None:
    """Train loss and test accuracy per epoch, one colour per run, phases shaded; SAD below if given.

    curves: {"dsd": [...], "baseline": [...]}, each a list of {"epoch", "loss", "accuracy"}.
    sad: (epoch, fraction of mask entries changed since the sparse phase began) for SR-STE/STE.
    """
    fig, axes = new_figure(3 if sad else 2, 8 if sad else 6)
    loss_ax, acc_ax = axes[0], axes[1]
    for run, rows in curves.items():
        epochs = [r["epoch"] for r in rows]
        style = {"marker": ".", "color": COLOURS[run], "label": NAMES[run]}
        loss_ax.plot(epochs, [r["loss"] for r in rows], **style)
        acc_ax.plot(epochs, [r["accuracy"] for r in rows], **style)
    loss_ax.set_ylabel("train loss")
    loss_ax.set_yscale("log")
    acc_ax.set_ylabel("test accuracy")
    zoom_on_late_epochs(acc_ax, curves, bounds)
    acc_ax.legend(loc="lower right", fontsize=8)
    if sad:
        axes[2].plot([e for e, _ in sad], [f for _, f in sad], marker=".", color="tab:red")
        axes[2].set_ylabel("SAD since sparse start")
    axes[-1].set_xlabel("epoch")
    shade_phases(axes, bounds)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_lm(curves: dict[str, list[dict]], bounds, round_steps: int, path: str, title: str) -> None:
    """Train and validation bits per byte of both runs per evaluation round (x in steps), phases shaded."""
    import math

    fig, axes = new_figure(2, 6)
    for run, rows in curves.items():
        steps = [r["epoch"] * round_steps for r in rows]
        style = {"marker": ".", "color": COLOURS[run], "label": NAMES[run].replace("epochs", "steps")}
        axes[0].plot(steps, [r["loss"] / math.log(2) for r in rows], **style)
        axes[1].plot(steps, [r["bpb"] for r in rows], **style)
    axes[0].set_ylabel("train bits per byte")
    axes[1].set_ylabel("validation bits per byte")
    axes[1].legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel("step")
    # a point closes its round: phase spans run from the step before its first round to its last point
    half = round_steps / 2
    shade_phases(axes, [(name, first * round_steps - half, last * round_steps - half) for name, first, last in bounds],
                 width=round_steps)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)

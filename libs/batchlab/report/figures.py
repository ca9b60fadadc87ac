"""Plots like the paper's figures, written as PNG files."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_schedules"]

log = logging.getLogger(__name__)


def plot_schedules(
    schedules: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    total_steps: int,
    path: str | Path,
    *,
    title: str = "Learning rate schedules",
    markers: Sequence[int] = (),
) -> Path:
    """Plot learning-rate schedules against the step, as in the paper's Figure 1.

    Args:
      schedules: label -> schedule (a function of an integer array of steps).
      total_steps: the last step plotted.
      path: the PNG file to write (parent folders are created).
      title: the figure title.
      markers: steps to mark with a vertical dotted line (e.g. the end of warmup).

    Returns:
      The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = np.arange(total_steps + 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, fn in schedules.items():
        ax.plot(steps, np.asarray(fn(steps), dtype=np.float64), label=label, linewidth=1.8)
    for step in markers:
        ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.set_xlim(0, total_steps)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    log.info("wrote %s", path)
    return path

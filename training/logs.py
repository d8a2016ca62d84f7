"""Per-epoch logs: CSV, JSON and a dashboard PNG of loss and metric curves."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_logs(out: Path, history: Sequence[dict[str, Any]], metrics: Sequence[str]) -> None:
    """Rewrite ``log.csv``, ``log.json`` and ``dashboard.png`` from the whole history."""
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with (out / "log.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    (out / "log.json").write_text(json.dumps(list(history), indent=1, default=_jsonable))
    dashboard(out / "dashboard.png", history, metrics)


def _jsonable(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def dashboard(path: Path, history: Sequence[dict[str, Any]], metrics: Sequence[str]) -> None:
    """Two panels: losses (train and val) and the configured validation metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train_loss", "train_sem", "train_ter", "val_loss"):
        _plot(ax_loss, epochs, history, key)
    ax_loss.set(title="loss", xlabel="epoch")
    for key in [*metrics, "val_score"]:
        _plot(ax_metric, epochs, history, key)
    ax_metric.set(title="validation", xlabel="epoch", ylim=(0, 1))
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot(ax: Any, epochs: list[int], history: Sequence[dict[str, Any]], key: str) -> None:
    ys = [row.get(key, math.nan) for row in history]
    if any(isinstance(y, float) and math.isfinite(y) for y in ys):
        ax.plot(epochs, ys, marker="o", ms=3, label=key)

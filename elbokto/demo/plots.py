"""The demo's figures: training curves and the ablation chart (PNG, matplotlib when installed)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from elbokto.durable import atomic_write
from elbokto.requires import pyplot

logger = logging.getLogger(__name__)


def pyplot_or_none():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a warning) without it."""
    try:
        return pyplot("the demo's plots")
    except ModuleNotFoundError as error:
        logger.warning("%s (no plot)", error)
        return None


def plot_curves(summary: dict, path: Path) -> bool:
    """SFT loss, KTO loss, reward margins and the desirable rate at checkpoints, as one PNG.

    Returns False (and writes nothing) when matplotlib is not importable."""
    plt = pyplot_or_none()
    if plt is None:
        return False
    curves = summary["curves"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    panels = [
        ("SFT loss (nats / token)", curves["sft_loss"]),
        ("ELBO-KTO loss", curves["loss"]),
        ("rewards/margins (chosen - rejected)", curves["margins"]),
    ]
    for ax, (title, values) in zip(axes, panels):
        ax.plot(values, lw=0.6, alpha=0.5)
        ax.plot(_smooth(values), lw=1.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    steps, rates = zip(*curves["checkpoints"])
    axes[3].plot(steps, rates, "o-")
    axes[3].set_ylim(0, 1)
    axes[3].set_title("desirable (reverse) rate", fontsize=10)
    axes[3].set_xlabel("KTO step")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True


def plot_ablations(table: dict, path: Path) -> bool:
    """Desirable, undesirable and malformed rates of every setting of ``table``
    (:func:`write_ablations`): one dot per seed, the mean with one standard deviation.

    Returns False (and writes nothing) when matplotlib is not importable."""
    plt = pyplot_or_none()
    if plt is None:
        return False
    names = list(table["settings"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(names) + 1.5), sharey=True)
    for ax, (key, title) in zip(
        axes,
        [
            ("desirable_rate", "desirable (reverse) rate"),
            ("undesirable_rate", "undesirable (copy) rate"),
            ("other_rate", "malformed rate"),
        ],
    ):
        for y, name in enumerate(names):
            entry = table["settings"][name]
            seeds = [r[key] for r in entry["per_seed"].values()]
            ax.plot(seeds, [y] * len(seeds), "o", color="0.6", ms=4)
            ax.errorbar(
                entry[key]["mean"], y, xerr=entry[key]["std"], fmt="D", color="C0", capsize=3
            )
        ax.set_title(f"{title}, seeds {table['seeds']}", fontsize=10)
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True


def _smooth(values: list[float], width: int = 25) -> np.ndarray:
    width = max(1, min(width, len(values) // 5 or 1))
    return np.convolve(values, np.ones(width) / width, mode="valid")

"""PNG and JSON reports of simulation runs (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_rounds"]


def plot_rounds(
    path: str | Path,
    rounds: Sequence[dict[str, Any]],
    *,
    title: str,
    baseline: float | None = None,
    baseline_label: str = "central training",
) -> Path:
    """Write a 2x2 report: accuracy, loss, epsilon spent, bytes and participation per round.

    Args:
        path: the PNG file to write.
        rounds: per-round dicts with ``round``, ``accuracy``, ``loss``,
            ``epsilon``, ``bytes_up`` and ``contributors``.
        title: figure title.
        baseline: a reference accuracy drawn as a dashed line.
        baseline_label: its legend label.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in rounds]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    ax.plot(xs, [100 * r["accuracy"] for r in rounds], marker="o", label="federated (this run)")
    fed = [(r["round"], r.get("fed_accuracy")) for r in rounds if r.get("fed_accuracy") is not None]
    if fed:
        ax.plot(
            [x for x, _ in fed],
            [100 * float(a) for _, a in fed],  # type: ignore[arg-type]
            marker="x",
            linestyle=":",
            label="federated evaluation (devices' held-out data, DP-noised)",
        )
    if baseline is not None:
        ax.axhline(100 * baseline, linestyle="--", color="grey", label=baseline_label)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    ax = axes[0][1]
    ax.plot(xs, [r["loss"] for r in rounds], marker="o", color="tab:red", label="test loss")
    ax.set_xlabel("round")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title("Loss")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    ax = axes[1][0]
    ax.plot(
        xs,
        [r["epsilon"] for r in rounds],
        marker="o",
        color="tab:purple",
        label="epsilon spent (per device, cumulative)",
    )
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon (delta fixed)")
    ax.set_title("Privacy budget spent")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    ax = axes[1][1]
    ax.bar(
        xs,
        [r["bytes_up"] / 1024 for r in rounds],
        color="tab:green",
        alpha=0.6,
        label="uploaded (KiB, all devices)",
    )
    ax.set_xlabel("round")
    ax.set_ylabel("KiB uploaded per round")
    ax.set_title("Traffic and participation")
    twin = ax.twinx()
    twin.plot(
        xs,
        [r["contributors"] for r in rounds],
        marker="s",
        color="black",
        label="devices in the sum",
    )
    twin.set_ylabel("devices in the sum")
    twin.set_ylim(bottom=0, top=max([r["contributors"] for r in rounds] + [1]) * 1.25)
    from matplotlib.ticker import MaxNLocator as _Ticks

    twin.yaxis.set_major_locator(_Ticks(integer=True))
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.set_ylim(top=max([r["bytes_up"] / 1024 for r in rounds] + [1]) * 1.25)
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize="small")
    from matplotlib.ticker import MaxNLocator

    for row in axes:
        for axis in row:
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

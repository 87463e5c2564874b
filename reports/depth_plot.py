"""The exit-depth plot of a ladder (owned with the ladder, H14; the report decides where it goes).

Reads only ``validate.json`` → ``ladder`` (see :func:`loadtests.ablation.ladder_figures`): never
re-runs a model.
"""
from __future__ import annotations

import io


def exit_depth_png(ladder: dict) -> bytes:
    """Bars: share of requests leaving after each stage, bio (measured) beside the oracle (the
    earliest exit with the full model's answer); line: each stage's held-out accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = ladder["n_stages"]
    stages = list(range(1, n + 1))

    def shares(histogram: dict) -> list[float]:
        total = sum(histogram.values()) or 1
        return [100 * histogram.get(str(k), 0) / total for k in stages]

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.4
    ax.bar([k - width / 2 for k in stages], shares(ladder["depth_histogram"]), width, color="#2ca02c",
           label=f"bio (mean depth {ladder['mean_depth']:.2f})")
    ax.bar([k + width / 2 for k in stages], shares(ladder["oracle_depth_histogram"]), width, color="gold",
           edgecolor="k", label=f"oracle (mean depth {ladder['oracle_mean_depth']:.2f})")
    ax.set_xticks(stages, [f"exit {k}" if k < n else f"{k}: full" for k in stages])
    ax.set_ylabel("requests leaving here (%)")
    ax.set_xlabel("stage of the ladder")
    accuracy = ax.twinx()
    accuracy.plot(stages, [100 * a for a in ladder["stage_accuracy_heldout"]], "o-", color="k",
                  label="held-out accuracy of that stage")
    accuracy.set_ylabel("accuracy (%)")
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = accuracy.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, loc="upper center", fontsize=8)
    ax.set_title("Where requests leave the ladder")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()

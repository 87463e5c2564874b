"""The report's plots, as PNG bytes (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import io

import numpy as np

from reports.ablation import PAPER_ACCURACY_LOSS_PP, PAPER_ADMISSION_RATE
from reports.records import ANSWERED, outcome
from reports.runs import Run

COLOURS = {"standard": "#7f7f7f", "bio": "#2ca02c"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _colour(run: Run, i: int) -> str:
    return COLOURS.get(run.scenario, f"C{i}")


def latency_cdf(runs: list[Run]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(runs):
        latency = np.sort([r["latency_ms"] for r in run.records if outcome(r) == ANSWERED])
        if latency.size:
            ax.plot(latency, np.arange(1, latency.size + 1) / latency.size, label=run.name, color=_colour(run, i))
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def over_time(runs: list[Run], warmup_s: float | None = None) -> bytes:
    """Per second of the schedule: load (requests sent), latency p50/p95, τ and admission rate;
    the warm-up excluded from the claims is shaded."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    plt = _pyplot()
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    for i, run in enumerate(runs):
        timed = [r for r in run.records if r.get("t_intended") is not None]
        answered = [r for r in timed if outcome(r) == ANSWERED]
        if not answered:
            continue
        start = min(r["t_intended"] for r in timed)
        second = np.floor(np.array([r["t_intended"] for r in answered]) - start).astype(int)
        latency = np.array([r["latency_ms"] for r in answered])
        admitted = np.array([bool(r["admitted"]) for r in answered], dtype=float)
        tau = np.array([np.nan if r.get("tau") is None else r["tau"] for r in answered], dtype=float)
        xs = np.unique(second)
        colour = _colour(run, i)
        sent = np.bincount(np.floor(np.array([r["t_intended"] for r in timed]) - start).astype(int))
        axes[0].plot(np.arange(sent.size), sent, color=colour, label=run.name)
        axes[1].plot(xs, [np.percentile(latency[second == x], 50) for x in xs], color=colour, label=f"{run.name} p50")
        axes[1].plot(xs, [np.percentile(latency[second == x], 95) for x in xs], color=colour, ls="--",
                     label=f"{run.name} p95")
        if not np.all(np.isnan(tau)):
            axes[2].plot(xs, [np.nanmean(tau[second == x]) for x in xs], color=colour, label=run.name)
        axes[3].plot(xs, [admitted[second == x].mean() for x in xs], color=colour, label=run.name)
    for ax, label in zip(axes, ("requests sent / s (load)", "latency ms (log)", "τ(t)", "admission rate")):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if warmup_s:
            ax.axvspan(0, warmup_s, color="#999999", alpha=0.15, lw=0)
    axes[1].set_yscale("log")
    # Decades only, written as plain numbers: matplotlib's default log ticks crowd the axis.
    axes[1].yaxis.set_major_locator(LogLocator(base=10, numticks=6))
    axes[1].yaxis.set_major_formatter(ScalarFormatter())
    axes[1].yaxis.set_minor_formatter(NullFormatter())
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7, ncol=2)
    title = "seconds since the run started"
    axes[-1].set_xlabel(title + (f" (shaded: warm-up, {warmup_s:.1f} s, excluded from the claims)" if warmup_s else ""))
    fig.suptitle("Load, latency, τ(t) and admission over time")
    return _png(fig)


def power_over_time(runs: list[Run]) -> bytes | None:
    """Average power of each energy window (and sampled GPU/CPU power where measured)."""
    if not any(r.windows for r in runs):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, run in enumerate(runs):
        # A window under half a second (the one closed at shutdown) gives no meaningful average.
        windows = [w for w in run.windows if w.get("energy_j") is not None and w["duration_s"] >= 0.5]
        if windows:
            power = [w["energy_j"] / w["duration_s"] for w in windows]
            t = np.cumsum([w["duration_s"] for w in windows])
            ax.step(t, power, where="post", color=_colour(run, i),
                    label=f"{run.name} ({windows[-1]['energy_source']})")
        for key in ("gpu_power_w", "cpu_power_w"):
            samples = [s for s in run.timeline if s.get(key) is not None]
            if samples:
                t0 = samples[0]["t_s"]
                ax.plot([s["t_s"] - t0 for s in samples], [s[key] for s in samples], color=_colour(run, i),
                        alpha=0.5, ls=":", label=f"{run.name} {key} (measured)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("power (W)")
    ax.set_title("Power over time (window averages; an estimate where labelled estimated)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def admission_accuracy(curve: dict | None, measured: list[tuple[str, float, float]]) -> bytes | None:
    """Accuracy loss against admission rate: the model's exit-threshold curve, the oracle bound,
    the measured bio runs and the paper's point."""
    if curve is None and not measured:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if curve is not None:
        ax.plot(curve["admission_rate"], curve["accuracy_loss_pp"], label=f"exit threshold sweep ({curve.get('measure', 'entropy')}, reference answers)")
        ax.scatter([curve["oracle_admission_rate"]], [0.0], marker="*", s=150, color="gold", edgecolor="k",
                   zorder=3, label="oracle (admit only where the exit head disagrees)")
    for name, admission, loss in measured:
        ax.scatter([admission], [loss], s=60, color="#2ca02c", zorder=3, label=f"measured: {name}")
    ax.scatter([PAPER_ADMISSION_RATE], [PAPER_ACCURACY_LOSS_PP], marker="x", s=80, color="red", zorder=3,
               label="paper (58 % admitted, 0.5 pp)")
    ax.axhline(PAPER_ACCURACY_LOSS_PP, color="red", lw=0.8, ls=":")
    ax.set_xlabel("admission rate (stage 2 runs)")
    ax.set_ylabel("accuracy loss vs full model (pp)")
    ax.set_title("Admission–accuracy trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def throughput_energy(figures: list[dict]) -> bytes | None:
    points = [f for f in figures if f["throughput_rps"] and f["energy_per_request_j"] is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, f in enumerate(points):
        ax.scatter([f["throughput_rps"]], [1e3 * f["energy_per_request_j"]], s=70,
                   color=COLOURS.get(f["scenario"], f"C{i}"))
        ax.annotate(f"{f['name']} ({f['energy_source']})", (f["throughput_rps"], 1e3 * f["energy_per_request_j"]),
                    fontsize=8, xytext=(5, 5), textcoords="offset points")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("energy per request (mJ)")
    ax.set_title("Throughput vs energy per request")
    ax.grid(alpha=0.3)
    return _png(fig)


def reference_tradeoff(reference: dict | None, measure: str = "entropy") -> dict | None:
    """The admission–accuracy curve over exit-uncertainty thresholds, from the run's reference
    answers (the exit and full answers and the exit uncertainty per evaluation row, computed
    during the run); None for a run recorded without them. No model is run here."""
    if not reference:
        return None
    y = np.asarray(reference["label"])
    full_pred = np.asarray(reference["full_predicted"])
    exit_pred = np.asarray(reference["exit_predicted"])
    u = np.asarray(reference["exit_u"].get(measure) or reference["exit_u"]["entropy"])
    full_accuracy = float((full_pred == y).mean())
    cuts = np.unique(np.concatenate([[-1.0], np.quantile(u, np.linspace(0, 1, 41))]))
    admission, loss = [], []
    for cut in cuts:
        admit = u > cut
        pred = np.where(admit, full_pred, exit_pred)
        admission.append(float(admit.mean()))
        loss.append(100 * (full_accuracy - float((pred == y).mean())))
    return {"admission_rate": admission, "accuracy_loss_pp": loss, "measure": measure,
            "oracle_admission_rate": float((exit_pred != full_pred).mean())}

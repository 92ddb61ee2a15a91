"""All plotting of bora_pyro (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def plot_training_curve(log: pd.DataFrame, path: Path, title: str = "") -> None:
    """Top: the training batches' perplexity and the validation perplexity (one log axis); bottom: the
    prior's (or KL's) share of the objective per training token. Logs written before the training NLL
    was logged apart show the whole objective per token instead."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(3, 1))
    if "train_ppl" in log:
        top.plot(log["step"], log["train_ppl"], color="tab:blue", lw=0.8, alpha=0.7, label="training batch")
        bottom.plot(log["step"], log["prior_per_token"], color="tab:green", lw=1)
        bottom.set_ylabel("prior / token")
    else:
        bottom.plot(log["step"], log["loss_per_token"], color="tab:blue", lw=1)
        bottom.set_ylabel("objective / token")
    evals = log.dropna(subset=["valid_ppl"])
    if not evals.empty:
        top.plot(evals["step"], evals["valid_ppl"], "o-", color="tab:red", label="validation (token-weighted)")
    top.set_yscale("log")
    top.set_ylabel("perplexity")
    top.legend()
    top.set_title(title)
    bottom.set_xlabel("step")
    _save(fig, path)


def _tau_positions(taus) -> tuple[dict[float, float], list[float], list[str]]:
    """x positions on a log axis for taus including 0 and inf (placed a decade beyond the finite ones)."""
    finite = sorted(t for t in taus if 0 < t < float("inf"))
    low, high = (finite[0], finite[-1]) if finite else (1.0, 1.0)
    pos = {t: (low / 10 if t == 0 else high * 10 if t == float("inf") else t) for t in taus}
    ticks = sorted(pos.values())
    names = {0.0: "0\n(indep.)", float("inf"): "∞\n(pooled)"}
    labels = [names.get(t, f"{t:g}") for t in sorted(taus)]
    return pos, ticks, labels


def _tau_axis(ax, taus) -> dict[float, float]:
    pos, ticks, labels = _tau_positions(taus)
    ax.set_xscale("log")
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels)
    ax.minorticks_off()
    ax.set_xlabel("prior precision τ")
    return pos


def plot_sweep_figures(
    out: Path, table: pd.DataFrame, per_task: pd.DataFrame, curves: pd.DataFrame, best: float, improvements: dict
) -> None:
    """The paper's Figures 1-5 for a tau sweep, plus validation curves, as PNG files in ``out``."""
    sizes = per_task.drop_duplicates("task").set_index("task")["n_train_tokens"].sort_values(ascending=False)

    fig, ax = plt.subplots(figsize=(8, 4))  # Figure 1: training size per task
    ax.bar(range(len(sizes)), sizes.values, color="tab:gray")
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels(sizes.index, rotation=60, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("training tokens (log scale)")
    ax.set_title("Figure 1: training data per task")
    _save(fig, out / "figure1.png")

    fig, ax = plt.subplots(figsize=(8, 5))  # Figure 2: perplexity vs tau
    pos = _tau_axis(ax, table.tau)
    for _, rows in per_task.groupby("task"):
        ax.plot([pos[t] for t in rows.tau], rows.test_ppl, color="tab:gray", lw=0.8, alpha=0.6)
    ax.plot(
        [pos[t] for t in table.tau], table.test_ppl, "o-", color="tab:blue", lw=2.5, label="overall (token-weighted)"
    )
    ax.plot([pos[t] for t in table.tau], table.test_macro_ppl, "s--", color="tab:orange", lw=2, label="task-macro")
    ax.plot([], [], color="tab:gray", lw=0.8, label="individual tasks")
    ax.axvline(pos[best], color="tab:green", ls=":", label=f"best τ on validation ({best:g})")
    ax.set_yscale("log")
    ax.set_ylabel("test perplexity (log scale)")
    ax.set_title("Figure 2: test perplexity against τ")
    ax.legend()
    _save(fig, out / "figure2.png")

    fig, ax = plt.subplots(figsize=(7, 5))  # Figure 3: relative improvement vs task size
    for (name, values), marker in zip(improvements.items(), ("o", "s")):
        if values is not None:
            ax.scatter(sizes.loc[values.index], 100 * values, marker=marker, label=f"τ={best:g} {name}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens of the task (log scale)")
    ax.set_ylabel("relative improvement in test perplexity (%)")
    ax.set_title("Figure 3: gain of the best τ by task size")
    if any(v is not None for v in improvements.values()):
        ax.legend()
    _save(fig, out / "figure3.png")

    fig, ax = plt.subplots(figsize=(7, 5))  # Figure 4: distance to Theta vs task size
    hier = per_task[(per_task.tau > 0) & (per_task.tau < float("inf"))]
    for tau, rows in hier.groupby("tau"):
        ax.plot(rows.n_train_tokens, rows.distance_to_global, "o", label=f"τ={tau:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens of the task (log scale)")
    ax.set_ylabel("‖θ_d − Θ‖₂ (log scale)")
    ax.set_title("Figure 4: how far each task's adapter moves from Θ")
    if not hier.empty:
        ax.legend()
    _save(fig, out / "figure4.png")

    fig, ax = plt.subplots(figsize=(7, 5))  # Figure 5: task size vs perplexity at the best tau
    rows = per_task[per_task.tau == best]
    ax.scatter(rows.n_train_tokens, rows.test_ppl, label=f"τ={best:g}")
    ax.scatter(rows.n_train_tokens, rows.base_test_ppl, marker="x", color="tab:gray", label="base model")
    for r in rows.itertuples():
        ax.annotate(r.task, (r.n_train_tokens, r.test_ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens of the task (log scale)")
    ax.set_ylabel("test perplexity (log scale)")
    ax.set_title(f"Figure 5: task size and perplexity at the best τ ({best:g})")
    ax.legend()
    _save(fig, out / "figure5.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))  # validation curves
    for tau, rows in curves.groupby("tau"):
        ax.plot(rows.step, rows.valid_ppl, "o-", ms=3, label=f"τ={tau:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity (token-weighted, log)")
    ax.set_title("Validation perplexity during training")
    ax.legend()
    _save(fig, out / "validation_curves.png")


def plot_seed_figures(out: Path, stats: pd.DataFrame, per_task: pd.DataFrame, gains: pd.DataFrame, best: float) -> None:
    """Figures 2 and 3 of a sweep over seeds, with error bars (mean ± sd over seeds)."""
    fig, ax = plt.subplots(figsize=(8, 5))  # Figure 2: perplexity vs tau
    pos = _tau_axis(ax, stats.tau)
    by_task = per_task.groupby(["task", "tau"]).test_ppl.mean().reset_index()
    for _, rows in by_task.groupby("task"):
        ax.plot([pos[t] for t in rows.tau], rows.test_ppl, color="tab:gray", lw=0.8, alpha=0.5)
    x = [pos[t] for t in stats.tau]
    for column, fmt, color, width, label in (
        ("test_ppl", "o-", "tab:blue", 2.5, "overall (token-weighted), mean ± sd"),
        ("test_macro_ppl", "s--", "tab:orange", 2, "task-macro, mean ± sd"),
    ):
        ax.errorbar(
            x,
            stats[f"{column}_mean"],
            yerr=stats[f"{column}_sd"],
            fmt=fmt,
            color=color,
            lw=width,
            capsize=4,
            label=label,
        )
    ax.plot([], [], color="tab:gray", lw=0.8, label="individual tasks (mean over seeds)")
    ax.axvline(pos[best], color="tab:green", ls=":", label=f"best τ on validation ({best:g})")
    ax.set_yscale("log")
    ax.set_ylabel("test perplexity (log scale)")
    ax.set_title(f"Figure 2: test perplexity against τ ({int(stats.seeds.max())} seeds)")
    ax.legend()
    _save(fig, out / "figure2.png")

    fig, ax = plt.subplots(figsize=(7, 5))  # Figure 3: relative gain vs task size
    for (column, label), marker in zip((("gain_over_0", "over τ=0"), ("gain_over_inf", "over τ=∞")), ("o", "s")):
        if f"{column}_mean" in gains:
            ax.errorbar(
                gains.n_train_tokens,
                100 * gains[f"{column}_mean"],
                yerr=100 * gains[f"{column}_sd"],
                fmt=marker,
                capsize=3,
                label=f"τ={best:g} {label}",
            )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens of the task (log scale)")
    ax.set_ylabel("relative improvement in test perplexity (%), mean ± sd")
    ax.set_title("Figure 3: gain of the best τ by task size")
    ax.legend()
    _save(fig, out / "figure3.png")


def _save(fig, path: Path) -> None:
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 120 rather than 1.2 x 10^2 on log axes
    for ax in fig.axes:
        if ax.get_yscale() == "log":
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tau_guide(samples: dict[str, np.ndarray], path: Path) -> Path:
    """Histogram of the VI guide's draws of each learned tau (log scale). Mean-field VI makes this far too
    narrow: the collapsed posterior (:func:`plot_collapsed_tau`) is the calibrated one."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for group, values in samples.items():
        ax.hist(np.log10(values), bins=20, alpha=0.6, label=f"τ ({group}): median {np.median(values):.3g}")
    ax.set_xlabel("log10 τ")
    ax.set_ylabel("guide draws")
    ax.set_title("Mean-field guide's τ (too narrow: see tau_posterior.png)")
    ax.legend()
    _save(fig, path)
    return path


def plot_collapsed_tau(frame: pd.DataFrame, path: Path, run_tau: float | str | None = None, title: str = "") -> Path:
    """The collapsed posterior density of log10 tau of each group (``frame``: tau_posterior.csv) with its 90%
    interval shaded, and the tau the run was fitted at."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for group, rows in frame.groupby("group", sort=False):
        x = np.log10(rows.tau.to_numpy())
        density = rows.density.to_numpy() * np.log(10)  # per unit of log10 tau
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(x))])
        cdf /= cdf[-1]
        low, mid, high = np.interp([0.05, 0.5, 0.95], cdf, x)
        (line,) = ax.plot(x, density, label=f"τ ({group}): {10**mid:.3g} [{10**low:.3g}, {10**high:.3g}]")
        inside = (x >= low) & (x <= high)
        ax.fill_between(x[inside], density[inside], alpha=0.25, color=line.get_color())
    if isinstance(run_tau, float) and 0 < run_tau < np.inf:
        ax.axvline(np.log10(run_tau), color="grey", linestyle="--", label=f"fitted at τ = {run_tau:g}")
    ax.set_xlabel("log10 τ")
    ax.set_ylabel("posterior density")
    ax.set_title(title or "Collapsed posterior of τ (median [90% interval])")
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


def plot_shrinkage(per_task: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Per task against its training tokens: kappa_d, the share of its adapter that comes from Theta (left),
    and p_eff,d, its effective number of own parameters (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    tokens = per_task.n_train_tokens.clip(lower=1)
    for ax, column, label in (
        (axes[0], "kappa", "κ_d: share of the adapter from Θ"),
        (axes[1], "p_eff", "p_eff,d: effective own parameters"),
    ):
        ax.plot(tokens, per_task[column], "o")
        for t, x, y in zip(per_task.task, tokens, per_task[column]):
            ax.annotate(str(t)[:12], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
    fig.suptitle(title or "Shrinkage per task")
    _save(fig, path)
    return path


def plot_guide_scales(log_ratios: np.ndarray, tasks, path: Path, title: str = "") -> Path:
    """Per task, a histogram of log10 (guide sd / its converged value 1/sqrt(lambda + tau)) over coordinates:
    0 is converged, left of log10 0.5 counts as not. Shapes: log_ratios [tasks, sample]."""
    fig, ax = plt.subplots(figsize=(7, 4))
    finite = log_ratios[np.isfinite(log_ratios)]
    bins = np.linspace(finite.min(initial=-3), max(finite.max(initial=0.5), 0.5), 50)
    for task, row in zip(tasks, log_ratios):
        ax.hist(row[np.isfinite(row)], bins=bins, histtype="step", density=True, label=str(task)[:16])
    ax.axvline(0, color="black", linewidth=1)
    ax.axvline(np.log10(0.5), color="grey", linestyle="--")
    ax.set_xlabel("log10 (guide sd / 1/sqrt(λ + τ))")
    ax.set_ylabel("share of coordinates (density)")
    ax.set_title(title or "Convergence of the guide's scales (0 = converged)")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    return path


def plot_distance_forest(frame: pd.DataFrame, path: Path) -> Path:
    """Per task, tasks ordered by training size: mean and 90% interval of ‖θ_d − Θ‖ over posterior
    draws (left) and, when given (``distance_of_mean``), the distance of the posterior-mean adapter
    (right). In high dimension a draw's distance is dominated by the posterior spread; the
    posterior mean's distance shows the shrinkage itself."""
    frame = frame.sort_values("train_tokens")
    two = "distance_of_mean" in frame
    fig, axes = plt.subplots(
        1, 2 if two else 1, figsize=(11 if two else 7, 0.35 * len(frame) + 1.5), sharey=True, squeeze=False
    )
    y = list(range(len(frame)))
    ax = axes[0, 0]
    ax.hlines(y, frame["low"], frame["high"], color="tab:blue")
    ax.plot(frame["mean"], y, "o", color="tab:blue")
    ax.set_yticks(y)
    ax.set_yticklabels([f"{t} ({n:,} tok)" for t, n in zip(frame.task, frame.train_tokens)])
    ax.set_xlabel("‖θ_d − Θ‖₂ of posterior draws (mean, 90% interval)")
    if two:
        axes[0, 1].plot(frame["distance_of_mean"], y, "o", color="tab:orange")
        axes[0, 1].set_xlabel("‖E[θ_d] − Θ‖₂ (posterior-mean adapter)")
    fig.suptitle("Shrinkage by task size (smallest task at the bottom)")
    _save(fig, path)
    return path


def plot_elbo_trace(steps, values, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, values, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("−ELBO per training token (minibatch estimate)")
    ax.set_title("ELBO trace")
    _save(fig, path)
    return path


def plot_gates(report: pd.DataFrame, path: Path, title: str = "") -> Path:
    """B-LoRA gates per transformer block and module type (cf. B-LoRA's Figure 2): learned effective
    rank (left; mean over tasks for per-task gates) and weight bit-width (right)."""
    modules = sorted(report["module"].unique())
    width = 0.8 / len(modules)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for k, module in enumerate(modules):
        rows = report[report["module"] == module].sort_values("block")
        x = rows["block"] + (k - (len(modules) - 1) / 2) * width
        axes[0].bar(x, rows["rank"], width=width, label=module)
        axes[1].bar(x, rows["weight_bits"], width=width, label=module)
    axes[0].set_ylabel("effective rank")
    axes[0].set_ylim(0, report["rank"].max() * 1.3)  # room for the legend
    axes[1].set_ylabel("weight bits")
    axes[1].set_yscale("log", base=2)
    axes[1].set_ylim(1, 128)
    axes[1].set_yticks([2, 4, 8, 16, 32], labels=["2", "4", "8", "16", "32"])
    for ax in axes:
        ax.set_xlabel("transformer block")
        ax.legend(loc="upper right", ncol=len(modules))
    axes[0].set_title(title)
    axes[1].set_title(f"relative BOPs {report['bops'].sum() / report['full_bops'].sum():.3f}")
    _save(fig, path)
    return path

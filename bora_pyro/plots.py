"""All plotting of bora_pyro (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_training_curve(log: pd.DataFrame, path: Path, title: str = "") -> None:
    """Training loss per token (left axis) and validation perplexity (right axis) against steps."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(log["step"], log["loss_per_token"], color="tab:blue", lw=1, label="train: -log posterior / token")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss per token (nats)", color="tab:blue")
    evals = log.dropna(subset=["valid_ppl"])
    if not evals.empty:
        right = ax.twinx()
        right.plot(evals["step"], evals["valid_ppl"], "o-", color="tab:red", label="validation perplexity")
        right.set_ylabel("validation perplexity (token-weighted)", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

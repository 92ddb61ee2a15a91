"""Held-out perplexity per task and overall (token-weighted and task-macro)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..data.batching import Batch, Split
from ..distributed import World
from ..nn.lora import Factors, TaskRows, rows_of

if TYPE_CHECKING:
    from ..models.bora import BoRA
from ..models.likelihood import lm_log_likelihood


@dataclass(frozen=True)
class PerplexityReport:
    """Summed log-likelihood and scored-token counts per task on one split.

    Shapes: loglik, tokens, docs: [tasks].
    """

    split: str
    tasks: tuple[str, ...]
    loglik: np.ndarray
    tokens: np.ndarray
    docs: np.ndarray
    seconds: float

    @property
    def scored(self) -> np.ndarray:
        """Whether each task has scored tokens in the split (a task may have no held-out documents). Shape: [tasks]."""
        return self.tokens > 0

    @property
    def per_task(self) -> np.ndarray:
        """exp(-loglik_d / tokens_d) for each task; NaN for a task without scored tokens. Shape: [tasks]."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.scored, np.exp(-self.loglik / np.maximum(self.tokens, 1)), np.nan)

    @property
    def token_weighted(self) -> float:
        """exp(- total log-likelihood / total tokens): every token counts the same (NaN: nothing scored)."""
        return float(np.exp(-self.loglik_per_token))

    @property
    def task_macro(self) -> float:
        """exp(- mean over the scored tasks of the per-token log-likelihood): every task counts the same."""
        if not self.scored.any():
            return float("nan")
        return float(np.exp(-np.mean(self.loglik[self.scored] / self.tokens[self.scored])))

    @property
    def loglik_per_token(self) -> float:
        """Log-likelihood per scored token (NaN: nothing scored)."""
        total = self.tokens.sum()
        return float(self.loglik.sum() / total) if total > 0 else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return float(self.tokens.sum() / self.seconds) if self.seconds > 0 else float("nan")

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"task": self.tasks, "docs": self.docs, "tokens": self.tokens, "perplexity": self.per_task})

    @classmethod
    def from_per_task_perplexity(cls, split: Split, perplexity: Sequence[float]) -> PerplexityReport:
        """The report of ``split`` whose per-task perplexities are known (e.g. the base model's, read from an
        earlier run on the same split). Shapes: perplexity [tasks]."""
        perplexity = np.asarray(perplexity, dtype=np.float64)
        if perplexity.shape != (len(split.tasks),):
            raise ValueError(f"need one perplexity per task ({len(split.tasks)}), got shape {perplexity.shape}")
        tokens = split.tokens_per_task()
        return cls(split.name, split.tasks, -np.log(perplexity) * tokens, tokens, split.docs_per_task(), 0.0)

    def summary(self) -> dict[str, float]:
        return {"token_weighted_ppl": self.token_weighted, "task_macro_ppl": self.task_macro}


@torch.inference_mode()
def document_log_likelihoods(
    log_likelihood: Callable[[Batch], torch.Tensor], split: Split, device: torch.device, batch_size: int = 16
) -> torch.Tensor:
    """log L of every document of ``split`` (in document order), scored once in length-bucketed
    batches with ``log_likelihood(batch) -> [batch]``. Shapes: -> [docs] (float64, CPU).

    Under data-parallel training every rank scores its share of the batches and the results are
    summed over ranks (every rank must call this)."""
    world = World.current()
    out = torch.zeros(len(split), dtype=torch.float64, device=device if world.active else "cpu")
    for i, batch in enumerate(split.eval_batches(batch_size)):
        if i % world.size == world.rank:
            out[batch.doc_index.to(out.device)] = log_likelihood(batch.to(device)).double().to(out.device)
    return world.sum(out).cpu()


def report_from_documents(split: Split, doc_loglik: torch.Tensor, seconds: float) -> PerplexityReport:
    """Sum per-document log-likelihoods ([docs]) and scored tokens by task."""
    num_tasks = len(split.tasks)
    task = torch.as_tensor(split.task_index, dtype=torch.long)
    loglik = torch.zeros(num_tasks, dtype=torch.float64).index_add_(0, task, doc_loglik)
    tokens = torch.as_tensor(split.tokens_per_task())
    return PerplexityReport(split.name, split.tasks, loglik.numpy(), tokens.numpy(), split.docs_per_task(), seconds)


def evaluate_log_likelihood(
    log_likelihood: Callable[[Batch], torch.Tensor], split: Split, device: torch.device, batch_size: int = 16
) -> PerplexityReport:
    """Score every document of ``split`` once with ``log_likelihood(batch) -> [batch]``."""
    start = time.perf_counter()
    doc_loglik = document_log_likelihoods(log_likelihood, split, device, batch_size)
    return report_from_documents(split, doc_loglik, time.perf_counter() - start)


def evaluate(
    bora: BoRA, split: Split, batch_size: int = 16, factors: Factors | TaskRows | None = None, base_model: bool = False
) -> PerplexityReport:
    """Perplexity of a fitted BoRA on a split (plug-in point estimate of every task's adapter).

    Args:
        factors: task factors to score instead of the fitted ones (e.g. loaded from a run folder): stacked
            [D, ...], or a function of task ids (``TaskRows``).
        base_model: score the bare base LM (no adapter), for reference.
    """
    if split.tasks != bora.tasks:
        raise ValueError(
            f"the split's tasks {list(split.tasks)[:5]}... differ from the model's {list(bora.tasks)[:5]}..."
        )
    if base_model:
        fn = lambda batch: lm_log_likelihood(bora.lora, None, batch)
    elif factors is None:
        fn = bora.plug_in_log_likelihood  # each batch's tasks' factors only: any number of tasks
    else:
        rows = rows_of(factors)

        def fn(batch: Batch) -> torch.Tensor:  # each batch's tasks' rows only
            tasks, local = torch.unique(batch.task_index, sorted=True, return_inverse=True)
            chunk = {k: v.to(bora.device) for k, v in rows(tasks.tolist()).items()}
            return bora.log_likelihood(chunk, batch.replace(task_index=local))

    return evaluate_log_likelihood(fn, split, bora.device, batch_size)

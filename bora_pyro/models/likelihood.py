"""The language-model likelihood: exact per-document sums of next-token log-probabilities."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..data.batching import IGNORE_INDEX, Batch
from ..nn.gates import LayerGates
from ..nn.lora import Factors, MultiTaskLoRA


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label token given the tokens before it; 0 where not scored.

    Shapes: logits [batch, tokens, vocab], labels [batch, tokens] -> [batch, tokens - 1].
    """
    batch, tokens, vocab = logits.shape
    target = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -nll.view(batch, tokens - 1)


def scored_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of scored (predicted) tokens per document. Shapes: [batch, tokens] -> [batch]."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def lm_logits(
    lora: MultiTaskLoRA, factors: Factors | None, batch: Batch, gates: Mapping[str, LayerGates] | None = None
) -> torch.Tensor:
    """Next-token logits of every example under its own task's factors, in ONE forward pass.

    ``factors`` are stacked per-task LoRA factors ([D, r, in] / [D, out, r], D = 1 for pooled);
    ``None`` runs the bare base model; ``gates``: B-LoRA gate values by layer. Shapes: -> [batch, tokens, vocab].
    """
    with lora.activate(factors, batch.task_index, gates), lora.autocast():
        return lora.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def lm_log_likelihood(
    lora: MultiTaskLoRA, factors: Factors | None, batch: Batch, gates: Mapping[str, LayerGates] | None = None
) -> torch.Tensor:
    """log L(doc | theta_task(doc)) for every document of the batch. Shapes: -> [batch]."""
    return token_log_probs(lm_logits(lora, factors, batch, gates), batch.labels).sum(-1)

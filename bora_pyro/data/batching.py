"""Tokenised document splits and mixed-task batches.

A :class:`Split` holds the tokenised documents of one split (train/valid/test) of all tasks.
Batches MIX tasks: every example carries its task index, and the model runs the whole batch
in one forward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .sampling import iid_batch_indices, importance_weights

IGNORE_INDEX = -100  # label value of tokens that are not scored (padding, prompt, first token)


@dataclass(frozen=True)
class Batch:
    """A padded batch of documents, possibly from several tasks.

    Shapes:
        input_ids, attention_mask, labels: [batch, tokens] (labels == -100 where not scored);
        task_index, doc_index: [batch]. ``num_docs`` is the number of documents of the split the
        batch was drawn from: the Pyro model scales the batch log-likelihood by num_docs / batch.
        docs_per_task: [tasks], the split's documents of each task (weights of the task-sparse prior
        estimate, see ``models.task_subsample``); None for a hand-made batch.
        step_task_index: [step batch], the task of every example of the whole step when this batch is one
        rank's shard of it (every rank then samples and weights the step's task sites alike); None: the
        batch is the whole step.
        task_weight: [tasks], the importance weight w_d = (n_d / N) / q_d of each task's documents under the
        step's task sampling (``data.sampling``): example b's log-likelihood carries (num_docs / batch) w_d, and
        the task-sparse prior estimate is reweighted alike; None: proportional sampling (every weight 1).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    task_index: torch.Tensor
    doc_index: torch.Tensor
    num_docs: int
    docs_per_task: torch.Tensor | None = None
    step_task_index: torch.Tensor | None = None
    task_weight: torch.Tensor | None = None

    def example_weight(self) -> torch.Tensor | None:
        """Each example's importance weight ``task_weight[task_index]`` (None: every weight 1). Shapes: -> [batch]."""
        return None if self.task_weight is None else self.task_weight[self.task_index]

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Batch(
            **{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
        )

    def replace(self, **fields) -> Batch:
        """The same batch with some fields replaced."""
        return dataclasses.replace(self, **fields)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def split(self, parts: int) -> list[Batch]:
        """The batch cut into ``parts`` consecutive micro-batches of near-equal size (gradient accumulation).
        Each keeps the step's tasks (``step_task_index``), so that its prior terms are the whole step's, and
        ``num_docs``, so that its likelihood is scaled to the split. Raises ValueError when a part would be
        empty."""
        if parts > len(self):
            raise ValueError(
                f"grad_accum={parts} micro-batches need at least {parts} documents per step (per process), "
                f"this step has {len(self)}: raise batch_size or lower grad_accum"
            )
        tasks = self.task_index if self.step_task_index is None else self.step_task_index
        rows = ("input_ids", "attention_mask", "labels", "task_index", "doc_index")
        out = []
        for index in torch.arange(len(self)).tensor_split(parts):
            sliced = {name: getattr(self, name)[index[0] : index[-1] + 1] for name in rows}
            out.append(self.replace(**sliced, step_task_index=tasks))
        return out


@dataclass(frozen=True)
class Split:
    """The tokenised documents of one split of a multi-task corpus.

    ``input_ids[i]`` is document i's token ids; ``labels[i]`` the same with unscored positions
    set to -100; ``task_index[i]`` its task (index into ``tasks``). A source document longer than the
    token budget becomes several documents here (its chunks) or is cut: ``source_docs`` counts the
    source documents used (one chunk or more of each), ``long_docs`` those that were longer than the budget,
    ``capped_docs`` those cut short by the per-task chunk cap of held-out splits (``max_eval_docs``: only
    their first chunks are kept), ``available_docs`` the split's source documents before the per-task caps
    (``max_train_docs`` / ``max_eval_docs``), ``prompt_cut_docs`` the examples whose prompt was cut from the
    left (or left out) so that their completion fits the token budget.
    """

    name: str
    tasks: tuple[str, ...]
    input_ids: tuple[tuple[int, ...], ...]
    labels: tuple[tuple[int, ...], ...]
    task_index: tuple[int, ...]
    pad_token_id: int
    source_docs: int | None = None
    long_docs: int = 0
    capped_docs: int = 0
    available_docs: int | None = None
    prompt_cut_docs: int = 0  # examples whose prompt was cut from the left (or dropped) to fit the token budget

    def __len__(self) -> int:
        return len(self.input_ids)

    def docs_per_task(self) -> np.ndarray:
        """Number of documents of each task. Shape: [tasks]."""
        return self._docs_per_task.numpy().copy()

    @cached_property
    def _docs_per_task(self) -> torch.Tensor:  # [tasks]
        return torch.bincount(torch.as_tensor(self.task_index, dtype=torch.long), minlength=len(self.tasks))

    def tokens_per_task(self) -> np.ndarray:
        """Number of scored tokens of each task. Shape: [tasks]."""
        counts = np.zeros(len(self.tasks), dtype=np.int64)
        for task, labels in zip(self.task_index, self.labels):
            counts[task] += sum(1 for t in labels if t != IGNORE_INDEX)
        return counts

    def subset(self, indices: Sequence[int]) -> Split:
        """The documents ``indices`` of this split, in that order (the same tasks; counts of source documents
        are not kept)."""
        pick = lambda values: tuple(values[i] for i in indices)
        return Split(
            self.name, self.tasks, pick(self.input_ids), pick(self.labels), pick(self.task_index), self.pad_token_id
        )

    def collate(self, indices: Sequence[int]) -> Batch:
        """Pad the given documents (right padding) into one batch."""
        width = max(len(self.input_ids[i]) for i in indices)
        n = len(indices)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, i in enumerate(indices):
            length = len(self.input_ids[i])
            input_ids[row, :length] = torch.tensor(self.input_ids[i])
            labels[row, :length] = torch.tensor(self.labels[i])
            mask[row, :length] = 1
        index = torch.as_tensor(list(indices), dtype=torch.long)
        tasks = torch.as_tensor([self.task_index[i] for i in indices], dtype=torch.long)
        return Batch(input_ids, mask, labels, tasks, index, len(self), self._docs_per_task)

    def train_batch_indices(
        self, batch_size: int, seed: int = 0, start_step: int = 0, temperature: float = 1.0
    ) -> Iterator[list[int]]:
        """Endless mixed-task batches of document indices. ``temperature`` 1 (proportional sampling): drawn
        uniformly, reshuffled every epoch; otherwise each example independently, its task with probability
        ∝ n_d^(1 / temperature) (inf: uniform over tasks), then one of the task's documents uniformly
        (``data.sampling``; weigh them with :meth:`task_weights`).

        Deterministic given ``seed``; ``start_step`` skips that many batches (for resuming).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if temperature != 1.0:
            yield from iid_batch_indices(
                np.asarray(self.task_index), len(self.tasks), batch_size, temperature, seed, start_step
            )
            return
        rng = np.random.default_rng(seed)
        order: list[int] = []
        step = 0
        while True:
            if len(order) < batch_size:
                order += rng.permutation(len(self)).tolist()
            chosen, order = order[:batch_size], order[batch_size:]
            if step >= start_step:
                yield chosen
            step += 1

    def task_weights(self, temperature: float = 1.0) -> torch.Tensor | None:
        """``Batch.task_weight`` of batches drawn by :meth:`train_batch_indices` at ``temperature`` (None at 1).
        Shapes: -> [tasks]."""
        return importance_weights(self.docs_per_task(), temperature)

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """All documents once, in batches of similar length (length bucketing cuts padding)."""
        by_length = sorted(range(len(self)), key=lambda i: (len(self.input_ids[i]), i))
        for start in range(0, len(by_length), batch_size):
            yield self.collate(by_length[start : start + batch_size])

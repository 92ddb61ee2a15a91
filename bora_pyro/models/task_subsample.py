"""The tasks of a minibatch: an unbiased, task-sparse estimate of the prior term.

The log joint is a sum over documents (their log-likelihoods) plus a sum over tasks (their prior
terms log N(theta_d; Theta, 1/tau)). A minibatch of B of the N training documents estimates the
first sum with weight N / B. The second sum is apportioned to the documents too: document i of task
d carries 1 / n_d of its task's prior term (n_d = training documents of task d), so that

    sum_d log p(theta_d | Theta)  ~=  sum_{d in batch} (N / B) (c_d / n_d) log p(theta_d | Theta)

with c_d the batch's documents of task d: unbiased (E[c_d] = B n_d / N) and touching only the tasks
present. Under another task sampling (``data.sampling``: task d drawn with probability q_d, each example
weighted by its task's importance weight w_d = (n_d / N) / q_d, ``Batch.task_weight``) the weight is
(N / B) (c_d w_d / n_d) = c_d / (B q_d), unbiased again (E[c_d] = B q_d).

The step costs the same for D = 1 or D = 1000 tasks: only the present tasks' factors are looked up,
evaluated and updated (``pyro.plate("tasks", D, subsample=present)``; the guides' parameters are indexed
by the plate). A batch that holds every training document gives the exact full prior (all weights 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine

from ..data.batching import Batch

TASK_PLATE = "tasks"


@dataclass(frozen=True)
class TaskSubsample:
    """The tasks present in a step's batch (a rank's shard: the whole step's, ``Batch.step_task_index``,
    so that every rank computes the same weighted prior terms and their average is the step's). Shapes: index [P]
    (ascending task ids), local [batch] (position of each example's task in ``index``), weight [P] (each
    task's prior-term weight)."""

    index: torch.Tensor
    local: torch.Tensor
    weight: torch.Tensor
    num_tasks: int

    @classmethod
    def of(cls, batch: Batch, num_tasks: int) -> TaskSubsample:
        """The tasks of the step and their weights (N / B) (c_d / n_d), times w_d under a task sampling
        other than proportional (B, c_d: the whole step's documents); needs ``batch.docs_per_task``."""
        if batch.docs_per_task is None:
            raise ValueError(
                "task subsampling needs batch.docs_per_task (the training documents of each task): "
                "collate batches with Split.collate"
            )
        if batch.docs_per_task.shape != (num_tasks,):
            raise ValueError(
                f"batch.docs_per_task has shape {tuple(batch.docs_per_task.shape)}, expected ({num_tasks},)"
            )
        step = batch.task_index if batch.step_task_index is None else batch.step_task_index  # [step batch]
        index, counts = torch.unique(step, sorted=True, return_counts=True)  # [P], [P]
        local = torch.searchsorted(index, batch.task_index)  # [batch]
        if not torch.equal(index[local.clamp(max=index.numel() - 1)], batch.task_index):
            raise ValueError("batch.step_task_index must hold the task of every example of the batch")
        weight = batch.num_docs / step.numel() * counts / batch.docs_per_task[index]
        if batch.task_weight is not None:
            weight = weight * batch.task_weight[index]
        return cls(index, local, weight.to(torch.get_default_dtype()), num_tasks)

    @classmethod
    def rows(cls, index: torch.Tensor, num_tasks: int) -> TaskSubsample:
        """The tasks ``index`` ([P] ascending ids) with weight 1: to look up some tasks' rows, not to train."""
        return cls(
            index, torch.arange(len(index), device=index.device), torch.ones(len(index), device=index.device), num_tasks
        )

    def plate(self) -> TaskPlate:
        """The task plate over the present tasks, each site scaled by its task's weight."""
        return TaskPlate(self)


class TaskPlate(pyro.plate):
    """``pyro.plate("tasks", D, subsample=present)`` that carries the present tasks' prior-term weights
    [P]. Entered through :func:`enter_plate` (by the model and, through ``create_plates``, by the guide),
    its sites are scaled by those weights instead of the uniform subsampling factor D / P: both scale the
    task sites alike (what the ELBO's KL terms need)."""

    def __init__(self, subsample: TaskSubsample) -> None:
        super().__init__(TASK_PLATE, subsample.num_tasks, subsample=subsample.index, dim=-1)
        self.index, self.weight = subsample.index, subsample.weight  # [P], [P]


@contextlib.contextmanager
def enter_plate(plate: pyro.plate) -> Iterator[None]:
    """Enter ``plate``. A :class:`TaskPlate` also scales its sites by ``weight * P / D`` (``poutine.scale``),
    which with the plate's own subsampling factor D / P gives each present task's sites its weight."""
    with plate:
        if not isinstance(plate, TaskPlate):
            yield
            return
        with poutine.scale(scale=plate.weight * (plate.subsample_size / plate.size)):
            yield

"""Data-parallel training on ``torch.distributed`` (gloo on CPU, nccl on GPU), launched by
``torchrun`` or ``accelerate launch``.

Every rank holds the whole model and the same parameters. Each global batch (the single-process
batch of ``batch_size`` documents) is cut into ``world_size`` equal shards; rank r runs the
Pyro objective on shard r, whose likelihood Pyro scales by num_docs / shard size. Averaging the
ranks' gradients (``all_reduce``) then gives exactly the gradient of the single-process objective

    mean_r [ log prior + (N / b) sum_{shard r} log L ] = log prior + (N / B) sum_{batch} log L,

so the optimiser steps, and the parameters, are those of one process on the same global batches. Under a
task sampling other than proportional every rank weights its examples by the same per-task importance
weights (``Batch.task_weight``) and the step's task-sparse prior terms from the whole step's tasks
(``Batch.step_task_index``), so the same holds with (N / b) w_d in place of N / b.
Evaluation scores a share of the batches on each rank and sums the per-document results.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` data-parallel processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> World:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.size:
            raise ValueError(
                f"batch_size {batch_size} must be a multiple of the number of processes ({self.size}): "
                "each process takes an equal share of every global batch"
            )

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's contiguous equal share of a global batch's document indices."""
        share = len(indices) // self.size
        return list(indices[self.rank * share : (self.rank + 1) * share])

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Replace every gradient by its mean over ranks (one all_reduce over a flat buffer). Row-sparse
        gradients of the task parameters hold the same rows on every rank (the step's tasks): their
        values are averaged."""
        if not self.active:
            return
        for p in params:  # a row-sparse gradient's values are written in place below: coalesced, they are a view
            if p.grad is not None and p.grad.is_sparse and not p.grad.is_coalesced():
                p.grad = p.grad.coalesce()
        grads = [p.grad.values() if p.grad.is_sparse else p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over ranks (in place; returned for chaining)."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor


def init_distributed() -> World:
    """Join the process group described by torchrun's / accelerate's environment variables
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): nccl when CUDA is available, else gloo."""
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "--distributed needs a launcher: run under 'torchrun --nproc_per_node N ...' "
            "or 'accelerate launch ...' (WORLD_SIZE is not set)"
        )
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return World.current()

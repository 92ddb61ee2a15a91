"""AdamW that updates only the tasks present in a batch.

With task subsampling (``models.task_subsample``) a step's loss involves only the tasks of its
batch; every other task's rows of the guide's [D, ...] parameters get a zero gradient. Dense
AdamW would still read and write all D rows of the parameters and both moment buffers (at D = 1000
on SmolLM2 that is 3 x 1.8 GB per step, 2.9 s on a 2-core CPU) and would keep moving absent tasks
with stale momentum. This optimizer steps only the given rows of the task parameters, each row
with its own step count for the bias correction: the semantics of one AdamW per task adapter,
stepped when the task has a gradient (as PyTorch skips a PEFT adapter whose ``grad`` is None).
Parameters without a task dimension (Theta, a learned tau's guide) are stepped densely, as AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..io.faults import crash_point
from ..io.task_store import TaskStore


def grad_rows(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` ([P], ascending) of a dense or row-sparse (COO) gradient, dense. -> [P, ...]."""
    if not grad.is_sparse:
        return grad.index_select(0, rows)
    grad = grad.coalesce()
    out = grad.values().new_zeros((rows.numel(), *grad.shape[1:]))
    where = torch.searchsorted(rows, grad.indices()[0])
    if not torch.equal(rows[where.clamp(max=rows.numel() - 1)], grad.indices()[0]):
        raise ValueError("a row-sparse gradient has rows outside the rows being stepped")
    return out.index_copy_(0, where, grad.values())


def _adamw_(
    x: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One in-place AdamW update of ``x`` (PyTorch's rule). ``t`` (the step count, after increment)
    broadcasts against ``x``: 0-dim, or [rows, 1, ...] for per-row counts."""
    beta1, beta2 = betas
    x.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    t = t.double()  # 1 - 0.999**t in float32 loses ~1e-4 relative (cancellation); PyTorch uses doubles
    bias1, bias2 = (1 - beta1**t).to(x.dtype), (1 - beta2**t).sqrt().to(x.dtype)
    x.addcdiv_(m / bias1, (v.sqrt() / bias2).add_(eps), value=-lr)


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_dense() if grad.is_sparse else grad


class TaskSparseAdamW(torch.optim.Optimizer):
    """AdamW whose ``task_params`` (first dimension = task) are stepped only on given rows.

    ``step(rows)``: rows [P] (task ids) or None for every row. Gradients may be dense or row-sparse
    (COO, from ``guides.gather_rows``; their rows must be among ``rows``). State per parameter: ``exp_avg``,
    ``exp_avg_sq`` and ``step`` ([D] per-row counts for task parameters, 0-dim otherwise), all
    tensors (checkpointed as safetensors); with a ``store``, a task parameter's moments are its tables
    (in memory or memory-mapped files, see ``io/task_store.py``).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        task_params: Iterable[torch.Tensor] = (),
        store: TaskStore | None = None,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self._task_params = {id(p): i for i, p in enumerate(task_params)}
        self._store = store

    def _rows_of(self, p: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor | None:
        """``rows`` on ``p``'s device for a task parameter (a disk store's table is in host memory), else None."""
        return rows.to(p.device) if rows is not None and id(p) in self._task_params else None

    def _grads(self, rows: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [
            (p, self._rows_of(p, rows)) for group in self.param_groups for p in group["params"] if p.grad is not None
        ]

    @torch.no_grad()
    def grad_norm(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The global 2-norm of the gradients that :meth:`step` with these ``rows`` uses. -> []."""
        grads = self._grads(rows)
        if not grads:
            return torch.zeros(())
        device = grads[0][0].device if rows is None else rows.device  # the model's: a disk table's may differ
        norms = [
            torch.linalg.vector_norm(_dense(p.grad) if r is None else grad_rows(p.grad, r)).to(device) for p, r in grads
        ]
        return torch.linalg.vector_norm(torch.stack(norms))

    @torch.no_grad()
    def clip_grad_norm_(
        self, max_norm: float, rows: torch.Tensor | None = None, total: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scale the gradients that :meth:`step` with these ``rows`` uses so that their global 2-norm is
        at most ``max_norm`` (as ``torch.nn.utils.clip_grad_norm_``); returns the norm before clipping
        (``total``: that norm, if already computed by :meth:`grad_norm`)."""
        total = self.grad_norm(rows) if total is None else total
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p, r in self._grads(rows):
            scale = coef.to(p.device)
            if r is None or p.grad.is_sparse:
                p.grad = p.grad * scale
            else:
                p.grad.index_copy_(0, r, p.grad.index_select(0, r) * scale)
        return total

    def task_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fresh state of the task parameter ``p``: with a disk store, its moments are the store's tables
        (reopened on their files when resuming)."""
        return self._new_state(p, True)

    def _new_state(self, p: torch.Tensor, task: bool) -> dict[str, torch.Tensor]:
        """Zero moments and step counts; a task parameter's moments are tables of the task store, if any."""
        if task and self._store is not None:
            i = self._task_params[id(p)]
            return {
                "step": torch.zeros(p.shape[0], device=p.device),
                **{
                    k: self._store.table(f"adamw.{i}.{k}", tuple(p.shape), device=p.device)
                    for k in ("exp_avg", "exp_avg_sq")
                },
            }
        return {
            "step": torch.zeros(p.shape[0] if task else (), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }

    @torch.no_grad()
    def step(self, rows: torch.Tensor | None = None) -> None:  # type: ignore[override]
        """Update every parameter with a gradient; task parameters only on ``rows`` ([P] task ids; None: all).
        A disk task store records those rows before they change (see ``io/task_store.py``)."""
        if self._store is not None and self._store.disk:
            if rows is None:
                raise ValueError("a disk task store needs the rows a step changes (task subsampling)")
            self._store.before_write(rows)
        for group in self.param_groups:
            options = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                task = id(p) in self._task_params
                if not state:
                    state.update(self._new_state(p, task))
                r = self._rows_of(p, rows)
                if r is None:
                    state["step"] += 1
                    t = state["step"].reshape(-1, *([1] * (p.dim() - 1))) if task else state["step"]
                    _adamw_(p, _dense(p.grad), state["exp_avg"], state["exp_avg_sq"], t, **options)
                    continue
                state["step"].index_add_(0, r, torch.ones_like(r, dtype=torch.float32))
                x, m, v = (s.index_select(0, r) for s in (p, state["exp_avg"], state["exp_avg_sq"]))
                t = state["step"].index_select(0, r).reshape(-1, *([1] * (p.dim() - 1)))
                _adamw_(x, grad_rows(p.grad, r), m, v, t, **options)
                for target, rows_value in ((p, x), (state["exp_avg"], m), (state["exp_avg_sq"], v)):
                    target.index_copy_(0, r, rows_value)
                    crash_point("store.rows-written")
        if self._store is not None and self._store.disk:
            self._store.release()

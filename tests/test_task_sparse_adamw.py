"""TaskSparseAdamW: AdamW on the rows of the tasks present, one AdamW per task's rows."""

import pytest
import torch

from bora_pyro.inference.task_sparse_adamw import TaskSparseAdamW

STEPS_ROWS = [[0, 2], [1], [0], [0, 1, 2], [2]]


def gradients(step: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + step))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_all_rows_equals_torch_adamw(weight_decay):
    g = torch.Generator().manual_seed(0)
    task, shared = torch.randn(3, 4, 5, generator=g), torch.randn(6, generator=g)
    mine = [task.clone().requires_grad_(), shared.clone().requires_grad_()]
    theirs = [task.clone().requires_grad_(), shared.clone().requires_grad_()]
    ours = TaskSparseAdamW(mine, lr=0.05, weight_decay=weight_decay, task_params=[mine[0]])
    torch_opt = torch.optim.AdamW(theirs, lr=0.05, weight_decay=weight_decay)
    for step in range(4):
        for params in (mine, theirs):
            for i, p in enumerate(params):
                p.grad = gradients(10 * step + i, p.shape)
        ours.step()
        torch_opt.step()
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_rows_step_only_present_tasks_each_as_its_own_adamw():
    """Absent rows stay bit-identical; each row evolves as a torch AdamW of that row alone stepped only
    when its task is present (its own step count in the bias correction)."""
    start = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1))
    param = start.clone().requires_grad_()
    ours = TaskSparseAdamW([param], lr=0.05, weight_decay=0.1, task_params=[param])
    alone = [start[d].clone().requires_grad_() for d in range(3)]
    per_task = [torch.optim.AdamW([p], lr=0.05, weight_decay=0.1) for p in alone]
    for step, rows in enumerate(STEPS_ROWS):
        grad = torch.zeros_like(param)
        grad[rows] = gradients(step, (len(rows), 4, 5))
        before = param.detach().clone()
        param.grad = grad
        ours.step(torch.tensor(rows))
        absent = [d for d in range(3) if d not in rows]
        assert torch.equal(param.detach()[absent], before[absent])
        for d in rows:
            alone[d].grad = grad[d].clone()
            per_task[d].step()
    for d in range(3):
        torch.testing.assert_close(param.detach()[d], alone[d].detach(), rtol=1e-6, atol=1e-7)


def test_clipping_on_rows_matches_torch_on_the_present_rows():
    param = torch.zeros(4, 3, requires_grad=True)
    shared = torch.zeros(2, requires_grad=True)
    opt = TaskSparseAdamW([param, shared], task_params=[param])
    grad = gradients(0, (4, 3)) * 10
    param.grad, shared.grad = grad.clone(), torch.tensor([3.0, -4.0])
    rows = torch.tensor([1, 3])
    reference = [grad[rows].clone().requires_grad_(), torch.tensor([3.0, -4.0], requires_grad=True)]
    reference[0].grad, reference[1].grad = grad[rows].clone(), torch.tensor([3.0, -4.0])
    norm = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    total = opt.clip_grad_norm_(1.0, rows)
    torch.testing.assert_close(total, norm)
    torch.testing.assert_close(param.grad[rows], reference[0].grad)
    torch.testing.assert_close(shared.grad, reference[1].grad)
    torch.testing.assert_close(param.grad[[0, 2]], grad[[0, 2]])  # absent rows untouched


def test_row_sparse_gradients_step_and_clip_like_dense_ones():
    from bora_pyro.models.guides import gather_rows

    start = torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(4))
    rows = torch.tensor([1, 4])
    weights = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(5))
    params, opts = [], []
    for gather in (gather_rows, lambda full, index: full.index_select(0, index)):
        p = start.clone().requires_grad_()
        opt = TaskSparseAdamW([p], lr=0.1, task_params=[p])
        (gather(p, rows) * weights).sum().backward()
        params.append(p), opts.append(opt)
    assert params[0].grad.is_sparse and not params[1].grad.is_sparse
    torch.testing.assert_close(params[0].grad.to_dense(), params[1].grad)
    norms = [opt.clip_grad_norm_(0.5, rows) for opt in opts]
    torch.testing.assert_close(norms[0], norms[1])
    for opt in opts:
        opt.step(rows)
    torch.testing.assert_close(params[0].detach(), params[1].detach())
    assert torch.equal(params[0].detach()[[0, 2, 3]], start[[0, 2, 3]])

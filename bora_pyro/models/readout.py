"""Read-outs of a fitted BoRA model used by export and scoring: the tasks' factors with the gates folded in, in
chunks of tasks (never every adapter at once), and each task's distance to Theta."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .bora import BoRA


def export_factors(bora: BoRA, tasks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``bora.task_factors`` with the inference gates folded in (closed rank columns of B zeroed, A and B at their
    learned precision): what a plain LoRA layer needs to compute the gated adapter. ``tasks``: only these tasks'
    rows ([P] ascending ids). Shapes: -> name -> [D or P, *shape]."""
    factors = bora.task_factors(tasks=tasks)
    gates = bora.gate_values(tasks)
    return factors if gates is None else bora.gates.fold(factors, gates)


def iter_task_factors(bora: BoRA, chunk: int = 256, export: bool = False) -> Iterator[tuple[torch.Tensor, dict]]:
    """The tasks' factors in chunks of ``chunk`` tasks, never all at once: (task ids [P], name -> [P, ...]);
    ``export``: with the gates folded in (:func:`export_factors`)."""
    for start in range(0, len(bora.tasks), chunk):
        tasks = torch.arange(start, min(start + chunk, len(bora.tasks)), device=bora.device)
        yield tasks, (export_factors(bora, tasks) if export else bora.task_factors(tasks=tasks))


@torch.no_grad()
def distance_to_global(bora: BoRA) -> torch.Tensor | None:
    """||theta_d - Theta||_2 over all factors of each task (in chunks of tasks). Shapes: -> [D]; None if
    independent."""
    theta = bora.global_factors()
    if theta is None:
        return None
    parts = [sum(((f[n] - theta[n]) ** 2).flatten(1).sum(1) for n in theta) for _, f in iter_task_factors(bora)]
    return torch.cat(parts).sqrt()

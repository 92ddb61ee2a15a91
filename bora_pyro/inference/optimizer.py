"""The optimizer of a fit and how it treats each parameter: per-task rows stepped only on the batch's tasks, and the
fast parameters (guide scales, a learned tau, gates) at the guide's rate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pyro
import torch

from ..io.task_store import TaskStore
from ..models.bora import BoRA
from ..models.guides import guide_parameters, task_sites
from .config import TrainConfig
from .task_sparse_adamw import TaskSparseAdamW


@dataclass(frozen=True)
class ParameterRole:
    """How the optimiser treats a parameter: ``per_task``: one row per task ([D, ...]), stepped only on
    the batch's tasks; ``fast``: learns at the guide's rate (scales, a learned tau, gates)."""

    per_task: bool
    fast: bool


def parameter_roles(bora: BoRA) -> dict[str, ParameterRole]:
    """The role of every parameter of ``bora``'s set-up model and guide, by param-store name, found from their
    structure: the guide's parameters of the sites under the task plate have one row per task; scales, and the
    parameters of sites that are not LoRA weights (a learned tau), learn at the guide's rate, as the gates'
    log-alphas do (per-task rank gates have a row per task); Theta is a plain weight."""
    with bora.param_scope():
        names = {id(p): n for n, p in pyro.get_param_store().named_parameters()}
        roles = dict.fromkeys(names.values(), ParameterRole(per_task=False, fast=False))
        per_task = task_sites(bora.guide)
        weights = per_task | set(bora.prior.global_sites())
        for site, kind, tensor in guide_parameters(bora.guide):
            roles[names[id(tensor)]] = ParameterRole(site in per_task, kind == "scale" or site not in weights)
        for name, rows in ({} if bora.gates is None else bora.gates.parameter_layout()).items():
            if name in roles:
                roles[name] = ParameterRole(per_task=rows, fast=True)
    return roles


def make_optimizer(
    params: dict[str, torch.Tensor],
    roles: Mapping[str, ParameterRole],
    lr: float,
    config: TrainConfig,
    store: TaskStore | None = None,
) -> TaskSparseAdamW | None:
    """AdamW (:class:`TaskSparseAdamW`: the per-task parameters stepped only on the batch's tasks) with two
    groups: the LoRA weights at ``lr``, the fast parameters (guide scales, a learned tau, gates; see
    :func:`parameter_roles`) at ``config.guide_lr``. Each group remembers its base rate in ``base_lr``."""
    groups = [
        {"params": [p for n, p in params.items() if roles[n].fast == fast], "base_lr": rate}
        for fast, rate in ((False, lr), (True, config.guide_lr))
    ]
    groups = [g for g in groups if g["params"]]
    task_params = [p for n, p in params.items() if roles[n].per_task]
    if not groups:
        return None
    return TaskSparseAdamW(groups, lr=lr, weight_decay=config.weight_decay, task_params=task_params, store=store)

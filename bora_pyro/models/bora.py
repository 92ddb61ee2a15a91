"""BoRA: the Pyro model of Bayesian hierarchical multi-task LoRA.

    log p(theta, Theta | data) = sum_d [ log L(D_d | theta_d) + log N(theta_d; Theta, 1/tau) ] + C

``BoRA.model(batch)`` samples the task factors under :class:`HierarchicalPrior` and adds the
minibatch log-likelihood as ``pyro.factor("loglik", ...)`` inside
``pyro.plate("docs", num_docs, subsample=batch.doc_index)``, which scales it by num_docs / batch (times
each example's importance weight under a task sampling other than proportional, ``Batch.task_weight``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

import pyro
import torch
from pyro import poutine
from torch import nn

from ..data.batching import Batch
from ..data.task_names import check_task_names
from ..io.task_store import TaskStore
from ..nn.gates import LayerGates
from ..nn.lora import Factors, MultiTaskLoRA
from .adapter import AdapterConfig
from .gates import GateConfig, Gates
from .guides import guide_parameters, make_guide, take_rows
from .likelihood import lm_log_likelihood, lm_logits
from .prior import INDEPENDENT, LEARN, POOLED, HierarchicalPrior, PriorConfig
from .task_subsample import TASK_PLATE, TaskSubsample
from .tau_prior import TAU_SITE

LogLikelihood = Callable[[Factors, Batch], torch.Tensor]  # (task factors, batch) -> [batch]


def check_inference(tau: float | str, inference: str, fitting: bool = True) -> None:
    """Refuse an inference that has no proper target at this tau: a MAP of a learned tau (degenerate), and,
    when ``fitting``, VI at tau = 0 (an improper posterior; a run folder of one, fitted before this check
    existed, still loads)."""
    if tau == LEARN and inference == "map":
        raise ValueError(
            "tau='learn' needs inference='vi' (CLI: --inference vi): the MAP of a hierarchical precision is "
            "degenerate, the posterior density grows without bound as every task collapses onto Theta and "
            "tau -> inf"
        )
    if fitting and tau == 0 and inference == "vi":
        raise ValueError(
            "inference='vi' needs tau > 0 (CLI: --tau T with T > 0, or --tau learn): at tau = 0 the task sites "
            "have a flat prior and LoRA's symmetry (A -> M A, B -> B M^-1 leaves B A unchanged) makes their "
            "posterior improper, so there is no distribution to approximate; use --inference map for "
            "independent adapters"
        )


class BoRA:
    """Bayesian hierarchical multi-task LoRA over a frozen Hugging Face causal LM.

    Args:
        lm: the base causal LM; its target layers are wrapped in place, its weights frozen.
        tasks: task names (the order defines task indices).
        rank, alpha: LoRA rank r and scaling numerator (the update is scaled by alpha / r).
        tau: prior precision; 0 = independent tasks, ``float("inf")`` = one pooled adapter, "learn"; a
            shortcut for ``prior=PriorConfig(tau=tau)`` (default 100).
        targets: the layers to adapt, as PEFT's target_modules (names matched as module-path suffixes,
            "all-linear", or a regular expression on the full path; default by model type, e.g. q_proj, v_proj).
        lora_dropout: PEFT's dropout on the input of each LoRA branch, in training steps only.
        inference: "map" (AutoDelta guide, the paper's estimate) or "vi" (mean-field Normal).
        prior: the hierarchical prior (:class:`PriorConfig`: tau, parameterisation, tau's hyperprior, Theta's prior).
        gates: B-LoRA rank and precision gates (:class:`GateConfig`; default none).
        log_likelihood: optional replacement of the LM likelihood, ``fn(task_factors, batch) -> [batch]``.
        seed: seed of the LoRA initialisation.
        init: Theta's start (and every task's), e.g. a fitted Theta to adapt new tasks to; default the
            standard LoRA start (A Kaiming-uniform from ``seed``, B zero).
        task_subsampling: True (default): a step looks up, evaluates and updates only the tasks present
            in its batch, their prior terms weighted to an unbiased estimate of the full prior
            (see ``models.task_subsample``; a step costs the same for any number of tasks); False: every
            task's prior term at every step.
        task_store: where the MAP guide's task rows and their optimizer moments live (default in memory; a
            disk store memory-maps them, for many tasks: see ``io/task_store.py``).
        guide_init_scale: the start of a VI guide's scales (of every unconstrained latent site).
        adapter: the LoRA settings above (rank, alpha, targets, lora_dropout, inference, guide_init_scale,
            task_subsampling) as one :class:`AdapterConfig`, instead of the keywords; its ``task_store`` choice
            is the run's (pass ``task_store=`` for a store here).

    The model's parameters (Theta and the guide's) live in this object's own Pyro param-store
    scope: run ``bora.model`` / ``bora.guide`` inside ``with bora.param_scope():`` to use them.
    """

    def __init__(
        self,
        lm: nn.Module,
        tasks: Sequence[str],
        rank: int = 8,
        alpha: float = 16.0,
        tau: float | str | None = None,
        targets: Sequence[str] | str | None = None,
        inference: str = "map",
        prior: PriorConfig | None = None,
        gates: GateConfig | None = None,
        log_likelihood: LogLikelihood | None = None,
        seed: int = 0,
        init: Mapping[str, torch.Tensor] | None = None,
        task_subsampling: bool = True,
        task_store: TaskStore | None = None,
        guide_init_scale: float = 1e-3,
        lora_dropout: float = 0.0,
        adapter: AdapterConfig | None = None,
    ) -> None:
        if prior is not None and tau is not None:
            raise ValueError(f"give tau={tau!r} or prior=PriorConfig(tau=...), not both")
        shortcuts = dict(rank=rank, alpha=alpha, targets=targets, inference=inference, lora_dropout=lora_dropout)
        shortcuts.update(task_subsampling=task_subsampling, guide_init_scale=guide_init_scale)
        if adapter is not None:
            given = [k for k, v in shortcuts.items() if v != getattr(AdapterConfig(), k)]
            if given:
                raise ValueError(f"give adapter=AdapterConfig(...) or the keywords {given}, not both")
            if adapter.init_peft is not None:
                raise ValueError("adapter.init_peft is a run's setting: pass init=import_peft(...) to BoRA instead")
        a = adapter or AdapterConfig(**shortcuts)
        prior = prior or PriorConfig(**({} if tau is None else {"tau": tau}))
        tasks = tuple(str(t) for t in tasks)
        check_task_names(tasks, "BoRA")
        self.tasks = tasks
        self.lora = MultiTaskLoRA(lm, rank=a.rank, alpha=a.alpha, targets=a.targets, dropout=a.lora_dropout)
        self.prior = HierarchicalPrior(
            self.lora.shapes(), len(tasks), prior.tau, prior.parameterization, prior.hyperprior(), prior.global_scale()
        )
        self.init = self.lora.init_factors(torch.Generator().manual_seed(seed))
        self.task_subsampling = a.task_subsampling
        self.task_store = task_store or TaskStore()
        gates = gates or GateConfig()
        if gates.enabled and log_likelihood is not None:
            raise ValueError(
                "gates act on the language model's LoRA layers: they cannot be combined with a custom log_likelihood"
            )
        self.gates = Gates(gates, self.lora.adapted, a.rank, len(tasks)) if gates.enabled else None
        self.guide_init_scale = a.guide_init_scale
        self.log_likelihood: LogLikelihood = log_likelihood or self._lm_log_likelihood
        self._store = {"params": {}, "constraints": {}}
        self._scope_active = False
        self.inference = a.inference
        self.guide = self._make_guide(a.inference)
        if init is not None:
            self.start_from(init)

    def use_task_store(self, store: TaskStore) -> None:
        """Keep the task tables in ``store`` from now on (a fresh guide; forgets anything fitted so far)."""
        self.task_store = store
        with self.param_scope():
            pyro.get_param_store().clear()
        self.guide = self._make_guide(self.inference)

    def start_from(self, init: Mapping[str, torch.Tensor]) -> None:
        """Make ``init`` (name -> [*shape], every factor) the start of Theta and of every task, e.g. a
        fitted Theta or an imported PEFT adapter. Forgets anything fitted so far."""
        if set(init) != set(self.init) or any(tuple(init[k].shape) != tuple(v.shape) for k, v in self.init.items()):
            raise ValueError("init must give every factor of the adapted layers with its per-task shape")
        self.init = {k: init[k].detach().to(v).clone() for k, v in self.init.items()}
        with self.param_scope():
            pyro.get_param_store().clear()
        self.guide = self._make_guide(self.inference)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted parameters (Theta, the guide's, the gates'), unconstrained, by Pyro parameter name;
        copies on the CPU (what a run folder saves to complete or continue it later). The tables of a disk
        task store are left out: their files are the saved state."""
        with self.param_scope():
            params = pyro.get_param_store().named_parameters()
            return {name: p.detach().cpu().clone() for name, p in params if not self.task_store.holds(p)}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor], example_batch: Batch) -> None:
        """Set :meth:`state_dict` values: the guide and model are run once on ``example_batch`` to create
        their parameters, whose values are then replaced. Raises naming missing or unexpected names."""
        with self.param_scope():
            pyro.get_param_store().clear()
            with torch.enable_grad():
                guide_trace = poutine.trace(self.guide).get_trace(example_batch)
                poutine.replay(self.model, trace=guide_trace)(example_batch)
            params = {n: p for n, p in pyro.get_param_store().named_parameters() if not self.task_store.holds(p)}
            if set(params) != set(state):
                missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
                raise ValueError(
                    f"saved parameters do not match this model: missing {missing[:3]}, unexpected {extra[:3]}"
                )
            for name, param in params.items():
                param.copy_(state[name])

    @property
    def tau(self) -> float | str:
        """The fixed precision, or "learn"."""
        return self.prior.tau

    @property
    def mode(self) -> str:
        return self.prior.mode

    @property
    def device(self) -> torch.device:
        return self.lora.device

    def use_inference(self, inference: str) -> None:
        """Replace the guide (and forget its fitted values) by a fresh "map" or "vi" guide; the model's own
        parameters (Theta, gates) are kept."""
        old = self.guide
        self.guide = self._make_guide(inference)
        self.inference = inference
        if old.prototype_trace is None:  # never run: it has no parameters
            return
        ids = {id(tensor) for _, _, tensor in guide_parameters(old)}
        with self.param_scope():
            store = pyro.get_param_store()
            for name in [n for n, p in store.named_parameters() if id(p) in ids]:
                del store[name]

    def _make_guide(self, inference: str):
        check_inference(self.tau, inference, fitting=False)
        return make_guide(
            inference,
            self.model,
            self.prior.initial_values(self.init),
            self._task_plates,
            init_scale=self.guide_init_scale,
            store=self.task_store,
        )

    @contextlib.contextmanager
    def param_scope(self) -> Iterator[None]:
        """Make this model's Theta and guide parameters the active Pyro param store (re-entrant)."""
        if self._scope_active:
            yield
            return
        self._scope_active = True
        try:
            with pyro.get_param_store().scope(self._store):
                yield
        finally:
            self._scope_active = False

    def task_subsample(self, batch: Batch) -> TaskSubsample | None:
        """The tasks of ``batch`` whose sites a step samples (None: all tasks, or no task sites when pooled)."""
        return TaskSubsample.of(batch, len(self.tasks)) if self._subsamples_tasks else None

    def updated_tasks(self, task_index: torch.Tensor) -> torch.Tensor | None:
        """The tasks whose parameters a step on examples of these tasks changes ([P] ascending ids), or
        None for all. Shapes: task_index [batch] (the whole step's batch, all ranks)."""
        return torch.unique(task_index, sorted=True) if self._subsamples_tasks else None

    @property
    def _subsamples_tasks(self) -> bool:
        return self.task_subsampling and self.mode != POOLED

    def _task_plates(self, batch: Batch | None = None) -> list[pyro.plate]:
        """The guide's task plate for ``batch``: the model's; every task when ``batch`` is None (a joint
        draw of all tasks from a fitted guide: ``guide(None)``; AutoDelta.median() calls ``guide()``)."""
        if self.mode == POOLED:
            return []
        subsample = None if batch is None else self.task_subsample(batch)
        return [pyro.plate(TASK_PLATE, len(self.tasks), dim=-1) if subsample is None else subsample.plate()]

    def _lm_log_likelihood(
        self, factors: Factors, batch: Batch, gates: Mapping[str, LayerGates] | None = None
    ) -> torch.Tensor:
        """The LM likelihood [batch]; with gates, at the given gate values (default: the 0/1 inference gates)."""
        return lm_log_likelihood(self.lora, factors, batch, self.gate_values() if gates is None else gates)

    def gate_values(self, tasks: torch.Tensor | None = None) -> dict[str, LayerGates] | None:
        """The 0/1 inference gates by layer (None without gates); ``tasks``: per-task gates of these tasks only."""
        if self.gates is None:
            return None
        with self.param_scope():
            gates = self.gates.inference(self.device)
        if tasks is None or self.gates.config.rank_gates != "per-task":
            return gates
        return {name: dataclasses.replace(g, rank=g.rank.index_select(0, tasks)) for name, g in gates.items()}

    def _batch_point(self, batch: Batch) -> tuple[dict[str, torch.Tensor], Batch, dict[str, LayerGates] | None]:
        """The point-estimate factors and inference gates of the batch's tasks only, and the batch with
        each example's position among those tasks as its task index."""
        tasks, local = torch.unique(batch.task_index, sorted=True, return_inverse=True)
        return self.task_factors(tasks=tasks), batch.replace(task_index=local), self.gate_values(tasks)

    @torch.no_grad()
    def plug_in_log_likelihood(self, batch: Batch) -> torch.Tensor:
        """log L of each document under its task's point-estimate adapter, computing the factors of the
        batch's tasks only (for any number of tasks). Shapes: -> [batch]."""
        factors, batch, gates = self._batch_point(batch)
        if self.gates is None:
            return self.log_likelihood(factors, batch)
        return self._lm_log_likelihood(factors, batch, gates)

    @torch.no_grad()
    def plug_in_logits(self, batch: Batch) -> torch.Tensor:
        """Next-token logits under each example's point-estimate adapter (the batch's tasks' factors only).
        Shapes: -> [batch, tokens, vocab]."""
        return lm_logits(self.lora, *self._batch_point(batch))

    def model(self, batch: Batch) -> None:
        """The Pyro model: task-factor sites under the prior (the batch's tasks, see ``task_subsampling``),
        then the scaled log-likelihood factor (each example's weighted by its importance weight, if any)."""
        subsample = self.task_subsample(batch)
        weight = batch.example_weight()  # [batch] or None
        factors = self.prior.sample(self.init, subsample)  # name -> [D or P, *shape]
        if subsample is not None:
            batch = batch.replace(task_index=subsample.local)  # each example's position among the present tasks
        if self.gates is not None:  # relaxed gate draws and their penalty
            loglik = self._lm_log_likelihood(factors, batch, self.gates.sample(self.device, subsample))
        else:
            loglik = self.log_likelihood(factors, batch)  # [batch]
        with pyro.plate("docs", batch.num_docs, subsample=batch.doc_index):
            with poutine.scale(scale=1.0 if weight is None else weight):
                pyro.factor("loglik", loglik)

    @torch.no_grad()
    def task_factors(
        self, values: Mapping[str, torch.Tensor] | None = None, tasks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The tasks' factors, stacked [D, *shape] (or [P, *shape] for ``tasks``, [P] ascending task ids):
        at the latent ``values`` (e.g. one guide draw), by default the point estimate (the guide's median;
        the start before any fitting). Only the rows asked for are computed (see :meth:`iter_task_factors`).

        Pooled runs return Theta repeated for every task, so shapes are the same in all modes.
        """
        with self.param_scope():
            values = self._point_values() if values is None else values
            subsample = None
            if tasks is not None:
                rows = set(self.prior.task_sites())
                values = {k: take_rows(v, tasks) if k in rows else v for k, v in values.items()}
                subsample = TaskSubsample.rows(tasks, len(self.tasks))
            values = {k: v.to(self.device) for k, v in values.items()}  # a disk store's rows are on the host
            factors = poutine.condition(self.prior.sample, data=values)(self.init, subsample)
        count = len(self.tasks) if tasks is None else len(tasks)
        factors = {k: v.detach().expand(count, *v.shape[1:]).clone() for k, v in factors.items()}
        self.task_store.release()  # a disk store's pages of the rows read: reading all tasks in turn holds one chunk
        return factors

    def _point_values(self) -> dict[str, torch.Tensor]:
        """The latent sites at the guide's median (their start before any fitting)."""
        started = getattr(self.guide, "prototype_trace", None) is not None
        return self.guide.median() if started else self.prior.initial_values(self.init)

    @torch.no_grad()
    def tau_quantiles(self, quantiles: Sequence[float] = (0.05, 0.5, 0.95)) -> dict[str, list[float]] | None:
        """Posterior quantiles of each learned tau under the guide ({group: [q...]}); None if tau is fixed."""
        if not self.prior.learned or getattr(self.guide, "prototype_trace", None) is None:
            return None
        with self.param_scope():
            values = self.guide.quantiles(list(quantiles))[TAU_SITE]  # [quantiles, groups]
        return {group: [float(v) for v in values[:, g]] for g, group in enumerate(self.prior.tau_groups())}

    @torch.no_grad()
    def global_factors(self) -> dict[str, torch.Tensor] | None:
        """Theta (None in the independent mode, where it does not exist; the guide's median if latent).
        Shapes: name -> [*shape]."""
        if self.mode == INDEPENDENT:
            return None
        with self.param_scope():
            theta = poutine.condition(self.prior.global_factors, data=self._point_values())(self.init)
            return {name: value.detach().clone() for name, value in theta.items()}

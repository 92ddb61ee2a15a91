"""The SVI loop: minibatch ELBO (MAP with AutoDelta, VI with AutoNormal), AdamW, validation, early stop.

The loss (:func:`objective`) is the negative ELBO of ``(bora.model, bora.guide)``: with an AutoDelta
guide, the negative log-posterior at the guide's point (up to a constant), whose minimiser is the
paper's MAP estimate; with AutoNormal, Pyro's ``TraceMeanField_ELBO``. The parameters (Theta and the
guide's) are optimised with AdamW (only the batch's tasks, see :mod:`.task_sparse_adamw`) and global
gradient norm clipping; under
``torchrun`` the ranks' gradients are averaged first (see :mod:`bora_pyro.distributed`). With ``checkpoint`` set, the loop state is saved every ``checkpoint_every`` steps and
a later call with the same folder resumes from it, ending exactly where an uninterrupted run would.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from tqdm.auto import tqdm

from ..data.batching import Batch
from ..data.corpus import Corpus
from ..distributed import World
from ..evaluation import evaluate
from ..models.bora import BoRA
from ..models.guides import is_task_parameter, is_uncertainty_parameter
from ..models.likelihood import scored_tokens
from .checkpoint import LoopState, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .task_sparse_adamw import TaskSparseAdamW

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What a fit did: the loss curve, validations, the restored best step, timings."""

    config: TrainConfig
    lr: float
    state: LoopState
    stopped_early: bool = False

    @property
    def losses(self) -> list[dict]:  # {"step", "loss_per_token"}
        return self.state.losses

    @property
    def evals(self) -> list[dict]:  # {"step", "valid_ppl", "valid_macro_ppl", "valid_loglik_per_token"}
        return self.state.evals

    @property
    def best_step(self) -> int:
        return self.state.best_step

    @property
    def steps_run(self) -> int:
        return self.state.step

    @property
    def train_seconds(self) -> float:
        return self.state.train_seconds

    @property
    def eval_seconds(self) -> float:
        return self.state.eval_seconds

    @property
    def train_tokens(self) -> int:
        return self.state.train_tokens

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else float("nan")


def _snapshot() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {name: store._params[name].detach().clone() for name in store.keys()}


@torch.no_grad()
def _restore(snapshot: dict[str, torch.Tensor]) -> None:
    store = pyro.get_param_store()
    for name, value in snapshot.items():
        store._params[name].copy_(value)


Loss = Callable[[BoRA, Batch], torch.Tensor]


def map_loss(bora: BoRA, batch: Batch) -> torch.Tensor:
    """The negative log joint density at the AutoDelta guide's point (scaled minibatch estimate).

    Equal to ``Trace_ELBO().differentiable_loss`` for a Delta guide (whose log-density is 0), without
    scoring the guide's point masses over every element: the guide's trace is replayed in the model.
    """
    guide_trace = poutine.trace(bora.guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(bora.model, trace=guide_trace)).get_trace(batch)
    return -model_trace.log_prob_sum()


def objective(bora: BoRA, num_particles: int = 1) -> Loss:
    """The training loss of ``bora``'s guide: :func:`map_loss` for MAP; for VI the negative ELBO with
    the task sites' KL to their prior in closed form (``TraceMeanField_ELBO``; AutoNormal is mean-field)
    and Monte Carlo for the rest (the likelihood, a learned tau)."""
    if bora.inference == "map":
        return map_loss
    elbo = TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=False)
    return lambda model, batch: elbo.differentiable_loss(model.model, model.guide, batch)


def trainable_parameters(bora: BoRA, loss: Loss, batch: Batch,
                         freeze_global: bool = False) -> dict[str, torch.Tensor]:
    """Create Theta and the guide's parameters (one loss evaluation) and return their unconstrained
    tensors by name in trace order (deterministic); Theta left out if ``freeze_global``."""
    with bora.param_scope():
        with poutine.trace(param_only=True) as capture:
            loss(bora, batch)
        return {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()
                if not (freeze_global and name.startswith("global."))}


def make_optimizer(params: dict[str, torch.Tensor], lr: float, config: TrainConfig) -> TaskSparseAdamW | None:
    """AdamW (:class:`TaskSparseAdamW`: the task parameters stepped only on the batch's tasks) with two
    groups: the LoRA weights at ``lr``, the guide's uncertainty parameters at ``config.guide_lr``. Each
    group remembers its base rate in ``base_lr`` for the schedule."""
    groups = [{"params": [p for n, p in params.items() if is_uncertainty_parameter(n) == fast], "base_lr": rate}
              for fast, rate in ((False, lr), (True, config.guide_lr))]
    groups = [g for g in groups if g["params"]]
    task_params = [p for n, p in params.items() if is_task_parameter(n)]
    return TaskSparseAdamW(groups, lr=lr, weight_decay=config.weight_decay, task_params=task_params) if groups else None


def update(loss: torch.Tensor, optimizer: TaskSparseAdamW, params: list[torch.Tensor], rows: torch.Tensor | None,
           clip_norm: float | None, world: World) -> None:
    """One optimisation step on ``loss``: gradients (averaged over ranks), clipping, AdamW on ``rows``
    of the task parameters (the batch's tasks, see :meth:`BoRA.updated_tasks`; None: all)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    world.average_gradients(params)
    if clip_norm is not None:
        optimizer.clip_grad_norm_(clip_norm, rows)
    optimizer.step(rows)


def _fingerprint(bora: BoRA, corpus: Corpus, config: TrainConfig) -> dict:
    """What a checkpoint must match to be resumed (JSON-comparable)."""
    keep = {k: v for k, v in config.to_dict().items() if k not in ("progress", "checkpoint_every")}
    return {"tasks": list(bora.tasks), "train_docs": len(corpus.train), "tau": str(bora.tau),
            "inference": bora.inference, "shapes": {k: list(v) for k, v in bora.lora.shapes().items()}, "train": keep}


def fit(bora: BoRA, corpus: Corpus, inference: str | None = None, checkpoint: str | Path | None = None,
        freeze_global: bool = False, **options) -> FitResult:
    """Fit ``bora`` to ``corpus.train``, validating on ``corpus.valid``; the best state is kept.

    Args:
        inference: "map" or "vi"; replaces the guide if it differs from ``bora.inference``.
        checkpoint: folder for periodic checkpoints (``checkpoint_every``); resumed from if it holds one.
        freeze_global: keep Theta at its start (adapting new tasks under a fitted prior).
        **options: fields of :class:`TrainConfig` (``steps``, ``batch_size``, ``lr``...).
    """
    config = TrainConfig(**options)
    world = World.current()
    world.check_batch_size(config.batch_size)
    if corpus.tasks != bora.tasks:
        raise ValueError(f"corpus tasks {list(corpus.tasks)} differ from the model's tasks {list(bora.tasks)}")
    if inference is not None and inference != bora.inference:
        bora.use_inference(inference)
    bora.lora.configure(gradient_checkpointing=config.gradient_checkpointing, bf16=config.bf16)
    pyro.set_rng_seed(config.seed)
    lr = config.learning_rate(bora.tau)
    loss_fn = objective(bora, config.num_particles)
    total_tokens = int(corpus.train.tokens_per_task().sum())
    device = bora.device
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    fingerprint = _fingerprint(bora, corpus, config)

    with bora.param_scope():
        named = trainable_parameters(bora, loss_fn, corpus.train.collate([0]).to(device), freeze_global)
        params = list(named.values())
        optimizer = make_optimizer(named, lr, config)
        state, best_state = LoopState(), _snapshot()
        if checkpoint is not None and (checkpoint / "state.json").exists():
            state, best_state = load_checkpoint(checkpoint, optimizer, fingerprint)
            log.warning("resuming from %s at step %d", checkpoint, state.step)
        result = FitResult(config=config, lr=lr, state=state)
        batches = corpus.train.train_batch_indices(config.batch_size, seed=config.seed, start_step=state.step)
        validate, first_step = is_validation_enabled(), state.step + 1
        bar = tqdm(range(state.step + 1, config.steps + 1), desc=f"fit tau={bora.tau}", disable=not (config.progress and world.is_main),
                   initial=state.step, total=config.steps)
        for step in bar:
            indices = next(batches)
            step_tasks = torch.as_tensor([corpus.train.task_index[i] for i in indices], device=device)  # [step batch]
            rows = bora.updated_tasks(step_tasks)
            batch = corpus.train.collate(world.shard(indices)).to(device).replace(step_task_index=step_tasks)  # this rank's share
            start = time.perf_counter()
            with pyro.validation_enabled(validate and step == first_step):  # Pyro's checks once, not every step
                loss = loss_fn(bora, batch)
            # the global loss (mean over ranks) and scored tokens (sum), for logging and the finiteness check
            loss_value, tokens = world.sum(torch.stack([loss.detach() / world.size,
                                                        scored_tokens(batch.labels).sum().to(loss)])).tolist()
            if not math.isfinite(loss_value):
                where = f"; the last good checkpoint is in {checkpoint}" if checkpoint is not None else ""
                raise FloatingPointError(
                    f"non-finite loss {loss_value} at step {step}; lower the learning rate (lr={lr:g}) "
                    f"or enable clipping (clip_norm){where}"
                )
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * config.lr_factor(step)
                update(loss, optimizer, params, rows, config.clip_norm, world)
            state.train_seconds += time.perf_counter() - start
            state.train_tokens += int(tokens)
            state.step = step
            state.losses.append({"step": step, "loss_per_token": loss_value / total_tokens})
            postfix = {"loss/tok": f"{loss_value / total_tokens:.3f}"}
            if step % config.eval_every == 0 or step == config.steps:
                report = evaluate(bora, corpus.valid, config.eval_batch_size)
                state.eval_seconds += report.seconds
                ll = report.loglik_per_token
                row = {"step": step, "valid_ppl": report.token_weighted, "valid_macro_ppl": report.task_macro,
                       "valid_loglik_per_token": ll}
                for group, (median,) in (bora.tau_quantiles((0.5,)) or {}).items():
                    row[f"tau_median.{group}"] = median
                state.evals.append(row)
                if ll > state.best_ll:
                    state.best_ll, best_state, state.best_step, state.bad_evals = ll, _snapshot(), step, 0
                else:
                    state.bad_evals += 1
                postfix["valid_ppl"] = f"{report.token_weighted:.2f}"
            bar.set_postfix(postfix)
            if checkpoint is not None and config.checkpoint_every and step % config.checkpoint_every == 0 and world.is_main:
                save_checkpoint(checkpoint, optimizer, state, best_state, fingerprint)
            if config.patience is not None and state.bad_evals >= config.patience:
                result.stopped_early = True
                log.info("early stop at step %d: no better validation for %d evaluations", step, state.bad_evals)
                break
        bar.close()
        _restore(best_state)
    return result

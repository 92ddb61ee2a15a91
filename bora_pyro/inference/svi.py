"""The SVI loop: minibatch ELBO (MAP with AutoDelta, VI with AutoNormal), AdamW, validation, early stop.

The loss (:func:`objective`) is the negative ELBO of ``(bora.model, bora.guide)``: with an AutoDelta
guide, the negative log-posterior at the guide's point (up to a constant), whose minimiser is the
paper's MAP estimate; with AutoNormal, Pyro's ``TraceMeanField_ELBO``. The parameters (Theta and the
guide's) are optimised with AdamW (only the batch's tasks, see :mod:`.task_sparse_adamw`) and global
gradient norm clipping; under ``torchrun`` the ranks' gradients are averaged first (see
:mod:`bora_pyro.distributed`). :class:`TrainStep` is one step, :func:`fit` the loop around it (validation,
best state, early stop, checkpoints, stopping on a signal or a non-finite value). With ``checkpoint`` set,
the loop state is saved every ``checkpoint_every`` steps and ``fit(..., resume=True)`` continues from it,
ending exactly where an uninterrupted fit would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from tqdm.auto import tqdm

from ..data.batching import Batch
from ..data.corpus import Corpus
from ..distributed import World
from ..evaluation.perplexity import PerplexityReport, evaluate
from ..io.task_store import TaskStore
from ..models.bora import BoRA, check_inference
from ..models.likelihood import scored_tokens
from ..models.pyro_internals import SiteRecorder
from .checkpoint import LoopState, checkpoint_step, load_checkpoint, save_checkpoint
from .config import WATCH_ONLY, TrainConfig
from .optimizer import make_optimizer, parameter_roles
from .reporting import open_reporter
from .stopping import StopRequests

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What a fit did: the loss curve, validations, the restored best step, timings, and how it ended.

    ``status``: "trained" (all steps, or an early stop), "interrupted" (SIGINT / SIGTERM: stopped after a
    finished step) or "diverged" (a non-finite loss or gradient: stopped before applying it);
    ``message`` says what happened in one line. The best validated state is restored in every case.
    ``state`` is where the loop ended: its steps (``state.step``), losses and validations, the restored best step,
    timings and tokens (:class:`LoopState`).
    """

    config: TrainConfig
    lr: float
    state: LoopState
    stopped_early: bool = False
    status: str = "trained"
    message: str | None = None
    signal: int | None = None  # the signal that interrupted the fit
    best_valid: PerplexityReport | None = None  # the validation of the restored state (None if not validated here)


def _snapshot(store: TaskStore) -> dict[str, torch.Tensor]:
    """Copies of the active param store's (unconstrained) parameters; a disk task store's tables are not
    copied: from now on it records the rows before they change (``store.best``)."""
    store.best.rows.clear()
    params = pyro.get_param_store().named_parameters()
    return {name: p.detach().clone() for name, p in params if not store.holds(p)}


@torch.no_grad()
def _restore(snapshot: dict[str, torch.Tensor], store: TaskStore) -> None:
    """Copy a :func:`_snapshot` back into the active param store's parameters (in place: the optimizer keeps
    them); a disk task store writes back the rows it recorded since the snapshot."""
    for name, p in pyro.get_param_store().named_parameters():
        if not store.holds(p):
            p.copy_(snapshot[name])
    store.best.restore(store.guide_tables())


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


def trainable_parameters(bora: BoRA, loss: Loss, batch: Batch, freeze_global: bool = False) -> dict[str, torch.Tensor]:
    """Create Theta and the guide's parameters (one loss evaluation) and return their unconstrained
    tensors by name in trace order (deterministic); Theta left out if ``freeze_global``."""
    with bora.param_scope():
        with poutine.trace(param_only=True) as capture:
            loss(bora, batch)
        return {
            name: site["value"].unconstrained()
            for name, site in capture.trace.nodes.items()
            if not (freeze_global and name.startswith("global."))
        }


@dataclass(frozen=True)
class StepOutcome:
    """What one training step did (the same on every data-parallel rank).

    ``loss_per_token``: the whole objective (negative log joint for MAP, negative ELBO for VI) per
    training token; ``nll_per_token``: the batch's negative log-likelihood per scored token (its
    perplexity is ``exp`` of it; under a task sampling other than proportional, both sums importance-weighted
    by ``Batch.task_weight``: an estimate of the training split's, comparable across samplings);
    ``prior_per_token``: the rest of the objective (the prior's, or KL, and gate terms) per training token.
    ``grad_norm``: the global gradient norm before clipping (NaN when no gradient was taken).
    ``problem`` is set when the loss or gradient was not finite: the step was then NOT applied.
    ``stop``: a stop (signal) was requested on some rank.
    """

    loss_per_token: float
    nll_per_token: float
    prior_per_token: float
    tokens: int
    seconds: float
    problem: str | None = None
    stop: bool = False
    grad_norm: float = math.nan


class TrainStep:
    """One optimisation step of :func:`fit`: the loss of ``bora``'s guide on a batch, gradients averaged
    over data-parallel ranks, finiteness checks, global-norm clipping, then AdamW on the batch's tasks.

    Built once per fit (it creates Theta, the guide's parameters and the optimizer from
    ``example_batch``); the throughput benchmark times this same object. ``total_tokens`` (the training
    split's scored tokens) normalises the reported objective.
    """

    def __init__(
        self, bora: BoRA, config: TrainConfig, example_batch: Batch, total_tokens: int, freeze_global: bool = False
    ) -> None:
        self.bora, self.config, self.total_tokens = bora, config, max(int(total_tokens), 1)
        self.world = World.current()
        self.lr = config.learning_rate(bora.tau)
        self.loss_fn = objective(bora, config.num_particles)
        with bora.param_scope():
            named = trainable_parameters(bora, self.loss_fn, example_batch, freeze_global)
        self.params = list(named.values())
        self.optimizer = make_optimizer(named, parameter_roles(bora), self.lr, config, bora.task_store)
        self.draws = bora.inference == "vi" or bora.gates is not None  # the objective draws random numbers

    def _objective(self, batch: Batch, validate: bool, share: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective on ``batch`` (differentiable) and this rank's sums for the step's report: the objective
        and its data term (both times ``share`` over the ranks), the (weighted) NLL, its tokens, the scored
        tokens. Shapes: -> [], [5]."""
        data = SiteRecorder("loglik")  # the model's unscaled loglik factor [batch]: the data term apart from the prior
        with pyro.validation_enabled(validate), data:
            loss = self.loss_fn(self.bora, batch)
        loglik = data.fn.log_factor.detach() if data.fn is not None else loss.new_zeros(len(batch))  # [batch]
        tokens = scored_tokens(batch.labels)  # [batch]
        weight = batch.example_weight()  # [batch]: importance weights of the task sampling (None: all 1)
        if weight is not None:  # the training split's NLL per token estimated without the sampling's bias
            loglik, weighted_tokens = weight * loglik, (weight * tokens).sum()
        else:
            weighted_tokens = tokens.sum().to(loss)
        scale = batch.num_docs / len(batch)  # the likelihood's minibatch scale in the objective
        ranks = share / self.world.size
        sums = [loss.detach() * ranks, -scale * loglik.sum() * ranks, -loglik.sum(), weighted_tokens, tokens.sum()]
        return loss, torch.stack([v.to(loss) for v in sums])

    def __call__(
        self,
        batch: Batch,
        step: int,
        stop_requested: bool = False,
        validate: bool = False,
        next_tasks: torch.Tensor | None = None,
    ) -> StepOutcome:
        """Run step ``step`` (1-based, for the schedule) on ``batch`` (this rank's share of the step's
        batch, with ``step_task_index`` the whole step's tasks). ``next_tasks`` ([next step's batch] task ids):
        a disk task store starts reading their rows now, to have them when the next step comes."""
        bora, world, config, optimizer = self.bora, self.world, self.config, self.optimizer
        step_tasks = batch.task_index if batch.step_task_index is None else batch.step_task_index
        rows = bora.updated_tasks(step_tasks)
        start = time.perf_counter()
        if next_tasks is not None and bora.task_store.disk:
            bora.task_store.prefetch(bora.updated_tasks(next_tasks))
        parts = batch.split(config.grad_accum) if config.grad_accum > 1 else [batch]
        with bora.param_scope(), bora.lora.dropping():  # forward and backward
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            # a VI guide (or the gates) draws at random: every micro-batch gets the step's one draw
            replay = _rng_replay(bora.device) if len(parts) > 1 and self.draws else None
            sums = []
            for part in parts:
                if replay is not None:
                    replay()
                share = len(part) / len(batch)  # micro-batch m's objective weighs len_m / len: one batch's sum
                loss, part_sums = self._objective(part, validate, share)
                if optimizer is not None and torch.isfinite(loss):
                    (share * loss).backward()
                sums.append(part_sums)
            # sums over ranks: the objective and its data term (means over ranks), (weighted) NLL and scored
            # tokens, scored tokens, stop votes
            totals = torch.stack(sums).sum(0)
            totals = world.sum(torch.cat([totals, totals.new_tensor([float(stop_requested)])]))
            loss_value, data_value, nll, nll_tokens, tokens, stops = totals.tolist()
            problem = None if math.isfinite(loss_value) else f"non-finite loss ({loss_value})"
            grad_norm = math.nan
            if problem is None and optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * config.lr_factor(step)
                world.average_gradients(self.params)
                norm = optimizer.grad_norm(rows)
                grad_norm = float(norm)
                if not torch.isfinite(norm):
                    problem = f"non-finite gradient norm ({norm.item()})"
                else:
                    if config.clip_norm is not None:
                        optimizer.clip_grad_norm_(config.clip_norm, rows, total=norm)
                    optimizer.step(rows)
        return StepOutcome(
            loss_value / self.total_tokens,
            nll / nll_tokens if nll_tokens > 0 else nll,
            (loss_value - data_value) / self.total_tokens,
            int(tokens),
            time.perf_counter() - start,
            problem,
            stops > 0,
            grad_norm,
        )


def _rng_replay(device: torch.device) -> Callable[[], None]:
    """A function that puts torch's random state (the CPU's and ``device``'s) back to what it is now."""
    cpu = torch.get_rng_state()
    accelerator = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def replay() -> None:
        torch.set_rng_state(cpu)
        if accelerator is not None:
            torch.cuda.set_rng_state(accelerator, device)

    return replay


def _model_fingerprint(bora: BoRA, corpus: Corpus, config: TrainConfig) -> dict:
    """What a checkpoint of ``fit`` called from Python (no run spec) must match to be resumed: the model's tasks,
    shapes, tau and inference, the training settings and the number of training documents (JSON-comparable)."""
    keep = {k: v for k, v in config.to_dict().items() if k not in WATCH_ONLY}
    return {
        "tasks": list(bora.tasks),
        "train_docs": len(corpus.train),
        "tau": str(bora.tau),
        "inference": bora.inference,
        "shapes": {k: list(v) for k, v in bora.lora.shapes().items()},
        "train": keep,
    }


def _validate(bora: BoRA, corpus: Corpus, config: TrainConfig, state: LoopState, step: int) -> PerplexityReport:
    """Score the validation split and record it in ``state.evals``; returns the report."""
    report = evaluate(bora, corpus.valid, config.eval_batch_size)
    state.eval_seconds += report.seconds
    row = {
        "step": step,
        "valid_ppl": report.token_weighted,
        "valid_macro_ppl": report.task_macro,
        "valid_loglik_per_token": report.loglik_per_token,
    }
    for group, (median,) in (bora.tau_quantiles((0.5,)) or {}).items():
        row[f"tau_median.{group}"] = median
    state.evals.append(row)
    return report


def fit(
    bora: BoRA,
    corpus: Corpus,
    checkpoint: str | Path | None = None,
    freeze_global: bool = False,
    resume: bool = False,
    fingerprint: dict | None = None,
    config: TrainConfig | None = None,
    **options,
) -> FitResult:
    """Fit ``bora`` to ``corpus.train``, validating on ``corpus.valid``; the best state is kept. MAP or VI is the
    model's own choice (``BoRA(..., inference="vi")``, or :meth:`BoRA.use_inference` before the fit).

    Ctrl-C or SIGTERM stops the fit after the current step (status "interrupted"); a non-finite loss or
    gradient stops it before that step is applied (status "diverged"). Either way the best validated
    state is restored and the result says what happened (:class:`FitResult`).

    Args:
        checkpoint: folder for periodic checkpoints (``checkpoint_every``), and one when interrupted.
        resume: continue from the newest checkpoint in ``checkpoint``; without it a folder that already
            holds a checkpoint is an error (it belongs to an earlier fit).
        fingerprint: what a resumed checkpoint must match (default: the tasks, data size and settings).
        freeze_global: keep Theta at its start (adapting new tasks under a fitted prior).
        config: the training settings (default :class:`TrainConfig`'s), passed whole.
        **options: fields of :class:`TrainConfig` (``steps``, ``batch_size``, ``lr``...) that override ``config``'s.
    """
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        hint = (
            "; MAP or VI is the model's: BoRA(..., inference='vi') or bora.use_inference('vi') before fit"
            if "inference" in unknown
            else f"; the options are TrainConfig's fields: {', '.join(fields)}"
        )
        raise TypeError(f"fit() got unknown option(s) {unknown}{hint}")
    config = dataclasses.replace(config or TrainConfig(), **options)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    saved_step = _check_fit(bora, corpus, config, checkpoint, resume)
    check_inference(bora.tau, bora.inference)
    bora.lora.configure(gradient_checkpointing=config.gradient_checkpointing, bf16=config.bf16)
    pyro.set_rng_seed(config.seed)
    fingerprint = fingerprint if fingerprint is not None else _model_fingerprint(bora, corpus, config)
    train_step = TrainStep(
        bora,
        config,
        corpus.train.collate([0]).to(bora.device),
        int(corpus.train.tokens_per_task().sum()),
        freeze_global,
    )
    with bora.param_scope():
        loop = _Loop(bora, corpus, config, train_step, checkpoint, fingerprint)
        loop.start(resume, saved_step)
        loop.run()
        _restore(loop.best_state, bora.task_store)
    return loop.result


def _check_fit(bora: BoRA, corpus: Corpus, config: TrainConfig, checkpoint: Path | None, resume: bool) -> int | None:
    """Refuse what cannot be fitted (one line each); warn where no validation will pick the state kept.
    Returns the step of the checkpoint already in ``checkpoint`` (None: none)."""
    world = World.current()
    world.check_batch_size(config.batch_size)
    if config.batch_size // world.size < config.grad_accum:
        raise ValueError(
            f"grad_accum {config.grad_accum} exceeds the {config.batch_size // world.size} documents each of the "
            f"{world.size} processes takes per step: raise batch_size or lower grad_accum"
        )
    if corpus.tasks != bora.tasks:
        raise ValueError(f"corpus tasks {list(corpus.tasks)} differ from the model's tasks {list(bora.tasks)}")
    if config.batch_size > max(
        len(corpus.train), 1024
    ):  # a small corpus may repeat documents in a batch, within reason
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {len(corpus.train)} training documents; use at most "
            f"{len(corpus.train)}"
        )
    if len(corpus.valid) == 0:
        log.warning(
            "no validation documents (every task is too small to hold one out, or the data's split gives none): "
            "the last state is kept%s",
            "; --patience does not apply" if config.patience is not None else "",
        )
    saved_step = checkpoint_step(checkpoint) if checkpoint is not None else None
    if saved_step is not None and not resume:
        raise ValueError(
            f"{checkpoint} already holds a checkpoint (step {saved_step}) of an earlier fit: "
            "resume it (resume=True) or remove it"
        )
    return saved_step


class _Loop:
    """The steps of one fit, each a method: :meth:`start` (fresh, or restored from a checkpoint), then
    :meth:`run`, which per step trains (:meth:`step`), records it (:meth:`record`), validates and keeps the best
    state (:meth:`validate`), checkpoints, and stops on divergence, a signal or patience."""

    def __init__(
        self,
        bora: BoRA,
        corpus: Corpus,
        config: TrainConfig,
        train_step: TrainStep,
        checkpoint: Path | None,
        fingerprint: dict,
    ) -> None:
        self.bora, self.corpus, self.config, self.train_step = bora, corpus, config, train_step
        self.checkpoint, self.fingerprint = checkpoint, fingerprint
        self.world = World.current()
        self.state, self.best_state = LoopState(), _snapshot(bora.task_store)
        self.result = FitResult(config=config, lr=train_step.lr, state=self.state)

    def start(self, resume: bool, saved_step: int | None) -> None:
        """A fresh start, or the state of the checkpoint at ``saved_step`` (a disk task store's undo log opened)."""
        store = self.bora.task_store
        if store.disk and self.checkpoint is not None and saved_step is None:
            if resume:  # killed before its first checkpoint: the tables go back to their start
                store.rollback(0)
            store.begin(0)
        if saved_step is not None:
            self.state, self.best_state = load_checkpoint(
                self.checkpoint, self.train_step.optimizer, self.fingerprint, store
            )
            self.result.state = self.state
            log.warning("resuming from %s at step %d", self.checkpoint, self.state.step)

    def run(self) -> None:
        """Every step from the one after the state's to ``config.steps``, until one of them says stop."""
        config, train = self.config, self.corpus.train
        batches = train.train_batch_indices(
            config.batch_size, seed=config.seed, start_step=self.state.step, temperature=config.temperature
        )
        weight = train.task_weights(config.temperature)  # [tasks] or None (proportional)
        self.task_weight = None if weight is None else weight.to(self.bora.device)
        self.first_step, self.validate_once = self.state.step + 1, is_validation_enabled()
        bar = tqdm(
            range(self.state.step + 1, config.steps + 1),
            desc=f"fit tau={self.bora.tau}",
            disable=not (config.progress and self.world.is_main),
            initial=self.state.step,
            total=config.steps,
        )
        upcoming = next(batches)
        self.reporter = open_reporter(config.report_to, config.logging_dir, self.world.is_main)
        with StopRequests() as stop, contextlib.closing(self.reporter):
            for step in bar:
                indices, upcoming = upcoming, next(batches)
                out = self.step(step, indices, upcoming, stop.requested)
                if out.problem is not None:
                    self.diverged(out, step)
                    break
                postfix = self.record(out, step)
                if step % config.eval_every == 0 or step == config.steps:
                    postfix["valid_ppl"] = f"{self.validate(step):.2f}"
                bar.set_postfix(postfix)
                saved = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
                if saved:
                    self.save()
                if out.stop:
                    self.interrupted(step, stop.signal_number, saved)
                    break
                if config.patience is not None and self.state.bad_evals >= config.patience:
                    self.result.stopped_early = True
                    log.info(
                        "early stop at step %d: no better validation for %d evaluations", step, self.state.bad_evals
                    )
                    break
        bar.close()

    def tasks_of(self, indices: list[int]) -> torch.Tensor:
        """The tasks of a step's documents. Shape: [step batch]."""
        return torch.as_tensor([self.corpus.train.task_index[i] for i in indices])

    def step(self, step: int, indices: list[int], upcoming: list[int], stop_requested) -> StepOutcome:
        """Train on the documents ``indices`` (this rank's share), telling the store the next step's tasks."""
        train, device = self.corpus.train, self.bora.device
        batch = (
            train.collate(self.world.shard(indices))
            .to(device)
            .replace(step_task_index=self.tasks_of(indices).to(device), task_weight=self.task_weight)
        )
        return self.train_step(
            batch,
            step,
            stop_requested,
            self.validate_once and step == self.first_step,  # Pyro's checks once
            next_tasks=self.tasks_of(upcoming) if step < self.config.steps else None,
        )

    def record(self, out: StepOutcome, step: int) -> dict[str, str]:
        """Count the step into the state and the training log (and the reporter); returns the bar's postfix."""
        state = self.state
        state.train_seconds += out.seconds
        state.train_tokens += out.tokens
        state.step = step
        ppl = math.exp(min(out.nll_per_token, 700))
        state.losses.append(
            {
                "step": step,
                "loss_per_token": out.loss_per_token,
                "train_nll_per_token": out.nll_per_token,
                "train_ppl": ppl,
                "prior_per_token": out.prior_per_token,
                "grad_norm": out.grad_norm,
                "lr": self.train_step.lr * self.config.lr_factor(step),
            }
        )
        self.reporter.train(state.losses[-1], self.bora.inference == "vi")
        return {
            "nll/tok": f"{out.nll_per_token:.3f}",
            "ppl": f"{ppl:.4g}",
            "prior/tok": f"{out.prior_per_token:.3g}",
            "grad": f"{out.grad_norm:.3g}",
        }

    def validate(self, step: int) -> float:
        """Validate; a better validation log-likelihood (or none at all: the last state) becomes the best state.
        Returns the validation perplexity."""
        state = self.state
        report = _validate(self.bora, self.corpus, self.config, state, step)
        self.reporter.validation(state.evals[-1])
        if report.loglik_per_token > state.best_ll or not report.scored.any():
            state.best_ll, state.best_step, state.bad_evals = report.loglik_per_token, step, 0
            self.best_state = _snapshot(self.bora.task_store)
            self.result.best_valid = report
        else:
            state.bad_evals += 1
        return report.token_weighted

    def save(self) -> None:
        """A checkpoint of the state so far (rank 0 writes it), where the fit has a checkpoint folder."""
        if self.checkpoint is not None and self.world.is_main:
            save_checkpoint(
                self.checkpoint,
                self.train_step.optimizer,
                self.state,
                self.best_state,
                self.fingerprint,
                self.bora.task_store,
            )

    def diverged(self, out: StepOutcome, step: int) -> None:
        """Stop before applying the step: say what was not finite and what to change."""
        last = checkpoint_step(self.checkpoint) if self.checkpoint is not None else None
        where = f"; the last good checkpoint (step {last}) is in {self.checkpoint}" if last is not None else ""
        self.result.status = "diverged"
        self.result.message = (
            f"{out.problem} at step {step}, not applied; lower the learning rate (lr={self.train_step.lr:g})"
            f" or clip gradients (--clip-norm){where}"
        )

    def interrupted(self, step: int, signal_number: int | None, saved: bool) -> None:
        """Stop after the step a signal came in: checkpoint it (unless just done) and say which signal."""
        if not saved:
            self.save()
        self.result.status, self.result.signal = "interrupted", signal_number
        self.result.message = f"interrupted by {signal.Signals(signal_number or signal.SIGTERM).name} after step {step}"

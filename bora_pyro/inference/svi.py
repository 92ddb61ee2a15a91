"""The SVI loop: minibatch ELBO (MAP with AutoDelta, VI with AutoNormal), AdamW, validation, early stop.

The loss is Pyro's ``Trace_ELBO`` on ``(bora.model, bora.guide)``; with an AutoDelta guide it is
the negative log-posterior (up to a constant), whose minimiser is the paper's MAP estimate. The
parameters (Theta and the guide's) are optimised with ``torch.optim.AdamW`` and global gradient
norm clipping.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from tqdm.auto import tqdm

from ..data.corpus import Corpus
from ..evaluation import evaluate
from ..models.bora import BoRA
from ..models.likelihood import scored_tokens
from .config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What a fit did: the loss curve, validations, the restored best step, timings."""

    config: TrainConfig
    lr: float
    losses: list[dict] = field(default_factory=list)  # {"step", "loss_per_token"}
    evals: list[dict] = field(default_factory=list)  # {"step", "valid_ppl", "valid_macro_ppl", "valid_loglik_per_token"}
    best_step: int = 0
    steps_run: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    train_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else float("nan")

    @property
    def best_valid_ppl(self) -> float:
        best = [e for e in self.evals if e["step"] == self.best_step]
        return best[0]["valid_ppl"] if best else float("nan")


def _snapshot() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {name: store._params[name].detach().clone() for name in store.keys()}


@torch.no_grad()
def _restore(snapshot: dict[str, torch.Tensor]) -> None:
    store = pyro.get_param_store()
    for name, value in snapshot.items():
        store._params[name].copy_(value)


def fit(bora: BoRA, corpus: Corpus, inference: str | None = None, **options) -> FitResult:
    """Fit ``bora`` to ``corpus.train``, validating on ``corpus.valid``; the best state is kept.

    Args:
        inference: "map" or "vi"; replaces the guide if it differs from ``bora.inference``.
        **options: fields of :class:`TrainConfig` (``steps``, ``batch_size``, ``lr``...).
    """
    config = TrainConfig(**options)
    if corpus.tasks != bora.tasks:
        raise ValueError(f"corpus tasks {list(corpus.tasks)} differ from the model's tasks {list(bora.tasks)}")
    if inference is not None and inference != bora.inference:
        bora.use_inference(inference)
    pyro.set_rng_seed(config.seed)
    lr = config.learning_rate(bora.tau)
    result = FitResult(config=config, lr=lr)
    elbo = Trace_ELBO(num_particles=config.num_particles, vectorize_particles=False)
    total_tokens = int(corpus.train.tokens_per_task().sum())
    batches = corpus.train.train_batches(config.batch_size, seed=config.seed)
    device = bora.device

    with bora.param_scope():
        first = next(batches).to(device)
        with poutine.trace(param_only=True) as capture:
            elbo.differentiable_loss(bora.model, bora.guide, first)
        # in trace order (deterministic), each once
        params = list({id(p): p for p in (s["value"].unconstrained() for s in capture.trace.nodes.values())}.values())
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay) if params else None
        best_ll, best_state, bad_evals = -float("inf"), _snapshot(), 0
        bar = tqdm(range(1, config.steps + 1), desc=f"fit tau={bora.tau}", disable=not config.progress)
        batch = first
        for step in bar:
            if step > 1:
                batch = next(batches).to(device)
            start = time.perf_counter()
            loss = elbo.differentiable_loss(bora.model, bora.guide, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.item()} at step {step}; lower the learning rate (lr={lr:g}) "
                    "or enable clipping (clip_norm)"
                )
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr * config.lr_factor(step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
                optimizer.step()
            result.train_seconds += time.perf_counter() - start
            result.train_tokens += int(scored_tokens(batch.labels).sum())
            result.steps_run = step
            result.losses.append({"step": step, "loss_per_token": loss.item() / total_tokens})
            postfix = {"loss/tok": f"{loss.item() / total_tokens:.3f}"}
            if step % config.eval_every == 0 or step == config.steps:
                report = evaluate(bora, corpus.valid, config.eval_batch_size)
                result.eval_seconds += report.seconds
                ll = report.loglik_per_token
                result.evals.append(
                    {"step": step, "valid_ppl": report.token_weighted, "valid_macro_ppl": report.task_macro,
                     "valid_loglik_per_token": ll}
                )
                if ll > best_ll:
                    best_ll, best_state, result.best_step, bad_evals = ll, _snapshot(), step, 0
                else:
                    bad_evals += 1
                postfix["valid_ppl"] = f"{report.token_weighted:.2f}"
                if config.patience is not None and bad_evals >= config.patience:
                    result.stopped_early = True
                    bar.set_postfix(postfix)
                    log.info("early stop at step %d: no better validation for %d evaluations", step, bad_evals)
                    break
            bar.set_postfix(postfix)
        bar.close()
        _restore(best_state)
    return result

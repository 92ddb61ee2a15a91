"""Plug-in, tau-averaged posterior mean and tau-averaged posterior-predictive test perplexity of a run folder
(issue 24: tau-averaged predictive draws from the collapsed posterior).

The collapsed posterior is taken at the run's saved adapters (one curvature pass over --curvature-docs training
documents per task); the predictive averages each test document's probability over --draws joint draws of
every task's factors (tau from its grid, Theta | tau and theta_d | Theta, tau Gaussian). The Monte Carlo error
of the predictive's summed log density is a bootstrap over the draws (200 resamples).

    .venv/bin/python experiments/tau_averaged_draws.py runs/main --draws 8
"""

from __future__ import annotations

import argparse

import torch

import bora_pyro
from bora_pyro.evaluation.perplexity import report_from_documents
from bora_pyro.evaluation.predictive import posterior_predictive, tau_averaged_draws


def main(args) -> None:
    run = bora_pyro.load_run(args.run)
    test = run.corpus.test
    plug_in = run.evaluate("test")
    posterior = run.tau_posterior(docs_per_task=args.curvature_docs, seed=args.seed)
    mean = bora_pyro.evaluate(
        run.bora, test, factors={k: v.to(run.bora.device) for k, v in posterior.mean_factors().items()}
    )
    draws = tau_averaged_draws(posterior, args.draws, args.seed, run.bora.device)
    predictive, per_draw = posterior_predictive(run.bora, test, draws)  # per_draw [S, docs]
    generator = torch.Generator().manual_seed(args.seed)
    resampled = [
        float(torch.logsumexp(per_draw[torch.randint(0, args.draws, (args.draws,), generator=generator)], 0).sum())
        for _ in range(200)
    ]
    mc_se = float(torch.tensor(resampled).std())
    low, median, high = posterior.quantiles((0.05, 0.5, 0.95))[0]
    print(f"{args.run}: tau posterior median {median:.3g} [{low:.3g}, {high:.3g}]")
    print(
        f"plug-in (the run's adapters): test perplexity {plug_in.token_weighted:.2f} "
        f"(task-macro {plug_in.task_macro:.2f})"
    )
    print(f"tau-averaged posterior mean: {mean.token_weighted:.2f} (task-macro {mean.task_macro:.2f})")
    print(
        f"tau-averaged posterior predictive, {args.draws} draws: {predictive.token_weighted:.2f} "
        f"(task-macro {predictive.task_macro:.2f}); draws one at a time: "
        + ", ".join(f"{report_from_documents(test, d, 0.0).token_weighted:.1f}" for d in per_draw)
        + f"; Monte Carlo error of the summed log density ~{mc_se:.2f} nats"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--curvature-docs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())

"""The collapsed posterior of tau, its messages, the shrinkage per task and the elpd comparison of runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import bora_pyro
from bora_pyro import PriorConfig
from bora_pyro.cli import main
from bora_pyro.evaluation.comparison import compare_runs, paired_se
from bora_pyro.evaluation.messages import curvature_messages, one_per_task_batches
from bora_pyro.models.collapsed_tau import (
    Messages,
    TauPosterior,
    collapsed_tau_posterior,
    conditional_mean,
    shrinkage,
    standardised_residuals,
)
from bora_pyro.models.tau_prior import TauPrior

from .conftest import synthetic_rows, train_args
from .gaussian_oracle import GaussianObservations, observation_corpus

PRIOR = TauPrior.parse("lognormal:2.3,3")
SIGMA = 0.5
DOCS = [2 + (3 * d) % 9 for d in range(10)]  # 2..10 observations per task


def _simulated(tau: float = 4.0, seed: int = 1, shapes=None) -> GaussianObservations:
    shapes = shapes or {"a": (3, 4), "b": (5,)}
    return GaussianObservations.simulate(
        shapes, DOCS, tau=tau, sigma=SIGMA, generator=torch.Generator().manual_seed(seed)
    )


def _exact_messages(data: GaussianObservations) -> Messages:
    """The Gaussian likelihood's own messages: lam = n_d / sigma^2, mu = the task mean."""
    n = torch.tensor(DOCS, dtype=torch.float64)
    mu = {k: torch.stack([y[data.task_index == d].mean(0) for d in range(len(DOCS))]) for k, y in data.y.items()}
    lam = {k: (n / SIGMA**2).view(-1, *[1] * (m.dim() - 1)).expand_as(m).float() for k, m in mu.items()}
    return Messages(mu, lam, mu, "exact")


def _grid_quantiles(log_tau: torch.Tensor, weights: np.ndarray) -> np.ndarray:
    cdf = (np.cumsum(weights) - 0.5 * weights) / weights.sum()  # each point holds the mass of its cell
    return np.exp(np.interp([0.05, 0.5, 0.95], cdf, log_tau.numpy()))


def test_collapsed_posterior_is_the_exact_posterior_of_the_normal_hierarchical_model():
    data = _simulated()
    grid = torch.linspace(math.log(1e-2), math.log(1e4), 600)
    posterior = collapsed_tau_posterior(_exact_messages(data), PRIOR, log_tau=grid)
    exact = data.tau_posterior(PRIOR, grid, "integrated").numpy()  # theta_d and Theta integrated analytically
    density = posterior.density[0]
    assert density / density.sum() == pytest.approx(exact, rel=1e-4, abs=1e-9)  # float32 terms, float64 sums
    zoomed = collapsed_tau_posterior(_exact_messages(data), PRIOR)  # its own grid
    assert zoomed.quantiles()[0] == pytest.approx(_grid_quantiles(grid, exact), rel=0.01)


def test_latent_theta_and_uninformed_coordinates_match_quadrature():
    """Theta ~ N(0, 1/g) and some lam = 0: the formula against numerical integration over Theta."""
    gen = torch.Generator().manual_seed(3)
    mu = {"x": torch.randn(4, 3, generator=gen)}
    lam = {"x": torch.rand(4, 3, generator=gen) * 5}
    lam["x"][0, 1] = lam["x"][2, 2] = 0.0
    g = 0.7
    log_tau = torch.linspace(-3, 4, 50, dtype=torch.float64)
    posterior = collapsed_tau_posterior(Messages(mu, lam, mu, "test"), PRIOR, global_precision=g, log_tau=log_tau)
    theta = torch.linspace(-12, 12, 8001, dtype=torch.float64)  # a quadrature grid for each Theta_j
    expected = []
    for tau in log_tau.exp():
        logp = 0.0
        for j in range(3):
            log_integrand = -0.5 * g * theta**2
            for d in range(4):
                lj = float(lam["x"][d, j])
                if lj > 0:  # mu_dj ~ N(Theta_j, 1/lam + 1/tau); lam = 0: no term
                    var = 1 / lj + 1 / tau
                    log_integrand = log_integrand - 0.5 * (mu["x"][d, j] - theta) ** 2 / var - 0.5 * torch.log(var)
            logp += float(torch.logsumexp(log_integrand, 0))
        expected.append(logp)
    expected = np.asarray(expected)
    got = posterior.log_likelihood[0]
    assert got - got.mean() == pytest.approx(expected - expected.mean(), abs=1e-6)


def test_groups_factorise():
    data = _simulated()
    messages = _exact_messages(data)
    both = collapsed_tau_posterior(messages, PRIOR, {"a": 0, "b": 1}, ("a", "b"))
    alone = collapsed_tau_posterior(
        Messages(*({"b": m["b"]} for m in (messages.mu, messages.lam, messages.point)), ""), PRIOR
    )
    assert both.quantiles()[1] == pytest.approx(alone.quantiles()[0], rel=1e-3)
    assert both.groups == ("a", "b") and both.density.shape[0] == 2


def test_a_narrow_posterior_is_resolved():
    """Many coordinates: the posterior of log tau is far narrower than any fixed grid's spacing."""
    data = _simulated(tau=30.0, shapes={"a": (200, 50)})
    posterior = collapsed_tau_posterior(_exact_messages(data), PRIOR)
    low, mid, high = posterior.quantiles()[0]
    assert low < mid < high and high / low < 1.3  # 10,000 coordinates x 10 tasks
    assert 20 < mid < 45
    fine = torch.linspace(math.log(low / 2), math.log(high * 2), 4000)
    reference = collapsed_tau_posterior(_exact_messages(data), PRIOR, log_tau=fine)
    assert posterior.quantiles()[0] == pytest.approx(reference.quantiles()[0], rel=1e-3)
    assert posterior.weights().sum() == pytest.approx(1.0)


def test_conditional_mean_and_shrinkage_are_the_closed_form():
    data = _simulated()
    messages = _exact_messages(data)
    theta, means = conditional_mean(messages, 4.0)
    theta_cf, mean_cf, _ = data.closed_form("a", 4.0)
    assert theta["a"] == pytest.approx(theta_cf, abs=1e-5)
    assert means["a"] == pytest.approx(mean_cf, abs=1e-5)
    kappa = shrinkage(messages, 4.0)
    n = np.asarray(DOCS, dtype=float)
    assert kappa.kappa.to_numpy() == pytest.approx(4.0 / (n / SIGMA**2 + 4.0))
    assert kappa.p_eff.to_numpy() == pytest.approx(17 * (1 - 4.0 / (n / SIGMA**2 + 4.0)), rel=1e-5)
    assert (shrinkage(messages, 0.0).kappa == 0).all() and (shrinkage(messages, math.inf).kappa == 1).all()


def test_tau_averaged_draws_have_the_closed_form_moments():
    """Draws of theta with tau, Theta integrated out: their mean and variance per coordinate are the mixture over
    the tau grid of the closed-form conditionals, and two tasks covary through their shared Theta."""
    messages = _exact_messages(_simulated())
    posterior = collapsed_tau_posterior(messages, PRIOR)
    draws = posterior.draws(4000, seed=3)
    sample = torch.stack([d["a"].double().flatten(1) for d in draws])  # [S, D, n]
    weights, grid = posterior.weights()[0], posterior.grid[0]
    lam = messages.lam["a"].double().flatten(1)
    first, second, cross = 0.0, 0.0, 0.0
    for p, tau in zip(weights, grid):
        _, means = conditional_mean(messages, float(tau))
        mean = means["a"].double().flatten(1)
        kappa = tau / (lam + tau)
        precision = (lam * kappa).sum(0)  # sum_d w_d
        variance = 1 / (lam + tau) + kappa**2 / precision
        first, second = first + p * mean, second + p * (variance + mean**2)
        cross = cross + p * (kappa[0] * kappa[1] / precision + mean[0] * mean[1])
    variance = second - first**2
    se = (variance / len(draws)).sqrt()
    assert ((sample.mean(0) - first).abs() / se).max() < 4.5
    ratio = sample.var(0) / variance
    assert abs(float(ratio.mean()) - 1) < 0.02 and float((ratio - 1).abs().max()) < 0.15
    # at one tau with weak messages (strong pooling), two tasks covary through Theta: kappa_0 kappa_1 / sum_d w_d
    weak = Messages(messages.mu, {k: v / 100 for k, v in messages.lam.items()}, messages.point, "weak")
    one_tau = collapsed_tau_posterior(weak, PRIOR, log_tau=math.log(4.0) + torch.tensor([-1e-6, 0.0, 1e-6]))
    pair = torch.stack([d["a"].double().flatten(1)[:2] for d in one_tau.draws(4000, seed=4)])  # [S, 2, n]
    lam = weak.lam["a"].double().flatten(1)[:, 0]
    kappa = 4.0 / (lam + 4.0)
    expected = kappa[0] * kappa[1] / (lam * kappa).sum()
    covariance = (pair[:, 0] * pair[:, 1]).mean(0) - pair[:, 0].mean(0) * pair[:, 1].mean(0)  # [n]
    assert float(covariance.mean() / expected) == pytest.approx(1, abs=0.05)
    assert posterior.draws(2, seed=3)[1]["b"].equal(posterior.draws(2, seed=3)[1]["b"])  # seeded


def test_residuals_of_data_from_the_prior_are_standard_normal():
    data = _simulated(tau=4.0, shapes={"a": (100, 20)})
    check = standardised_residuals(_exact_messages(data), 4.0)
    assert check.mean_square.iloc[0] == pytest.approx(0.9, abs=0.1)  # a little below 1: Thetabar is fitted
    assert abs(check.excess_kurtosis.iloc[0]) < 0.3


def _gaussian_fit(tiny_lm, steps: int, inference: str = "map", parameterization: str = "noncentered", **options):
    """BoRA fitted at tau = 10 to Gaussian observations (the normal hierarchical model), and the exact 5/50/95%
    quantiles of tau."""
    corpus = observation_corpus(DOCS)
    prior = PriorConfig(tau=10.0, tau_prior="lognormal:2.3,3", parameterization=parameterization)
    bora = bora_pyro.BoRA(
        tiny_lm[0], corpus.tasks, rank=1, alpha=1, targets=["q_proj"], prior=prior, inference=inference
    )
    data = _simulated(shapes=bora.lora.shapes())
    bora.log_likelihood = data.log_likelihood
    fit_options = dict(batch_size=sum(DOCS), lr=0.03, clip_norm=None, lr_schedule="cosine", progress=False)
    bora_pyro.fit(bora, corpus, steps=steps, eval_every=steps, **fit_options, **options)
    grid = torch.linspace(math.log(1e-1), math.log(1e3), 800)
    return bora, corpus, data, _grid_quantiles(grid, data.tau_posterior(PRIOR, grid, "integrated").numpy())


@pytest.mark.parametrize("parameterization", ["noncentered", "centered"])
def test_curvature_messages_of_a_map_fit_recover_the_exact_posterior(tiny_lm, parameterization):
    bora, corpus, data, exact = _gaussian_fit(tiny_lm, 300, parameterization=parameterization)
    sampled = dict(label_samples=32, sampled_log_likelihood=data.sampled_log_likelihood(32))
    posterior = bora_pyro.tau_posterior(bora, corpus, **sampled)
    assert posterior.quantiles()[0] == pytest.approx(exact, rel=0.06)
    refreshed = bora_pyro.tau_posterior(bora, corpus, refresh=True, **sampled)
    assert refreshed.quantiles()[0] == pytest.approx(posterior.quantiles()[0], rel=0.03)  # a Gaussian: no change


def test_guide_messages_of_a_converged_vi_fit_recover_the_exact_posterior(tiny_lm):
    bora, corpus, _, exact = _gaussian_fit(tiny_lm, 1000, inference="vi", guide_lr=0.03, num_particles=2)
    posterior = bora_pyro.tau_posterior(bora, corpus, source="guide")
    assert posterior.quantiles()[0] == pytest.approx(exact, rel=0.04)


def test_one_per_task_batches_give_every_document_its_own_gradient(make_corpus, tiny_lm):
    """The curvature pass takes per-document gradients from mixed-task batches holding one document of each
    task: it must equal a pass over one document at a time."""
    corpus = make_corpus({"a": 6, "b": 4, "c": 3})
    bora = bora_pyro.BoRA(tiny_lm[0], corpus.tasks, rank=2)
    bora_pyro.fit(bora, corpus, steps=4, batch_size=4, eval_every=4, progress=False, lr=0.05)
    batched = curvature_messages(bora, corpus.train, docs_per_task=4, fisher="empirical", batch_size=16)
    alone = curvature_messages(bora, corpus.train, docs_per_task=4, fisher="empirical", batch_size=1)
    for name in batched.lam:
        assert batched.lam[name] == pytest.approx(alone.lam[name], rel=1e-4, abs=1e-9)
        # mu = theta + grad / lam is ill-conditioned where lam is tiny
        assert batched.mu[name] == pytest.approx(alone.mu[name], rel=1e-3, abs=1e-6)
    batches = list(one_per_task_batches(corpus.train, 4, 2, seed=0))
    assert all(len({corpus.train.task_index[i] for i in b}) == len(b) for b in batches)


def test_vi_at_tau_zero_is_refused(tiny_lm, make_corpus, tmp_path, capsys):
    corpus = make_corpus()
    bora = bora_pyro.BoRA(tiny_lm[0], corpus.tasks, tau=0.0, inference="vi")  # an old run of it still loads
    with pytest.raises(ValueError, match="needs tau > 0.*improper"):
        bora_pyro.fit(bora, corpus, steps=1, progress=False)
    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 6, "b": 4}).to_csv(data, index=False)
    assert main(train_args(data, tmp_path / "run", "--tau", "0", "--inference", "vi")) == 2
    assert "needs tau > 0" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_paired_standard_errors():
    docs = pd.DataFrame({"doc": range(6), "task": list("aabbcc"), "tokens": [3] * 6})
    good = docs.assign(elpd=[-1.0, -2.0, -1.5, -1.0, -3.0, -2.0])
    bad = docs.assign(elpd=good.elpd - [0.5, 0.1, 0.2, 0.4, 0.3, 0.1])
    table = compare_runs({"good": good, "bad": bad})
    assert list(table.index) == ["good", "bad"]
    diff = np.array([0.5, 0.1, 0.2, 0.4, 0.3, 0.1])
    assert table.loc["bad", "elpd_diff"] == pytest.approx(diff.sum())
    assert table.loc["bad", "se_docs"] == pytest.approx(math.sqrt(6 * diff.var(ddof=1)))
    per_task = np.array([0.6, 0.6, 0.4])
    assert table.loc["bad", "se_tasks"] == pytest.approx(math.sqrt(3 * per_task.var(ddof=1)))
    assert paired_se(diff, np.array(list("aabbcc"))) == pytest.approx(table.loc["bad", "se_tasks"])
    with pytest.raises(ValueError, match="different test documents"):
        compare_runs({"good": good, "short": bad.iloc[:5]})


def test_every_run_reports_its_tau_posterior_and_shrinkage(tmp_path, capsys):
    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 16, "b": 8, "c": 4}).to_csv(data, index=False)
    for name, extra in {"t10": ["--tau", "10"], "pooled": ["--tau", "inf"], "none": ["--curvature-docs", "0"]}.items():
        assert main(train_args(data, tmp_path / name, "--curvature-docs", "4", *extra)) == 0
    out = capsys.readouterr().out
    assert "tau posterior (collapsed, diagonal Gaussian messages from 4 training documents" in out
    run = tmp_path / "t10"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tau_q05"] < metrics["tau_median"] < metrics["tau_q95"]
    frame = pd.read_csv(run / "tau_posterior.csv")
    assert list(frame.columns) == ["group", "tau", "log_tau", "density", "log_likelihood"]
    assert np.trapezoid(frame.density, frame.log_tau) == pytest.approx(1.0, rel=1e-3)
    per_task = pd.read_csv(run / "per_task.csv")
    assert ((per_task.kappa > 0) & (per_task.kappa < 1)).all()
    assert per_task.p_eff.to_numpy() == pytest.approx(
        (1 - per_task.kappa.to_numpy()) * bora_pyro.load_run(run).bora.lora.num_parameters(), rel=1e-4
    )
    assert not (tmp_path / "pooled" / "tau_posterior.csv").exists()  # no task's mode to expand at
    pooled = json.loads((tmp_path / "pooled" / "metrics.json").read_text())
    assert pooled["tau_posterior_skipped"].startswith("a pooled fit (tau = inf): its tasks share one adapter")
    assert not (tmp_path / "none" / "tau_posterior.csv").exists()
    assert pd.read_csv(tmp_path / "none" / "per_task.csv").kappa.isna().all()
    for name in ("tau_posterior.png", "shrinkage.png", "prior_check.csv", "test_docs.csv"):
        assert (run / name).is_file()
    capsys.readouterr()
    assert main(["diagnose", str(run), str(tmp_path / "pooled")]) == 0
    out = capsys.readouterr().out
    assert "shrinkage at the fitted tau" in out and "prior check" in out and "compared by elpd" in out
    assert "no collapsed tau posterior: a pooled fit (tau = inf)" in out


def test_a_saved_posterior_reads_back_and_reweights_under_another_hyperprior():
    posterior = collapsed_tau_posterior(_exact_messages(_simulated()), PRIOR)
    back = TauPosterior.from_frame(posterior.to_frame(), PRIOR)
    assert back.quantiles() == pytest.approx(posterior.quantiles(), rel=1e-9)
    tight = TauPrior.parse("lognormal:0,0.1")  # tau near 1, far below the data's ~4
    assert back.with_prior(tight).median()[0] < posterior.median()[0]
    assert posterior.at_edge() == [False]


def test_unrelated_tasks_put_the_mass_at_the_edge():
    gen = torch.Generator().manual_seed(0)
    mu = {"x": 100 * torch.randn(6, 50, generator=gen)}  # tasks far apart, each measured precisely
    lam = {"x": torch.full((6, 50), 1e4)}
    posterior = collapsed_tau_posterior(Messages(mu, lam, mu, "test"), PRIOR)
    assert posterior.median()[0] < 1e-3 and posterior.at_edge() == [True]


def test_dropped_coordinates_stay_dropped_and_keep_their_fitted_value():
    data = _simulated()
    messages = _exact_messages(data)
    kept = messages.restricted({"a": 30.0, "b": 0.0})  # tasks with few observations lose their "a" messages
    assert (kept.lam["a"][torch.tensor(DOCS) / SIGMA**2 < 30] == 0).all()
    _, means = conditional_mean(kept, 4.0)
    dropped = kept.lam["a"] == 0
    assert means["a"][dropped] == pytest.approx(messages.point["a"][dropped].float())
    moved = {k: v + 0.1 for k, v in messages.point.items()}
    again = kept.recentred(moved, messages.lam)  # a curvature there for every coordinate
    assert (again.lam["a"][dropped] == 0).all()
    informed = ~dropped
    assert again.mu["a"][informed] == pytest.approx(kept.mu["a"][informed], abs=1e-5)  # a quadratic: same target


def test_the_measured_gradient_of_subsampled_documents_widens_the_messages(tiny_lm):
    corpus = observation_corpus(DOCS)
    bora = bora_pyro.BoRA(tiny_lm[0], corpus.tasks, rank=1, alpha=1, targets=["q_proj"], tau=10.0)
    data = _simulated(shapes=bora.lora.shapes())
    bora.log_likelihood = data.log_likelihood
    options = dict(fisher="empirical", seed=0)
    every = curvature_messages(bora, corpus.train, docs_per_task=None, gradient="data", **options)
    curvature = curvature_messages(bora, corpus.train, docs_per_task=None, gradient="none", **options)
    for name in every.lam:  # every document read: no sampling noise, the raw Fisher
        assert every.lam[name] == pytest.approx(curvature.lam[name], rel=1e-6)
    part = curvature_messages(bora, corpus.train, docs_per_task=2, gradient="data", **options)
    part_raw = curvature_messages(bora, corpus.train, docs_per_task=2, gradient="none", **options)
    for name in part.lam:
        assert (part.lam[name] <= part_raw.lam[name] * (1 + 1e-6)).all()
        assert (part.lam[name] < part_raw.lam[name]).any()


def test_psis_loo_on_training_documents_matches_exact_leave_one_out():
    """loo_training reads the training documents' draws from the ArviZ file and gives PSIS-LOO: on a conjugate
    normal model with many draws it equals the exact leave-one-out predictive density."""
    import arviz as az

    from bora_pyro.evaluation.diagnostics import loo_training

    rng = np.random.default_rng(0)
    y = rng.normal(0.3, 1.0, size=40)
    mu = rng.normal(y.mean(), 1 / math.sqrt(len(y)), size=4000)  # the posterior of the mean (flat prior, sd 1)
    loglik = -0.5 * (y[None] - mu[:, None]) ** 2 - 0.5 * math.log(2 * math.pi)  # [draws, docs]
    idata = az.from_dict(
        posterior={"norm": np.zeros((1, len(mu), 2))},
        log_likelihood={"train_docs": loglik[None]},
        constant_data={"train_doc_task": np.arange(len(y)) % 2},
        coords={"task": ["a", "b"], "train_doc": np.arange(len(y))},
        dims={"norm": ["task"], "train_docs": ["train_doc"], "train_doc_task": ["train_doc"]},
    )
    report = loo_training(idata)
    n = len(y)
    rest = (y.sum() - y) / (n - 1)  # the mean without document i
    exact = -0.5 * (y - rest) ** 2 / (1 + 1 / (n - 1)) - 0.5 * np.log(2 * math.pi * (1 + 1 / (n - 1)))
    assert report.elpd == pytest.approx(exact.sum(), abs=0.3)
    assert report.pointwise.elpd_loo.to_numpy() == pytest.approx(exact, abs=0.05)
    assert list(report.pointwise.task[:3]) == ["a", "b", "a"] and (report.pointwise.khat < report.good_k).all()
    assert "reliable" in report.line() and report.draws == 4000


def test_a_vi_run_keeps_training_draws_for_loo_and_diagnose_shows_khat(tmp_path, capsys):
    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 12, "b": 8}).to_csv(data, index=False)
    run = tmp_path / "run"
    args = train_args(data, run, "--inference", "vi", "--posterior-samples", "8", "--curvature-docs", "3")
    assert main(args) == 0
    import arviz as az

    idata = az.from_netcdf(run / "posterior.nc")
    assert idata.log_likelihood.train_docs.shape[-1] == 6  # 3 training documents of each task
    capsys.readouterr()
    assert main(["diagnose", str(run)]) == 0
    out = capsys.readouterr().out
    assert "PSIS-LOO on 6 training documents (in the fit; 8 draws)" in out and "k-hat" in out
    pointwise = pd.read_csv(run / "loo_training.csv")
    assert list(pointwise.columns) == ["train_doc", "task", "elpd_loo", "khat"] and len(pointwise) == 6
    map_run = tmp_path / "map"
    assert main(train_args(data, map_run, "--posterior-samples", "4")) == 0
    capsys.readouterr()
    assert main(["diagnose", str(map_run)]) == 0
    assert "PSIS-LOO" not in capsys.readouterr().out  # a MAP run's draws are one point: no LOO

"""Variational BoRA: learned tau, posterior predictive, calibration, ArviZ conversion and `diagnose`."""

from __future__ import annotations

import json
import math

import arviz as az
import pandas as pd
import pyro
import pytest
import torch

import bora_pyro
from bora_pyro import PriorConfig
from bora_pyro.cli import main
from bora_pyro.evaluation.predictive import posterior_draws, posterior_predictive, score_plug_in
from bora_pyro.models.tau_prior import TauPrior

from .conftest import synthetic_rows, train_args


def test_learned_tau_needs_vi(tiny_lm):
    with pytest.raises(ValueError, match="tau='learn' needs inference='vi'.*degenerate"):
        bora_pyro.BoRA(tiny_lm[0], ["a", "b"], tau="learn", inference="map")


def test_learned_tau_is_a_site_outside_the_task_plate(make_corpus, tiny_lm):
    corpus = make_corpus()
    bora = bora_pyro.BoRA(
        tiny_lm[0],
        corpus.tasks,
        rank=2,
        inference="vi",
        prior=PriorConfig(tau="learn", tau_prior="gamma:2,0.02", tau_groups="module"),
    )
    bora_pyro.fit(bora, corpus, steps=3, batch_size=4, eval_every=3, progress=False)
    from pyro import poutine

    with bora.param_scope():
        trace = poutine.trace(bora.model).get_trace(corpus.train.collate([0, 1]))
    site = trace.nodes["tau"]
    assert site["cond_indep_stack"] == () and site["value"].shape == (2,)  # q_proj, v_proj
    assert bora.prior.tau_groups() == ["q_proj", "v_proj"]
    q = bora.tau_quantiles()
    assert set(q) == {"q_proj", "v_proj"} and all(lo < mid < hi for lo, mid, hi in q.values())


def test_latent_global_is_a_site_outside_the_task_plate_and_its_median_is_theta(make_corpus, tiny_lm):
    corpus = make_corpus()
    bora = bora_pyro.BoRA(
        tiny_lm[0], corpus.tasks, rank=2, inference="vi", prior=PriorConfig(tau="learn", global_prior="normal:3")
    )
    bora_pyro.fit(bora, corpus, steps=3, batch_size=4, eval_every=3, progress=False)
    from pyro import poutine

    with bora.param_scope():
        trace = poutine.trace(bora.model).get_trace(corpus.train.collate([0, 1]))
        median = bora.guide.median()
        assert not [n for n in pyro.get_param_store().keys() if n.startswith("global.")]  # no Theta parameter
    names = [n for n in trace.nodes if n.startswith("global.")]
    assert names and len(names) == len(bora.lora.shapes())
    for name in names:
        site = trace.nodes[name]
        assert site["type"] == "sample" and site["cond_indep_stack"] == ()
        assert site["fn"].base_dist.scale.unique().tolist() == [3.0]
        assert torch.equal(bora.global_factors()[name.removeprefix("global.")], median[name])


def test_guide_lr_moves_only_the_uncertainty_parameters(make_corpus, tiny_lm):
    corpus = make_corpus()
    bora = bora_pyro.BoRA(
        tiny_lm[0], corpus.tasks, rank=2, inference="vi", prior=PriorConfig(tau="learn", parameterization="centered")
    )
    bora_pyro.fit(
        bora, corpus, steps=1, batch_size=4, eval_every=1, progress=False, lr=1e-9, guide_lr=0.1, clip_norm=None
    )
    with bora.param_scope():
        store = pyro.get_param_store()
        start = bora.prior.initial_values(bora.init)
        locs = {n: store[n] for n in store.keys() if ".locs." in n}
        scales = {n: store[n] for n in store.keys() if ".scales." in n}
    moved = lambda a, b: not torch.allclose(a, b, atol=1e-6)
    assert moved(locs["MeanFieldNormal.locs.tau"], torch.tensor([math.log(TauPrior().median())]))
    assert all(moved(v, torch.full_like(v, 1e-3)) for v in scales.values())
    assert not any(
        moved(v, start[n.removeprefix("MeanFieldNormal.locs.")])
        for n, v in locs.items()
        if n.startswith("MeanFieldNormal.locs.task")
    )


def test_exact_tau_posterior_concentrates_on_the_simulated_precision():
    from .gaussian_oracle import GaussianObservations

    shapes = {"w": (40, 50)}  # 2000 elements, 30 tasks, precise observations
    data = GaussianObservations.simulate(
        shapes, [50] * 30, tau=25.0, sigma=0.1, generator=torch.Generator().manual_seed(0)
    )
    grid = torch.linspace(0.0, 8.0, 2001)
    for theta in ("empirical-bayes", "integrated"):
        post = data.tau_posterior(TauPrior("lognormal", 2.0, 3.0), grid, theta)
        assert post.sum().item() == pytest.approx(1.0)
        mean_tau = float((post * grid.double().exp()).sum())
        assert mean_tau == pytest.approx(data.empirical_tau(), rel=0.08)


@pytest.mark.parametrize("text", ["normal", "normal:-1", "normal:x", "cauchy:1", "flat:2"])
def test_bad_global_prior(text):
    from bora_pyro.models.prior import parse_global_prior

    with pytest.raises(ValueError, match="global prior must be 'flat' or 'normal:SCALE'"):
        parse_global_prior(text)


@pytest.mark.parametrize(
    "text, message",
    [
        ("cauchy:1,2", "tau prior must be one of"),
        ("lognormal:1", "must look like"),
        ("gamma:-1,2", "positive parameters"),
    ],
)
def test_bad_tau_prior(text, message):
    with pytest.raises(ValueError, match=message):
        TauPrior.parse(text)


def test_posterior_predictive_of_a_map_fit_is_the_plug_in(make_corpus, tiny_lm):
    corpus = make_corpus()
    bora = bora_pyro.BoRA(tiny_lm[0], corpus.tasks, rank=2, tau=10.0)
    bora_pyro.fit(bora, corpus, steps=4, batch_size=4, eval_every=4, progress=False)
    report, per_draw = posterior_predictive(bora, corpus.test, posterior_draws(bora, 3))
    assert per_draw.shape == (3, len(corpus.test))
    assert report.token_weighted == pytest.approx(bora_pyro.evaluate(bora, corpus.test).token_weighted, rel=1e-6)


def test_posterior_predictive_mixes_distinct_vi_draws(make_corpus, tiny_lm):
    corpus = make_corpus()
    bora = bora_pyro.BoRA(tiny_lm[0], corpus.tasks, rank=2, tau=10.0, inference="vi")
    bora_pyro.fit(bora, corpus, steps=4, batch_size=4, eval_every=4, progress=False)
    draws = posterior_draws(bora, 4, seed=1)
    report, per_draw = posterior_predictive(bora, corpus.test, draws)
    assert not torch.allclose(per_draw[0], per_draw[1])  # draws differ
    mixture = torch.logsumexp(per_draw, 0) - math.log(4)
    assert (mixture >= per_draw.mean(0) - 1e-9).all()  # Jensen: log-mean-exp >= mean of logs
    assert report.loglik.sum() == pytest.approx(mixture.sum().item(), rel=1e-9)


def test_one_scoring_pass_gives_the_perplexity_of_evaluate(make_corpus, tiny_lm):
    corpus = make_corpus()
    bora = bora_pyro.BoRA(tiny_lm[0], corpus.tasks, rank=2)
    bora_pyro.fit(bora, corpus, steps=3, batch_size=4, eval_every=3, progress=False, lr=0.05)
    report, doc_loglik, _, _ = score_plug_in(bora, corpus.test, batch_size=3)
    expected = bora_pyro.evaluate(bora, corpus.test, batch_size=5)
    assert report.loglik == pytest.approx(expected.loglik, rel=1e-6)
    assert doc_loglik.sum().item() == pytest.approx(expected.loglik.sum(), rel=1e-6)


def test_calibration_of_a_uniform_predictor(make_corpus, tiny_lm):
    corpus = make_corpus()
    bora = bora_pyro.BoRA(tiny_lm[0], corpus.tasks, rank=2)
    for p in bora.lora.lm.lm_head.parameters():
        p.data.zero_()  # every next token has probability 1 / vocab
    _, _, per_task, overall = score_plug_in(bora, corpus.test)
    vocab = bora.lora.lm.config.vocab_size
    assert overall["brier"] == pytest.approx(1 - 1 / vocab, rel=1e-5)  # sum p^2 - 2 p_true + 1
    assert per_task.ece.max() == pytest.approx(1 / vocab, abs=1e-3)  # confident 1/V, right ~never
    assert list(per_task.task) == list(corpus.tasks)


def test_runs_get_posterior_nc_and_diagnose_compares_three(tmp_path, capsys):
    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 10, "b": 6, "c": 4}).to_csv(data, index=False)
    common = ["--steps", "4", "--eval-every", "2", "--posterior-samples", "4"]
    runs = {
        "tau10": ["--tau", "10"],
        "vi10": ["--tau", "10", "--inference", "vi"],
        "learned": ["--tau", "learn", "--inference", "vi"],
    }
    for name, extra in runs.items():
        assert main(train_args(data, tmp_path / name, *common, *extra)) == 0
    idata = az.from_netcdf(tmp_path / "learned" / "posterior.nc")
    assert {"posterior", "log_likelihood", "constant_data", "elbo"} <= set(idata.groups())
    assert idata.posterior.distance.dims == ("chain", "draw", "task")
    assert list(idata.posterior.task.values) == ["a", "b", "c"]
    assert idata.constant_data.distance_of_mean.dims == ("task",)
    per_task = pd.read_csv(tmp_path / "learned" / "per_task.csv")
    assert idata.constant_data.distance_of_mean.values == pytest.approx(per_task.distance_to_global.values, rel=1e-5)
    assert idata.log_likelihood.docs.shape[:2] == (1, 4)
    assert "tau" in idata.posterior and "tau" not in az.from_netcdf(tmp_path / "vi10" / "posterior.nc").posterior
    metrics = json.loads((tmp_path / "learned" / "metrics.json").read_text())
    assert metrics["posterior_predictive_test_ppl"] > 0 and 0 <= metrics["test_ece"] <= 1
    capsys.readouterr()
    assert main(["diagnose", *(str(tmp_path / n) for n in runs), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    comparison = out[out.index("compared by elpd") :]  # LOO only per run, on its training documents
    assert "loo" not in comparison.lower() and "PSIS-LOO on 15 training documents" in out
    table = pd.read_csv(tmp_path / "compare.csv", index_col=0)
    assert set(table.index) == set(runs) and table.elpd_diff.min() == 0 and (table.elpd_diff >= 0).all()
    docs = {n: pd.read_csv(tmp_path / n / "test_docs.csv") for n in runs}
    assert table.elpd.to_dict() == pytest.approx({n: d.elpd.sum() for n, d in docs.items()})
    for name in ("tau_posterior.png", "tau_guide_draws.png", "distance_forest.png", "elbo_trace.png"):
        assert (tmp_path / "learned" / name).is_file()


def test_diagnose_of_a_folder_that_is_no_run_is_a_clear_error(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err

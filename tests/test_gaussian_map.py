"""With a Gaussian likelihood swapped in, BoRA is the normal hierarchical model:

    y_{d,i} ~ N(theta_d, sigma^2),  theta_d ~ N(Theta, 1/tau),  flat Theta
    Theta   = sum_d w_d ybar_d / sum_d w_d,        w_d = 1 / (sigma^2 / n_d + 1 / tau)
    theta_d | Theta, y ~ N((n_d ybar_d / sigma^2 + tau Theta) / (n_d / sigma^2 + tau), 1 / (n_d / sigma^2 + tau))

The MAP (AutoDelta) must hit the means; AutoNormal (Theta a parameter) must hit means and sds.
"""

from __future__ import annotations

import pytest
import torch

import bora_pyro
from bora_pyro import PriorConfig
from bora_pyro.io.base_models import tiny_random_llama

from .gaussian_oracle import GaussianObservations, observation_corpus

SIGMA, TAU, DOCS = 0.5, 4.0, [12, 5, 2]
NAME = "layers.0.self_attn.q_proj.A"  # the observed factor; the others only feel the prior


def gaussian_bora(parameterization: str = "noncentered", **options):
    corpus = observation_corpus(DOCS)
    bora = bora_pyro.BoRA(
        tiny_random_llama()[0],
        corpus.tasks,
        rank=1,
        alpha=1,
        targets=["q_proj"],
        prior=PriorConfig(tau=TAU, parameterization=parameterization),
        **options,
    )
    data = GaussianObservations.simulate(
        {NAME: bora.lora.shapes()[NAME]}, DOCS, tau=1.0, sigma=SIGMA, generator=torch.Generator().manual_seed(0)
    )
    bora.log_likelihood = data.log_likelihood
    return bora, corpus, data


@pytest.mark.parametrize("parameterization", ["centered", "noncentered"])
def test_map_recovers_the_closed_form_hierarchical_normal_estimate(parameterization):
    bora, corpus, data = gaussian_bora(parameterization=parameterization)
    bora_pyro.fit(
        bora,
        corpus,
        steps=1500,
        batch_size=sum(DOCS),
        lr=0.05,
        lr_schedule="cosine",
        clip_norm=None,
        eval_every=1500,
        progress=False,
    )
    Theta, theta, _ = data.closed_form(NAME, TAU)
    torch.testing.assert_close(bora.global_factors()[NAME], Theta, atol=2e-3, rtol=0)
    torch.testing.assert_close(bora.task_factors()[NAME], theta, atol=2e-3, rtol=0)
    ybar_small = data.y[NAME][data.task_index == 2].mean(0)
    assert (theta[2] - ybar_small).abs().mean() > 0.05  # shrinkage is real for the smallest task


def test_vi_recovers_the_exact_gaussian_posterior():
    bora, corpus, data = gaussian_bora(parameterization="centered", inference="vi")
    bora_pyro.fit(
        bora,
        corpus,
        steps=1200,
        batch_size=sum(DOCS),
        lr=0.03,
        guide_lr=0.03,
        lr_schedule="cosine",
        clip_norm=None,
        eval_every=1200,
        num_particles=2,
        progress=False,
    )
    _, mean, sd = data.closed_form(NAME, TAU)
    with bora.param_scope():
        q = bora.guide.quantiles([0.5, 0.8413447])[f"task.{NAME}"]  # median and +1 sd
    ratio = (q[1] - q[0]) / sd.expand_as(q[0])
    print(
        f"max |mean error| {(q[0] - mean).abs().max():.4f}; "
        f"sd ratio mean {ratio.mean():.3f} [{ratio.min():.2f}, {ratio.max():.2f}]"
    )
    torch.testing.assert_close(q[0], mean, atol=0.05, rtol=0)
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.1)  # posterior sd within 10% on average
    assert ((ratio - 1).abs() < 0.4).all()

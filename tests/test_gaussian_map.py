"""With a Gaussian likelihood swapped in, the MAP of the BoRA model is the closed-form answer of the
normal hierarchical model:

    y_{d,i} ~ N(theta_d, sigma^2),  theta_d ~ N(Theta, 1/tau),  flat Theta
    Theta   = sum_d w_d ybar_d / sum_d w_d,        w_d = 1 / (sigma^2 / n_d + 1 / tau)
    theta_d = (n_d ybar_d / sigma^2 + tau Theta) / (n_d / sigma^2 + tau)
"""

from __future__ import annotations

import pytest
import torch

import bora_pyro
from bora_pyro.base_models import tiny_random_llama
from bora_pyro.data import Corpus, Split

SIGMA = 0.5


def gaussian_corpus(docs_per_task: list[int]) -> Corpus:
    """A corpus whose documents only carry an index: the likelihood looks up their observations."""
    task_index = tuple(d for d, n in enumerate(docs_per_task) for _ in range(n))
    ids = tuple((1, 2) for _ in task_index)
    tasks = tuple(f"task{d}" for d in range(len(docs_per_task)))
    split = Split("train", tasks, ids, ids, task_index, pad_token_id=0)
    return Corpus("gaussian", tasks, split, split, split)


@pytest.mark.parametrize("parameterization", ["centered", "noncentered"])
def test_map_recovers_the_closed_form_hierarchical_normal_estimate(parameterization):
    tau = 4.0
    docs = [12, 5, 2]
    corpus = gaussian_corpus(docs)
    lm, _ = tiny_random_llama()
    bora = bora_pyro.BoRA(lm, corpus.tasks, rank=1, alpha=1, tau=tau, targets=["q_proj"],
                          parameterization=parameterization)
    name = "layers.0.self_attn.q_proj.A"  # the likelihood observes this factor; others only feel the prior
    shape = bora.lora.shapes()[name]
    g = torch.Generator().manual_seed(0)
    true_means = torch.randn((len(docs), *shape), generator=g)
    task = torch.tensor(corpus.train.task_index)
    y = true_means[task] + SIGMA * torch.randn((len(task), *shape), generator=g)  # [docs, r, in]

    def gaussian_loglik(factors, batch):
        resid = y[batch.doc_index] - factors[name][batch.task_index]
        return (-0.5 * resid**2 / SIGMA**2).flatten(1).sum(-1)  # [batch] (constants dropped)

    bora.log_likelihood = gaussian_loglik
    bora_pyro.fit(bora, corpus, steps=1500, batch_size=len(task), lr=0.05, lr_schedule="cosine",
                  clip_norm=None, eval_every=1500, progress=False)

    n = torch.tensor(docs, dtype=torch.float32).view(-1, 1, 1)
    ybar = torch.stack([y[task == d].mean(0) for d in range(len(docs))])
    w = 1.0 / (SIGMA**2 / n + 1.0 / tau)
    Theta = (w * ybar).sum(0) / w.sum(0)
    theta = (n * ybar / SIGMA**2 + tau * Theta) / (n / SIGMA**2 + tau)

    torch.testing.assert_close(bora.global_factors()[name], Theta, atol=2e-3, rtol=0)
    torch.testing.assert_close(bora.task_factors()[name], theta, atol=2e-3, rtol=0)
    # shrinkage is real: the smallest task sits far from its own mean
    assert (theta[2] - ybar[2]).abs().mean() > 0.05


def test_vi_recovers_the_exact_gaussian_posterior():
    """AutoNormal with Theta as a parameter (empirical Bayes): the posterior of theta_d given Theta is
    Normal with precision n_d / sigma^2 + tau around the shrunk mean, and mean-field is exact here."""
    tau = 4.0
    docs = [12, 5, 2]
    corpus = gaussian_corpus(docs)
    lm, _ = tiny_random_llama()
    bora = bora_pyro.BoRA(lm, corpus.tasks, rank=1, alpha=1, tau=tau, targets=["q_proj"], inference="vi",
                          parameterization="centered")
    name = "layers.0.self_attn.q_proj.A"
    shape = bora.lora.shapes()[name]
    g = torch.Generator().manual_seed(0)
    task = torch.tensor(corpus.train.task_index)
    y = torch.randn((len(docs), *shape), generator=g)[task] + SIGMA * torch.randn((len(task), *shape), generator=g)
    bora.log_likelihood = lambda f, b: (-0.5 * (y[b.doc_index] - f[name][b.task_index]) ** 2 / SIGMA**2).flatten(1).sum(-1)
    bora_pyro.fit(bora, corpus, steps=1200, batch_size=len(task), lr=0.03, lr_schedule="cosine", clip_norm=None,
                  eval_every=1200, num_particles=2, progress=False)

    n = torch.tensor(docs, dtype=torch.float32).view(-1, 1, 1)
    ybar = torch.stack([y[task == d].mean(0) for d in range(len(docs))])
    w = 1.0 / (SIGMA**2 / n + 1.0 / tau)
    Theta = (w * ybar).sum(0) / w.sum(0)
    precision = n / SIGMA**2 + tau
    mean = (n * ybar / SIGMA**2 + tau * Theta) / precision
    with bora.param_scope():
        q = bora.guide.quantiles([0.5, 0.8413447])[f"task.{name}"]  # median and +1 sd
    r = sd_ratio(q, precision)
    print(f"max |mean error| {(q[0] - mean).abs().max():.4f}; sd ratio mean {r.mean():.3f} [{r.min():.2f}, {r.max():.2f}]")
    torch.testing.assert_close(q[0], mean, atol=0.05, rtol=0)
    ratio = sd_ratio(q, precision)
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.1)  # posterior sd within 10% on average
    assert ((ratio - 1).abs() < 0.4).all()


def sd_ratio(q: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Fitted posterior sd over the exact one. Shapes: q [2, D, ...], precision [D, 1, 1] -> [D, ...]."""
    return (q[1] - q[0]) / (1 / precision.sqrt()).expand_as(q[0])

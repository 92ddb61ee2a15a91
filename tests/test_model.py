"""The BoRA Pyro model: sites and plates, prior density, likelihood scaling, the exact limits."""

from __future__ import annotations

import math

import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.util import site_is_subsample

import bora_pyro
from bora_pyro import PriorConfig
from bora_pyro.io.base_models import tiny_random_llama

from .conftest import synthetic_rows


def is_latent(site) -> bool:
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


def trace_model(bora, batch, values=None):
    """Trace bora.model with the task sites fixed to ``values`` (default: the guide's start)."""
    with bora.param_scope():
        model = poutine.condition(bora.model, data=values) if values else bora.model
        guide_trace = poutine.trace(bora.guide).get_trace(batch)
        trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    trace.compute_log_prob()
    return trace


@pytest.mark.parametrize("parameterization", ["centered", "noncentered"])
def test_sites_and_plates(make_corpus, tiny_lm, parameterization):
    corpus = make_corpus()
    bora = bora_pyro.BoRA(
        tiny_lm[0], corpus.tasks, rank=2, alpha=4, prior=PriorConfig(tau=10.0, parameterization=parameterization)
    )
    batch = corpus.train.collate([0, 5, 15])
    trace = trace_model(bora, batch)
    samples = {n: s for n, s in trace.nodes.items() if is_latent(s)}
    suffix = "_decentered" if parameterization == "noncentered" else ""
    expected = {f"task.{name}{suffix}" for name in bora.lora.shapes()}
    assert set(samples) == expected
    present = sorted(set(batch.task_index.tolist()))
    assert len(present) < len(corpus.tasks)  # the batch misses a task: only the present ones are sampled
    for site in samples.values():
        assert [f.name for f in site["cond_indep_stack"]] == ["tasks"]
        assert site["value"].shape[0] == len(present)
    params = {n: s for n, s in trace.nodes.items() if s["type"] == "param"}
    assert {f"global.{n}" for n in bora.lora.shapes()} <= set(params)
    for site in params.values():
        assert site.get("cond_indep_stack", ()) == ()  # Theta is outside every plate
    loglik = trace.nodes["loglik"]
    assert [f.name for f in loglik["cond_indep_stack"]] == ["docs"]


def test_loglik_factor_is_scaled_by_num_docs_over_batch(make_corpus, tiny_lm):
    corpus = make_corpus()
    bora = bora_pyro.BoRA(tiny_lm[0], corpus.tasks, rank=2, alpha=4, tau=10.0)
    batch = corpus.train.collate([1, 2, 3, 9])
    site = trace_model(bora, batch).nodes["loglik"]
    assert site["scale"] == pytest.approx(len(corpus.train) / 4)
    # the unscaled factor is the exact per-document LM log-likelihood
    with torch.no_grad():
        expected = bora.log_likelihood(bora.task_factors(), batch)
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("parameterization", ["centered", "noncentered"])
def test_prior_log_density_is_the_gaussian_sum(make_corpus, tiny_lm, parameterization):
    corpus = make_corpus()
    tau = 7.0
    bora = bora_pyro.BoRA(
        tiny_lm[0],
        corpus.tasks,
        rank=2,
        alpha=4,
        prior=PriorConfig(tau=tau, parameterization=parameterization),
        task_subsampling=False,
    )
    g = torch.Generator().manual_seed(1)
    theta = {n: torch.randn((3, *s), generator=g) for n, s in bora.lora.shapes().items()}
    batch = corpus.train.collate([0])
    with bora.param_scope():
        Theta = bora.global_factors()
        if parameterization == "noncentered":  # condition on z = sqrt(tau) (theta - Theta)
            values = {f"task.{n}_decentered": (v - Theta[n]) * math.sqrt(tau) for n, v in theta.items()}
        else:
            values = {f"task.{n}": v for n, v in theta.items()}
        trace = poutine.trace(poutine.condition(bora.model, data=values)).get_trace(batch)
    trace.compute_log_prob()
    prior = sum(s["log_prob_sum"] for n, s in trace.nodes.items() if n.startswith("task.") and s["type"] == "sample")
    closed_form = sum(
        (-0.5 * tau * (theta[n] - Theta[n]) ** 2 + 0.5 * math.log(tau) - 0.5 * math.log(2 * math.pi)).sum()
        for n in theta
    )
    if parameterization == "noncentered":
        # z ~ N(0, 1): the density of z differs from that of theta by the constant Jacobian log sqrt(tau) per element
        closed_form = closed_form - 0.5 * math.log(tau) * sum(v.numel() for v in theta.values())
    torch.testing.assert_close(prior, closed_form, atol=1e-2, rtol=1e-6)


def prior_log_density(bora, batch, values) -> torch.Tensor:
    """The (scaled) log-density of the task sites of ``bora.model(batch)`` at the given task values."""
    with bora.param_scope():
        trace = trace_model(bora, batch, values)
    return sum(s["log_prob_sum"] for n, s in trace.nodes.items() if n.startswith("task.") and s["type"] == "sample")


@pytest.mark.parametrize("parameterization", ["centered", "noncentered"])
def test_task_subsampled_prior_is_an_unbiased_estimate_of_the_full_prior(make_corpus, tiny_lm, parameterization):
    """Averaged over all batches of one document, the weighted prior terms of the present tasks equal
    the full prior of all tasks (weights (N / B) c_d / n_d)."""
    corpus = make_corpus()
    bora = bora_pyro.BoRA(
        tiny_lm[0], corpus.tasks, rank=2, alpha=4, prior=PriorConfig(tau=7.0, parameterization=parameterization)
    )
    suffix = "_decentered" if parameterization == "noncentered" else ""
    g = torch.Generator().manual_seed(2)
    full = {f"task.{n}{suffix}": torch.randn((3, *s), generator=g) for n, s in bora.lora.shapes().items()}
    docs = range(len(corpus.train))

    def estimate(indices):
        batch = corpus.train.collate(indices)
        present = torch.unique(batch.task_index)
        return prior_log_density(bora, batch, {n: v[present] for n, v in full.items()})

    mean = sum(estimate([i]) for i in docs) / len(corpus.train)
    bora.task_subsampling = False
    exact = prior_log_density(bora, corpus.train.collate([0]), full)
    assert exact < -1  # the task sites were found and scored
    torch.testing.assert_close(mean, exact, rtol=1e-5, atol=1e-3)
    bora.task_subsampling = True
    torch.testing.assert_close(estimate(list(docs)), exact, rtol=1e-5, atol=1e-3)  # a full batch is exact


def test_pooled_mode_has_no_task_sites_and_shares_one_adapter(make_corpus, tiny_lm):
    corpus = make_corpus()
    bora = bora_pyro.BoRA(tiny_lm[0], corpus.tasks, rank=2, alpha=4, tau=float("inf"))
    bora_pyro.fit(bora, corpus, steps=3, batch_size=4, eval_every=3, progress=False)
    trace = trace_model(bora, corpus.train.collate([0, 1]))
    assert not [n for n, s in trace.nodes.items() if is_latent(s)]
    factors = bora.task_factors()
    assert any(v.abs().sum() > 0 for n, v in factors.items() if n.endswith(".B"))  # it did train
    input_ids = corpus.test.collate(list(range(len(corpus.test)))).input_ids[:1].repeat(3, 1)
    with torch.no_grad(), bora.lora.activate(factors, torch.arange(3)):
        out = bora.lora.lm(input_ids=input_ids).logits
    torch.testing.assert_close(out[0], out[1], atol=0, rtol=0)
    torch.testing.assert_close(out[0], out[2], atol=0, rtol=0)


def test_independent_training_equals_training_each_task_alone(tmp_path, tiny_lm):
    """tau = 0: joint training of D tasks == D separate single-task trainings (full batches, no clipping)."""
    rows = synthetic_rows({"alpha": 6, "beta": 5, "gamma": 4})
    options = dict(steps=4, lr=5e-2, clip_norm=None, eval_every=100, progress=False)

    def train(frame):
        path = tmp_path / "rows.csv"
        frame.to_csv(path, index=False)
        corpus = bora_pyro.load_corpus(f"csv:{path}", tiny_lm[1], max_tokens=48)
        bora = bora_pyro.BoRA(tiny_random_llama()[0], corpus.tasks, rank=2, alpha=4, tau=0.0)
        bora_pyro.fit(bora, corpus, batch_size=len(corpus.train), **options)
        return corpus.tasks, bora.task_factors()

    tasks, together = train(rows)
    for d, task in enumerate(tasks):
        _, alone = train(rows[rows.task == task])
        for name, value in alone.items():
            torch.testing.assert_close(together[name][d], value[0], atol=1e-5, rtol=0)
    first = together[next(iter(together))]
    assert not torch.allclose(first[0], first[1])  # the tasks did learn different adapters


def test_independent_task_gradient_ignores_other_tasks_examples(make_corpus, tiny_lm):
    corpus = make_corpus()
    bora = bora_pyro.BoRA(tiny_lm[0], corpus.tasks, rank=2, alpha=4, tau=0.0)
    task = corpus.train.task_index
    mine = [i for i in range(len(corpus.train)) if task[i] == 0][:2]
    others_a = [i for i in range(len(corpus.train)) if task[i] == 1][:2]
    others_b = [i for i in range(len(corpus.train)) if task[i] == 2][:2]

    def task0_grads(indices):
        batch = corpus.train.collate(indices)
        with bora.param_scope():
            bora.guide(batch)  # creates the guide's parameters
            loss = Trace_ELBO().differentiable_loss(bora.model, bora.guide, batch)
            names, values = zip(*bora.guide.named_parameters())
            grads = [g.to_dense() for g in torch.autograd.grad(loss, values)]  # row-sparse for absent tasks
        return {n: g[0] for n, g in zip(names, grads)}, {n: g[1:] for n, g in zip(names, grads)}

    own_a, rest_a = task0_grads(mine + others_a)
    own_b, rest_b = task0_grads(mine + others_b)
    for name in own_a:
        torch.testing.assert_close(own_a[name], own_b[name], atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(rest_a[n], rest_b[n]) for n in rest_a)  # the other tasks' gradients did change


@pytest.mark.parametrize("tau", [-1.0, float("nan"), "abc"])
def test_bad_tau_is_refused(tiny_lm, tau):
    with pytest.raises(ValueError, match="tau must be 0, a number in"):
        bora_pyro.BoRA(tiny_lm[0], ["a", "b"], tau=tau)


def test_duplicate_task_names_are_refused(tiny_lm):
    with pytest.raises(ValueError, match=r"duplicated: \['a'\]"):
        bora_pyro.BoRA(tiny_lm[0], ["a", "b", "a"])


def test_the_task_name_global_is_reserved_for_theta(tiny_lm):
    with pytest.raises(ValueError, match="a task is named 'global', a name reserved for Theta"):
        bora_pyro.BoRA(tiny_lm[0], ["a", "global"])


@pytest.mark.parametrize("parameterization", ["centered", "noncentered"])
def test_map_loss_equals_the_trace_elbo_of_the_autodelta_guide(make_corpus, tiny_lm, parameterization):
    from pyro.infer import Trace_ELBO

    from bora_pyro.inference.svi import map_loss

    corpus = make_corpus()
    bora = bora_pyro.BoRA(
        tiny_lm[0], corpus.tasks, rank=2, alpha=4, prior=PriorConfig(tau=7.0, parameterization=parameterization)
    )
    bora_pyro.fit(bora, corpus, steps=3, batch_size=4, eval_every=3, progress=False, lr=0.05)  # move off the start
    batch = corpus.train.collate([0, 3, 7])
    with bora.param_scope():
        expected = Trace_ELBO().differentiable_loss(bora.model, bora.guide, batch)
        torch.testing.assert_close(map_loss(bora, batch), expected, rtol=1e-6, atol=1e-3)


def test_stacked_normal_is_the_elementwise_normal_density():
    import pyro.distributions as dist

    from bora_pyro.models.stacked_normal import StackedNormal

    g = torch.Generator().manual_seed(0)
    x, loc, scale = torch.randn(4, 3, 5, generator=g), torch.randn(3, 5, generator=g), torch.tensor(0.7)
    expected = dist.Normal(loc, scale).to_event(2).log_prob(x)  # [4]
    torch.testing.assert_close(StackedNormal(loc, scale, (3, 5), (4,)).log_prob(x), expected)
    torch.testing.assert_close(
        StackedNormal(None, scale, (3, 5), (4,)).log_prob(x),
        dist.Normal(0.0, scale).expand((3, 5)).to_event(2).log_prob(x),
    )
    draws = StackedNormal(loc, scale, (3, 5), (4,)).sample((2000,))
    assert draws.shape == (2000, 4, 3, 5)
    torch.testing.assert_close(draws.mean((0, 1)), loc, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="0-dim scale"):
        StackedNormal(loc, torch.ones(3), (3, 5))


def test_closed_form_kl_to_the_task_prior_matches_torch():
    import pyro.distributions as dist
    from torch.distributions import kl_divergence

    from bora_pyro.models.stacked_normal import StackedNormal

    g = torch.Generator().manual_seed(0)
    loc, scale = torch.randn(4, 3, 5, generator=g), torch.rand(4, 3, 5, generator=g) + 0.1
    q = dist.Normal(loc, scale).to_event(2)
    prior_loc, prior_scale = torch.randn(3, 5, generator=g), torch.tensor(0.3)
    for p_ours, p_torch in [
        (StackedNormal(prior_loc, prior_scale, (3, 5), (4,)), dist.Normal(prior_loc, prior_scale)),
        (StackedNormal(None, prior_scale, (3, 5), (4,)), dist.Normal(0.0, prior_scale)),
    ]:
        expected = kl_divergence(q, p_torch.expand((4, 3, 5)).to_event(2))
        torch.testing.assert_close(kl_divergence(q, p_ours), expected)

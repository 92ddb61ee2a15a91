"""--task-sampling: proportional (every document alike, today's epochs), uniform (every task alike) or
temperature:T (task probability ∝ n_d^(1/T)), the likelihood and the task-sparse prior estimate reweighted
so that the objective is an unbiased estimate of the full-data log joint: the posterior is the same under
every sampling, checked against the closed form of the normal hierarchical model (tests/test_gaussian_map.py).
"""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest
import torch
from pyro import poutine

import bora_pyro
from bora_pyro.cli import main
from bora_pyro.data.sampling import parse_task_sampling, task_probabilities
from bora_pyro.inference.svi import map_loss, trainable_parameters

from .conftest import synthetic_rows
from .gaussian_oracle import observation_corpus
from .test_distributed import test_two_gloo_processes_equal_one_process as two_processes_equal_one
from .test_gaussian_map import DOCS, NAME, SIGMA, TAU, gaussian_bora
from .test_resume import assert_same_run, resume_args, run_cli

MODES = {"uniform": math.inf, "temperature:2": 2.0}
N, D = sum(DOCS), len(DOCS)


def step_probabilities(temperature: float) -> np.ndarray:
    """The probability pi_i that one draw of a step is document i. Shapes: -> [docs]."""
    n = np.asarray(DOCS, dtype=np.float64)
    q = task_probabilities(n, temperature)
    return np.concatenate([np.full(k, q[d] / k) for d, k in enumerate(DOCS)])


def gradient(bora, batch, params) -> list[torch.Tensor]:
    """The MAP objective's gradient on ``batch`` (dense)."""
    with bora.param_scope():
        grads = torch.autograd.grad(map_loss(bora, batch), list(params.values()), allow_unused=True)
    return [
        torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g)
        for g, p in zip(grads, params.values())
    ]


def perturbed(parameterization: str = "noncentered"):
    """The Gaussian BoRA with its parameters created and moved off their start (a point where every
    term of the objective has a non-zero gradient)."""
    bora, corpus, data = gaussian_bora(parameterization)
    with bora.param_scope():
        params = trainable_parameters(bora, map_loss, corpus.train.collate(list(range(N))))
        with torch.no_grad():
            for p in params.values():
                p.add_(0.3 * torch.randn_like(p))
    return bora, corpus, data, params


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    flat = lambda ts: torch.cat([t.flatten() for t in ts])
    return float((flat(got) - flat(want)).norm() / flat(want).norm())


@pytest.mark.parametrize("parameterization", ["centered", "noncentered"])
@pytest.mark.parametrize("mode", list(MODES))
def test_the_expected_step_gradient_is_the_full_data_gradient(mode, parameterization):
    """A step's B examples are i.i.d. and its objective is (1 / B) sum_b l(x_b), so its expected gradient is
    sum_i pi_i grad l(i), computed exactly from one-document batches: it must be the full-data gradient."""
    bora, corpus, _, params = perturbed(parameterization)
    full = gradient(bora, corpus.train.collate(list(range(N))), params)  # proportional, B = N: the exact log joint
    pi = step_probabilities(MODES[mode])
    weight = corpus.train.task_weights(MODES[mode])

    def expected(task_weight) -> list[torch.Tensor]:
        per_doc = [gradient(bora, corpus.train.collate([i]).replace(task_weight=task_weight), params) for i in range(N)]
        return [sum(float(pi[i]) * per_doc[i][k] for i in range(N)) for k in range(len(full))]

    error = relative_error(expected(weight), full)
    unweighted = relative_error(expected(None), full)  # the same draws, the likelihood and prior left unweighted
    print(f"{mode} {parameterization}: relative error {error:.2e}, unweighted {unweighted:.2f}")
    assert error < 1e-5
    assert unweighted > 0.2


def test_a_sharded_step_equals_the_whole_step():
    """Data parallelism: ranks that each take half of a uniform-sampling step (and know the whole step's
    tasks) average to the whole step's gradient: every rank weights its examples and the prior alike."""
    bora, corpus, _, params = perturbed()
    indices = next(corpus.train.train_batch_indices(8, seed=3, temperature=math.inf))
    weight = corpus.train.task_weights(math.inf)
    whole = corpus.train.collate(indices).replace(task_weight=weight)
    shards = [
        corpus.train.collate(part).replace(task_weight=weight, step_task_index=whole.task_index)
        for part in (indices[:4], indices[4:])
    ]
    mean = [sum(gs) / 2 for gs in zip(*(gradient(bora, s, params) for s in shards))]
    assert relative_error(mean, gradient(bora, whole, params)) < 1e-5


@pytest.mark.parametrize("inference", ["map", "vi"])
def test_each_example_and_task_carries_its_inverse_probability(inference):
    """Example b of a uniform-sampling step carries 1 / (B pi_b), the prior term of a task d present c_d
    times c_d / (B q_d): what makes both estimates unbiased."""
    bora, corpus, _ = gaussian_bora("centered", inference=inference)
    indices = next(corpus.train.train_batch_indices(8, seed=0, temperature=math.inf))
    batch = corpus.train.collate(indices).replace(task_weight=corpus.train.task_weights(math.inf))
    with bora.param_scope():
        guide_trace = poutine.trace(bora.guide).get_trace(batch)
        trace = poutine.trace(poutine.replay(bora.model, trace=guide_trace)).get_trace(batch)
    pi = step_probabilities(math.inf)[indices]
    torch.testing.assert_close(trace.nodes["loglik"]["scale"], torch.as_tensor(1 / (8 * pi), dtype=torch.float32))
    present, counts = torch.unique(batch.task_index, return_counts=True)
    task_site = trace.nodes[f"task.{NAME}"]
    torch.testing.assert_close(task_site["scale"], counts / (8 * (1 / D)), check_dtype=False)
    assert task_site["value"].shape[0] == len(present)


def test_two_gloo_processes_under_uniform_sampling_equal_one_process(tmp_path):
    """Each rank weights its half of every uniform-sampling step alike: the parameters are one process's."""
    two_processes_equal_one(tmp_path, ("--tau", "10", "--task-sampling", "uniform"), 1e-5)


@pytest.mark.parametrize("mode", list(MODES))
def test_map_under_task_sampling_is_the_closed_form_hierarchical_estimate(mode):
    """fit() on minibatches of 8 of the 19 documents, drawn by ``mode``, reaches the closed-form MAP of the
    normal hierarchical model (the same as under proportional sampling)."""
    bora, corpus, data = gaussian_bora()
    bora_pyro.fit(
        bora,
        corpus,
        steps=2000,
        batch_size=8,
        lr=0.05,
        lr_schedule="cosine",
        clip_norm=None,
        eval_every=2000,
        progress=False,
        task_sampling=mode,
    )
    Theta, theta, _ = data.closed_form(NAME, TAU)
    global_error = (bora.global_factors()[NAME] - Theta).abs().max().item()
    task_error = (bora.task_factors()[NAME] - theta).abs().max().item()
    # Left unweighted, the expected objective weighs task d's likelihood and prior terms by N q_d / n_d: the
    # task means given Theta are unchanged, but Theta is the mean of the task means weighted by
    # (N q_d / n_d) / (sigma^2 / n_d + 1 / tau) instead of 1 / (sigma^2 / n_d + 1 / tau).
    n = torch.tensor(DOCS, dtype=torch.float64).view(-1, 1, 1)
    ybar = torch.stack([data.y[NAME][data.task_index == d].mean(0) for d in range(D)]).double()
    q = torch.as_tensor(task_probabilities(np.asarray(DOCS), MODES[mode])).view(-1, 1, 1)
    w = N * q / n / (SIGMA**2 / n + 1 / TAU)
    wrong = ((w * ybar).sum(0) / w.sum(0) - Theta).abs().max().item()
    print(f"{mode}: max |Theta error| {global_error:.4f}, max |theta_d error| {task_error:.4f}; unweighted {wrong:.3f}")
    assert global_error < 0.1 and task_error < 0.1  # minibatch noise at the end of the cosine schedule: ~0.03
    assert wrong > 0.3  # an unweighted objective's optimum is far outside that tolerance


@pytest.mark.parametrize("mode", list(MODES) + ["temperature:0.5"])
def test_task_and_document_frequencies_follow_the_sampling(mode):
    corpus = observation_corpus(DOCS)
    temperature = parse_task_sampling(mode)
    stream = corpus.train.train_batch_indices(8, seed=0, temperature=temperature)
    drawn = np.concatenate([next(stream) for _ in range(4000)])  # 32,000 draws
    tasks = np.asarray(corpus.train.task_index)[drawn]
    n = np.asarray(DOCS, dtype=np.float64)
    expected = n ** (1 / temperature) / (n ** (1 / temperature)).sum()  # uniform: 1 / D
    np.testing.assert_allclose(np.bincount(tasks, minlength=D) / len(tasks), expected, atol=0.012)  # ~4.5 sd
    np.testing.assert_allclose(
        np.bincount(drawn, minlength=N) / len(drawn), step_probabilities(temperature), atol=0.009
    )


def test_uniform_draws_every_task_alike():
    corpus = observation_corpus(DOCS)
    assert task_probabilities(corpus.train.docs_per_task(), math.inf).tolist() == pytest.approx([1 / 3] * 3)
    assert task_probabilities(np.array([4, 0, 2]), math.inf).tolist() == pytest.approx([0.5, 0, 0.5])  # no documents
    weight = corpus.train.task_weights(math.inf)
    assert weight.tolist() == pytest.approx([(k / N) * D for k in DOCS])  # (n_d / N) / q_d


def fitted(**options) -> tuple[dict[str, torch.Tensor], list[dict]]:
    bora, corpus, _ = gaussian_bora()
    result = bora_pyro.fit(bora, corpus, steps=40, batch_size=5, lr=0.05, eval_every=20, progress=False, **options)
    return bora.state_dict(), result.state.losses


@pytest.mark.parametrize("option", ["proportional", "temperature:1"])
def test_proportional_is_the_default_bit_for_bit(option):
    corpus = observation_corpus(DOCS)
    default, chosen = (corpus.train.train_batch_indices(5, seed=1, **kw) for kw in ({}, {"temperature": 1.0}))
    assert [next(default) for _ in range(30)] == [next(chosen) for _ in range(30)]  # epoch-wise permutations
    assert corpus.train.task_weights(parse_task_sampling(option)) is None
    (state, losses), (state_again, losses_again) = fitted(), fitted(task_sampling=option)
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    assert losses == losses_again


@pytest.mark.parametrize("mode", list(MODES))
def test_batches_from_a_later_step_are_the_tail_of_the_stream(mode):
    corpus = observation_corpus(DOCS)
    batches = lambda start: corpus.train.train_batch_indices(8, seed=5, start_step=start, temperature=MODES[mode])
    stream, later = batches(0), batches(17)
    head = [next(stream) for _ in range(40)]
    assert head[17:] == [next(later) for _ in range(23)]
    assert len({tuple(b) for b in head}) == 40  # the steps' draws differ
    assert next(batches(0)) != next(corpus.train.train_batch_indices(8, seed=6, temperature=MODES[mode]))


def test_an_interrupted_fit_resumed_ends_where_an_uninterrupted_one_ends(tmp_path):
    """SIGTERM during a step of a uniform-sampling fit: it stops after the next step with a checkpoint, and
    resuming it ends with the parameters and loss curve of a fit that was never stopped."""
    options = dict(steps=30, batch_size=8, lr=0.05, eval_every=10, progress=False, task_sampling="uniform")
    bora, corpus, _ = gaussian_bora()
    straight = bora_pyro.fit(bora, corpus, **options)
    reference = bora.state_dict()

    bora, corpus, data = gaussian_bora()
    calls = {"n": 0}

    def log_likelihood(factors, batch):  # [batch]
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 13:
                os.kill(os.getpid(), signal.SIGTERM)
        return data.log_likelihood(factors, batch)

    bora.log_likelihood = log_likelihood
    stopped = bora_pyro.fit(bora, corpus, checkpoint=tmp_path / "ckpt", **options)
    assert stopped.status == "interrupted" and stopped.state.step < 30
    bora, corpus, _ = gaussian_bora()
    resumed = bora_pyro.fit(bora, corpus, checkpoint=tmp_path / "ckpt", resume=True, **options)
    assert resumed.status == "trained" and resumed.state.losses == straight.state.losses
    state = bora.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_a_killed_run_resumes_with_its_own_sampling(tmp_path):
    """The sampling is a setting of the run: ``train --resume`` re-creates it from the run's checkpoint and
    ends where an uninterrupted run ends."""
    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 12, "b": 8, "c": 5}).to_csv(data, index=False)
    args = lambda out: resume_args(data, out, "--task-sampling", "temperature:3")
    assert main(args(tmp_path / "straight")) == 0
    killed = tmp_path / "killed"
    assert run_cli(args(killed), "checkpoint.slot-written:4").returncode == -9  # SIGKILL after 16 steps
    resumed = run_cli(["train", "--resume", str(killed)])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(killed, tmp_path / "straight")


@pytest.mark.parametrize("value", ["temperature:0", "temperature:abc", "temperature:-1", "unif", "temperature:nan", ""])
def test_bad_values_are_one_line_errors(value):
    with pytest.raises(ValueError, match="task_sampling must be proportional, uniform, or temperature:T") as err:
        bora_pyro.TrainConfig(task_sampling=value)
    assert "\n" not in str(err.value) and repr(value) in str(err.value)


def test_the_option_is_on_the_command_line(capsys):
    assert main(["train", "--help"]) == 0
    assert "--task-sampling MODE" in capsys.readouterr().out
    assert main(["train", "--task-sampling", "temperature:0", "--out", "unused"]) != 0
    err = capsys.readouterr().err
    assert "task_sampling must be proportional, uniform, or temperature:T" in err and "'temperature:0'" in err
    assert bora_pyro.TrainConfig(task_sampling="temperature:inf").temperature == math.inf  # accepted: uniform

"""The SVI loop: determinism, early stopping and best-state restore, VI guides, learning-rate rules."""

from __future__ import annotations

import dataclasses
import math

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoNormal

import bora_pyro
from bora_pyro.inference import TrainConfig
from bora_pyro.inference.optimizer import parameter_roles
from bora_pyro.io.base_models import tiny_random_llama


def fitted(corpus, **options):
    bora = bora_pyro.BoRA(
        tiny_random_llama()[0],
        corpus.tasks,
        rank=2,
        alpha=4,
        tau=options.pop("tau", 10.0),
        inference=options.pop("inference", "map"),
    )
    result = bora_pyro.fit(bora, corpus, progress=False, **options)
    return bora, result


def test_fit_is_deterministic_on_cpu(make_corpus):
    corpus = make_corpus()
    first, _ = fitted(corpus, steps=6, batch_size=4, eval_every=3)
    second, _ = fitted(corpus, steps=6, batch_size=4, eval_every=3)
    for name, value in first.task_factors().items():
        assert torch.equal(value, second.task_factors()[name])
    third, _ = fitted(corpus, steps=6, batch_size=4, eval_every=3, seed=1)
    assert any(not torch.equal(v, third.task_factors()[n]) for n, v in first.task_factors().items())


def test_best_validated_state_is_restored(make_corpus):
    corpus = make_corpus()
    # a learning rate far too high makes validation worse after the first evaluation
    bora, result = fitted(corpus, steps=12, batch_size=4, eval_every=3, lr=3.0, clip_norm=None)
    best = min(result.state.evals, key=lambda e: e["valid_ppl"])
    assert result.state.best_step == best["step"]
    report = bora_pyro.evaluate(bora, corpus.valid)
    assert report.token_weighted == pytest.approx(best["valid_ppl"], rel=1e-5)


def test_patience_stops_early(make_corpus):
    corpus = make_corpus()
    _, result = fitted(corpus, steps=60, batch_size=4, eval_every=2, lr=3.0, clip_norm=None, patience=2)
    assert result.stopped_early and result.state.step < 60
    assert len(result.state.evals) >= 3


def test_vi_uses_an_autonormal_guide_and_improves_on_the_base(make_corpus):
    corpus = make_corpus()
    bora, result = fitted(corpus, steps=15, batch_size=8, eval_every=5, lr=1e-2, inference="vi")
    assert isinstance(bora.guide, AutoNormal)
    base = bora_pyro.evaluate(bora, corpus.test, base_model=True)
    assert bora_pyro.evaluate(bora, corpus.test).token_weighted < base.token_weighted
    bora.use_inference("map")
    assert isinstance(bora.guide, AutoDelta)


def test_learning_rate_rules():
    config = TrainConfig(lr=1e-3, lr_tau_scaling=True, lr_tau_reference=100.0)
    assert config.learning_rate(1000.0) == pytest.approx(1e-2)
    assert config.learning_rate(0.0) == config.learning_rate(math.inf) == 1e-3
    assert TrainConfig(lr=1e-3).learning_rate(1000.0) == 1e-3
    cosine = TrainConfig(steps=10, lr_schedule="cosine")
    assert cosine.lr_factor(1) == 1.0 and cosine.lr_factor(6) == pytest.approx(0.5)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 4, 12])
def test_schedules_follow_transformers_after_a_warmup_that_rises_to_the_lr(schedule, warmup):
    """After the warmup the factor is HF's schedule at the same step; during it, step / warmup (the first
    step already moves: HF's step 0 has lr 0)."""
    from transformers import get_scheduler

    steps = 10
    config = TrainConfig(steps=steps, lr_schedule=schedule, warmup_steps=warmup)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    hf = get_scheduler(schedule if warmup == 0 or schedule != "constant" else "constant_with_warmup", optimizer,
                       num_warmup_steps=warmup, num_training_steps=steps)  # fmt: skip
    theirs = [hf.lr_lambdas[0](s - 1) for s in range(1, steps + 1)]
    ours = [config.lr_factor(s) for s in range(1, steps + 1)]
    for s in range(1, steps + 1):
        if s <= warmup:
            assert ours[s - 1] == pytest.approx(s / warmup)
        else:
            assert ours[s - 1] == pytest.approx(theirs[s - 1], abs=1e-12)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("steps", 0, "steps must be an integer >= 1, got 0"),
        ("lr", -1.0, "lr must be a finite number > 0"),
        ("clip_norm", 0.0, "clip_norm must be > 0 or None"),
        ("lr_schedule", "step", "lr_schedule must be one of"),
        ("warmup_steps", -1, "warmup_steps must be an integer >= 0, got -1"),
        ("warmup_steps", 2.5, "warmup_steps must be an integer >= 0, got 2.5"),
        ("patience", 0, "patience must be >= 1 or None"),
    ],
)
def test_bad_training_options(option, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{option: value})


def test_corpus_and_model_tasks_must_match(make_corpus, tiny_lm):
    corpus = make_corpus()
    bora = bora_pyro.BoRA(tiny_lm[0], ["other", "tasks", "here"], rank=2)
    with pytest.raises(ValueError, match="differ from the model's tasks"):
        bora_pyro.fit(bora, corpus, steps=1, progress=False)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(make_corpus, tiny_lm):
    from bora_pyro.inference.svi import objective, trainable_parameters

    corpus = make_corpus()
    bora = bora_pyro.BoRA(tiny_lm[0], corpus.tasks, rank=2, tau=10.0)
    bora_pyro.fit(bora, corpus, steps=2, batch_size=4, eval_every=2, progress=False, lr=0.05)  # B != 0
    batch = corpus.train.collate([0, 4, 9, 13])
    loss_fn = objective(bora)
    results, calls = [], []
    layer = next(iter(bora.lora.layers.values()))
    layer.register_forward_hook(lambda *_: calls.append(1))
    for checkpointing in (False, True):
        bora.lora.configure(gradient_checkpointing=checkpointing)
        calls.clear()
        with bora.param_scope():
            params = trainable_parameters(bora, loss_fn, batch)
            for p in params.values():
                p.grad = None
            loss = loss_fn(bora, batch)
            loss.backward()
            results.append(
                (loss.detach(), {k: p.grad.to_dense().clone() for k, p in params.items()})
            )  # task rows: sparse
        # trainable_parameters and the loss each run the layer once; checkpointing re-runs it in backward
        assert len(calls) == (3 if checkpointing else 2)
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-6, rtol=1e-5)
    assert any(g.abs().max() > 0 for n, g in grads0.items() if n.endswith(".B_decentered"))


def test_bf16_autocast_trains_close_to_float32(make_corpus, tiny_lm):
    corpus = make_corpus()
    losses = {}
    for bf16 in (False, True):
        bora = bora_pyro.BoRA(bora_pyro.io.base_models.tiny_random_llama()[0], corpus.tasks, rank=2, tau=10.0)
        result = bora_pyro.fit(bora, corpus, steps=3, batch_size=4, eval_every=3, progress=False, bf16=bf16)
        losses[bf16] = result.state.losses[-1]["loss_per_token"]
    assert losses[True] == pytest.approx(losses[False], rel=0.02)


@pytest.mark.parametrize("inference", ["map", "vi"])
def test_a_step_updates_only_the_tasks_of_its_batch(make_corpus, tiny_lm, inference):
    """Task subsampling: the task parameters of tasks absent from every batch stay at their start,
    while Theta and the present tasks move; without it every task moves (its prior term pulls it)."""
    corpus = make_corpus()
    absent = corpus.tasks.index("gamma")
    keep = [i for i, t in enumerate(corpus.train.task_index) if t != absent]
    train = corpus.train
    only_two = dataclasses.replace(
        corpus,
        train=dataclasses.replace(
            train,
            input_ids=tuple(train.input_ids[i] for i in keep),
            labels=tuple(train.labels[i] for i in keep),
            task_index=tuple(train.task_index[i] for i in keep),
        ),
    )
    for subsampling in (True, False):
        bora = bora_pyro.BoRA(
            tiny_random_llama()[0], corpus.tasks, rank=2, tau=10.0, inference=inference, task_subsampling=subsampling
        )
        bora_pyro.fit(
            bora, corpus, steps=1, batch_size=len(corpus.train), eval_every=1, progress=False, lr=0.05
        )  # all move
        with bora.param_scope():
            before = {n: v.detach().clone() for n, v in pyro.get_param_store().items()}
        bora_pyro.fit(bora, only_two, steps=3, batch_size=4, eval_every=3, progress=False, lr=0.05)
        with bora.param_scope():
            after = {n: v.detach().clone() for n, v in pyro.get_param_store().items()}
        task_params = [n for n, role in parameter_roles(bora).items() if role.per_task]
        assert task_params and all(after[n].shape[0] == 3 for n in task_params)
        moved_absent = [n for n in task_params if not torch.equal(after[n][absent], before[n][absent])]
        assert (moved_absent == []) == subsampling
        assert any(not torch.equal(after[n][:absent], before[n][:absent]) for n in task_params)
        assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("global."))


def test_the_log_holds_the_gradient_norm_before_clipping_and_the_scheduled_rate(make_corpus):
    corpus = make_corpus()
    options = dict(steps=4, batch_size=4, eval_every=4, lr=0.02, warmup_steps=2, lr_schedule="linear")
    _, clipped = fitted(corpus, clip_norm=1e-6, **options)
    _, free = fitted(corpus, clip_norm=None, **options)
    first = clipped.state.losses[0]["grad_norm"]
    assert first > 1e-3 and first == pytest.approx(free.state.losses[0]["grad_norm"], rel=1e-6)  # same step-1 gradient
    assert [row["lr"] for row in clipped.state.losses] == pytest.approx([0.01, 0.02, 0.02, 0.01])


def test_lora_dropout_changes_training_reproducibly(make_corpus):
    corpus = make_corpus()

    def run(p):
        bora = bora_pyro.BoRA(tiny_random_llama()[0], corpus.tasks, rank=2, alpha=4, tau=10.0, lora_dropout=p)
        bora_pyro.fit(bora, corpus, steps=4, batch_size=4, eval_every=4, lr=0.05, progress=False)
        return bora.task_factors()

    first, again, none = run(0.5), run(0.5), run(0.0)
    for name, value in first.items():
        assert torch.equal(value, again[name])  # the masks come from the seeded RNG
    assert any(not torch.allclose(v, none[k]) for k, v in first.items())


@pytest.mark.parametrize(
    "model", [dict(tau=10.0), dict(tau=10.0, inference="vi"), dict(tau="learn", inference="vi")], ids=str
)
def test_gradient_accumulation_equals_one_big_batch(make_corpus, model):
    """4 micro-batches a step give the parameters and the logged objective of one batch 4 times larger."""
    corpus = make_corpus()
    options = dict(steps=3, batch_size=8, eval_every=3, lr=0.01, **model)
    big, big_fit = fitted(corpus, **options)
    small, small_fit = fitted(corpus, grad_accum=4, **options)
    for name, value in big.task_factors().items():
        torch.testing.assert_close(small.task_factors()[name], value, atol=1e-6, rtol=0)
    with big.param_scope():
        params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    with small.param_scope():
        for name, value in pyro.get_param_store().items():
            torch.testing.assert_close(value.detach(), params[name], atol=1e-6, rtol=0)
    for a, b in zip(big_fit.state.losses, small_fit.state.losses):
        assert b["loss_per_token"] == pytest.approx(a["loss_per_token"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_more_micro_batches_than_documents_is_refused():
    with pytest.raises(ValueError, match="grad_accum 16 exceeds batch_size 8"):
        TrainConfig(batch_size=8, grad_accum=16)


def test_bora_takes_its_adapter_settings_whole():
    from bora_pyro.models.adapter import AdapterConfig

    whole = bora_pyro.BoRA(tiny_random_llama()[0], ("a", "b"), adapter=AdapterConfig(rank=3, alpha=6.0, inference="vi"))
    keywords = bora_pyro.BoRA(tiny_random_llama()[0], ("a", "b"), rank=3, alpha=6.0, inference="vi")
    assert whole.lora.shapes() == keywords.lora.shapes() and whole.inference == keywords.inference == "vi"
    with pytest.raises(ValueError, match=r"give adapter=AdapterConfig\(...\) or the keywords \['rank'\], not both"):
        bora_pyro.BoRA(tiny_random_llama()[0], ("a",), rank=4, adapter=AdapterConfig())
    with pytest.raises(ValueError, match="init_peft is a run's setting"):
        bora_pyro.BoRA(tiny_random_llama()[0], ("a",), adapter=AdapterConfig(init_peft="somewhere"))


def test_fit_names_an_unknown_option_and_the_fix(make_corpus):
    corpus = make_corpus()
    bora = bora_pyro.BoRA(tiny_random_llama()[0], corpus.tasks, rank=2)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['inference'\]; MAP or VI is the model's"):
        bora_pyro.fit(bora, corpus, inference="vi", steps=1)
    with pytest.raises(TypeError, match=r"\[.stepz.\]; the options are TrainConfig.s fields: steps"):
        bora_pyro.fit(bora, corpus, stepz=1)

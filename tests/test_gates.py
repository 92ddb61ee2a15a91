"""B-LoRA gates: hard-concrete rank and precision gates, the residual quantiser and BOPs."""

from __future__ import annotations

import pyro
import pytest
import torch

import bora_pyro
from bora_pyro.io.base_models import tiny_random_llama
from bora_pyro.models.gates import GateConfig, prob_open, relative_bops
from bora_pyro.models.likelihood import lm_logits
from bora_pyro.models.readout import export_factors
from bora_pyro.nn.gates import LayerGates
from bora_pyro.nn.quantization import BITS, bits_of, lora_bops, residual_quantize, residual_terms, step_sizes


def gated(corpus, **config) -> bora_pyro.BoRA:
    return bora_pyro.BoRA(tiny_random_llama()[0], corpus.tasks, rank=4, alpha=8, tau=10.0, gates=GateConfig(**config))


def set_log_alphas(bora, fill) -> None:
    """Give every gate parameter the values ``fill(shape)``."""
    with bora.param_scope():
        bora.gate_values()  # creates the parameters
        store = pyro.get_param_store()
        for name in [n for n in store.keys() if n.startswith("gates.")]:
            store._params[name].data.copy_(fill(store._params[name].shape))


def test_inference_gates_are_exactly_0_1_and_nested(make_corpus):
    bora = gated(make_corpus(), rank_gates="per-task", quant_gates="weights+activations")
    g = torch.Generator().manual_seed(0)
    set_log_alphas(bora, lambda shape: torch.randn(shape, generator=g) * 4)  # open and closed gates in any order
    for values in bora.gate_values().values():
        for gates in (values.rank, values.weight_bits, values.act_bits):
            assert set(gates.unique().tolist()) <= {0.0, 1.0}
            assert torch.all(gates[..., 1:] <= gates[..., :-1])  # g_i = 0 implies g_j = 0 for j > i
        assert torch.all(values.rank[:, 0] == 1)  # rank >= 1
    ranks = torch.stack([v.rank.sum(1) for v in bora.gate_values().values()])
    assert ranks.min() < 4 and ranks.unique().numel() > 1  # the random log-alphas did close some gates


def test_all_gates_open_at_32_bits_equal_plain_lora(make_corpus):
    corpus = make_corpus()
    bora = gated(corpus, rank_gates="shared", quant_gates="weights+activations")
    set_log_alphas(bora, lambda shape: torch.full(shape, 10.0))
    g = torch.Generator().manual_seed(1)
    factors = {n: torch.randn((3, *s), generator=g) * 0.3 for n, s in bora.lora.shapes().items()}
    batch = corpus.train.collate([0, 5, 15])
    with torch.no_grad():
        plain = lm_logits(bora.lora, factors, batch)
        gates = bora.gate_values()
        assert all(bits_of(v.weight_bits) == 32 and v.rank.sum() == 4 for v in gates.values())
        with_gates = lm_logits(bora.lora, factors, batch, gates)
    torch.testing.assert_close(with_gates, plain, atol=1e-5, rtol=1e-5)


def test_closed_rank_gates_remove_their_components_and_fold_into_b(make_corpus):
    corpus = make_corpus()
    bora = gated(corpus, rank_gates="per-task", quant_gates="weights")
    g = torch.Generator().manual_seed(2)
    set_log_alphas(bora, lambda shape: torch.randn(shape, generator=g) * 4)
    bora_pyro.fit(bora, corpus, steps=2, batch_size=4, eval_every=2, progress=False, lr=0.05)  # B != 0
    batch = corpus.train.collate([0, 5, 15])
    with torch.no_grad():
        gated_logits = lm_logits(bora.lora, bora.task_factors(), batch, bora.gate_values())
        folded_logits = lm_logits(bora.lora, export_factors(bora), batch)  # a plain LoRA layer
    torch.testing.assert_close(folded_logits, gated_logits, atol=1e-5, rtol=1e-5)
    folded = export_factors(bora)
    for name, values in bora.gate_values().items():
        closed = values.rank == 0  # [D, r]
        assert torch.all(folded[f"{name}.B"].transpose(1, 2)[closed] == 0)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_residual_decomposition_reconstructs_the_clipped_input_within_one_step(scale):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3)) * scale
    beta = torch.tensor(0.8 * float(x.abs().max()))  # some values are clipped
    clipped = x.clamp(-beta, beta)
    terms, steps = residual_terms(x, beta), step_sizes(beta)
    approx = torch.zeros_like(x)
    for k, (term, step) in enumerate(zip(terms, steps)):
        approx = approx + term
        error = (clipped - approx).abs().max()
        assert error <= step * 0.5 + 1e-6 * float(beta), f"{BITS[k]} bits: error {error} vs step {step}"
        on_grid = term / step  # every term is a whole number of its grid steps
        torch.testing.assert_close(on_grid, on_grid.round(), atol=1e-3, rtol=1e-6)
        gates = torch.tensor([1.0] * k + [0.0] * (len(BITS) - 1 - k))  # the first k refinements open
        torch.testing.assert_close(residual_quantize(x, gates, beta), approx)
        assert bits_of(gates) == BITS[k]


def test_rounding_passes_gradients_straight_through():
    x = torch.linspace(-1, 1, 11, requires_grad=True)
    residual_quantize(x, torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor(2.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_bops_of_a_hand_computed_example():
    # rank 2 of 4 on a [6, 4] layer, 8-bit weights, 32-bit activations: 2 * (4 + 6) MACs * 8 * 32
    assert lora_bops(4, 6, 2, 8, 32) == 5120
    assert lora_bops(4, 6, 4, 32, 32) == 40960  # the full-rank 32-bit block
    import pandas as pd

    report = pd.DataFrame({"bops": [5120.0, 40960.0], "full_bops": [40960.0, 40960.0]})
    assert relative_bops(report) == pytest.approx((5120 + 40960) / 81920)


def test_penalty_is_lambda_times_the_expected_open_gates(make_corpus):
    corpus = make_corpus()
    bora = gated(corpus, rank_gates="shared", quant_gates="weights", rank_lambda=2.0, quant_lambda=0.5)
    set_log_alphas(bora, lambda shape: torch.zeros(shape))  # every gate open with probability p
    p = float(prob_open(torch.zeros(())))
    batch = corpus.train.collate([0, 1])
    with bora.param_scope():
        guide_trace = pyro.poutine.trace(bora.guide).get_trace(batch)
        trace = pyro.poutine.trace(pyro.poutine.replay(bora.model, trace=guide_trace)).get_trace(batch)
    site = trace.nodes["gates.penalty"]
    layers = len(bora.lora.adapted)
    nested_open = lambda k: sum(p**i for i in range(1, k + 1))
    expected = layers * (2.0 * nested_open(3) + 0.5 * nested_open(4))
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), torch.tensor(-expected), rtol=1e-5, atol=1e-5)


def test_gated_training_reports_rank_bits_and_bops(make_corpus):
    corpus = make_corpus()
    strong = {"rank_lambda": 1e4, "quant_lambda": 1e4, "gate_init": 3.0}  # start less open than the default
    bora = gated(corpus, rank_gates="shared", quant_gates="weights", **strong)
    bora_pyro.fit(bora, corpus, steps=30, batch_size=4, eval_every=30, progress=False, guide_lr=0.2)
    report = bora.gates.report(bora.gate_values())
    assert list(report.columns[:7]) == ["layer", "block", "module", "rank", "weight_bits", "activation_bits", "bops"]
    assert len(report) == len(bora.lora.adapted)
    assert report["rank"].max() < 4 or report["weight_bits"].max() < 32  # a strong penalty closes gates
    assert 0 < relative_bops(report) < 1


@pytest.mark.parametrize(
    "config,match",
    [
        ({"rank_gates": "all"}, "rank gates must be one of"),
        ({"quant_gates": "int8"}, "quantisation gates must be one of"),
        ({"rank_lambda": -1.0}, "rank_lambda must be a finite number >= 0"),
    ],
)
def test_bad_gate_settings_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        GateConfig(**config)


def test_gates_need_the_language_model_likelihood(tiny_lm):
    with pytest.raises(ValueError, match="cannot be combined with a custom log_likelihood"):
        bora_pyro.BoRA(tiny_lm[0], ["a", "b"], gates=GateConfig(rank_gates="shared"), log_likelihood=lambda f, b: None)


def test_layer_gates_without_quantisation_leave_values_alone():
    x = torch.randn(2, 3, 5)
    assert LayerGates().quantize_input(x) is x


def test_cli_gated_run_writes_its_report_and_its_adapters_reproduce_it(tmp_path, capsys):
    """The run folder holds the gates folded into the adapters: evaluating the reloaded run (plain LoRA
    layers) gives the test perplexity the gated model reported."""
    import json

    import pandas as pd

    from bora_pyro.cli import main

    from .conftest import synthetic_rows, train_args

    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 12, "b": 8, "c": 5}).to_csv(data, index=False)
    run = tmp_path / "run"
    options = ["--steps", "15", "--eval-every", "25", "--batch-size", "4"]  # 25: the CLI default
    gates = ["--rank-gates", "per-task", "--quant-gates", "--rank-lambda", "1e4", "--guide-lr", "0.5"]
    gates += ["--gate-init", "3"]  # started less open than the default, so that 15 steps close some gates
    assert main(train_args(data, run, *options, *gates)) == 0
    report = pd.read_csv(run / "gates.csv")
    assert (run / "gates.png").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["relative_bops"] == pytest.approx(report["bops"].sum() / report["full_bops"].sum())
    assert metrics["gates_mean_rank"] == pytest.approx(report["rank"].mean()) and metrics["gates_mean_rank"] < 8
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_weighted_ppl"] == pytest.approx(metrics["test_ppl"], rel=1e-5)


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--rank-gates", "all"], "invalid choice: 'all'"),
        (["--rank-gates", "--rank-lambda", "-2"], "rank_lambda must be a finite number >= 0"),
    ],
)
def test_cli_refuses_bad_gate_options(tmp_path, capsys, flags, match):
    from bora_pyro.cli import main

    assert main(["train", "--model", "tiny-random-llama", *flags, "--out", str(tmp_path / "r")]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

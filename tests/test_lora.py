"""The multi-task LoRA layer: mixed batches, parity with PEFT, target discovery, freezing."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

from bora_pyro.io.base_models import tiny_random_llama
from bora_pyro.nn.lora import MultiTaskLoRA
from bora_pyro.nn.targets import peft_target_modules

peft = pytest.importorskip("peft")


def random_factors(lora: MultiTaskLoRA, num_tasks: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Non-zero A and B for every task (a fresh LoRA has B = 0 and would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    return {name: 0.3 * torch.randn((num_tasks, *shape), generator=g) for name, shape in lora.shapes().items()}


def logits(lora: MultiTaskLoRA, factors, input_ids, task_index=None) -> torch.Tensor:
    with torch.no_grad(), lora.activate(factors, task_index):
        return lora.lm(input_ids=input_ids).logits


def test_mixed_batch_equals_per_task_forward():
    lm, _ = tiny_random_llama()
    lora = MultiTaskLoRA(lm, rank=4, alpha=8)
    factors = random_factors(lora, num_tasks=3)
    input_ids = torch.randint(0, 200, (6, 10))
    task_index = torch.tensor([2, 0, 1, 1, 0, 2])
    mixed = logits(lora, factors, input_ids, task_index)
    for d in range(3):
        rows = (task_index == d).nonzero().flatten()
        alone = {k: v[d : d + 1] for k, v in factors.items()}  # a single adapter, no gather
        separate = logits(lora, alone, input_ids[rows])
        torch.testing.assert_close(mixed[rows], separate, atol=1e-5, rtol=0)
    # the adapters make a difference: tasks do not all give the same output
    assert not torch.allclose(mixed[1], logits(lora, {k: v[2:3] for k, v in factors.items()}, input_ids[1:2])[0])


def test_zero_b_and_no_factors_give_the_base_model():
    lm, _ = tiny_random_llama()
    input_ids = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        base = lm(input_ids=input_ids).logits.clone()
    lora = MultiTaskLoRA(lm, rank=2, alpha=4)
    start = {k: v.expand(3, *v.shape) for k, v in lora.init_factors(torch.Generator().manual_seed(0)).items()}
    torch.testing.assert_close(logits(lora, start, input_ids, torch.tensor([0, 2])), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(lora, None, input_ids), base, atol=0, rtol=0)


def _peft_logits(lm, targets, factors, rank, alpha, input_ids, fan_in_fan_out=False):
    """PEFT's LoRA on a copy of the base model, with our task-0 factors copied in."""
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets if isinstance(targets, str) else list(targets),
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=False,
    )
    model = peft.get_peft_model(lm, config)
    with torch.no_grad():
        for path, module in model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                short = path.split("base_model.model.", 1)[1]
                for prefix in ("model.decoder.", "model.", "transformer."):
                    if short.startswith(prefix):
                        short = short[len(prefix) :]
                        break
                module.lora_A["default"].weight.copy_(factors[f"{short}.A"][0])
                module.lora_B["default"].weight.copy_(factors[f"{short}.B"][0])
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_one_task_equals_peft_lora(family):
    if family == "llama":
        build = lambda: tiny_random_llama()[0]
    elif family == "opt":
        cfg = OPTConfig(
            vocab_size=100,
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=2,
            max_position_embeddings=64,
            word_embed_proj_dim=16,
        )
        build = lambda: (torch.manual_seed(1), OPTForCausalLM(cfg).eval())[1]
    else:
        cfg = GPT2Config(vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_positions=64)
        build = lambda: (torch.manual_seed(1), GPT2LMHeadModel(cfg).eval())[1]
    ours_lm, peft_lm = build(), build()
    lora = MultiTaskLoRA(ours_lm, rank=3, alpha=6)
    expected_targets = {"llama": ("q_proj", "v_proj"), "opt": ("q_proj", "v_proj"), "gpt2": ("c_attn",)}[family]
    assert lora.targets == expected_targets
    factors = random_factors(lora, num_tasks=1, seed=3)
    input_ids = torch.randint(0, 100, (2, 9))
    ours = logits(lora, factors, input_ids)
    theirs = _peft_logits(peft_lm, lora.targets, factors, 3, 6, input_ids, fan_in_fan_out=family == "gpt2")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_base_weights_frozen_and_only_targets_wrapped():
    lm, _ = tiny_random_llama()
    lora = MultiTaskLoRA(lm, rank=2, alpha=2, targets=["q_proj"])
    assert all(not p.requires_grad for p in lm.parameters())
    assert sorted(lora.layers) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]
    assert lora.shapes()["layers.0.self_attn.q_proj.A"] == (2, 32)


def test_unknown_target_lists_what_exists():
    lm, _ = tiny_random_llama()
    with pytest.raises(ValueError, match=r"\['nope'\] not found.*q_proj"):
        MultiTaskLoRA(lm, targets=["nope"])


@pytest.mark.parametrize("rank", [0, -1, 2.5])
def test_rank_must_be_positive_integer(rank):
    lm, _ = tiny_random_llama()
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        MultiTaskLoRA(lm, rank=rank)


def test_wrapping_twice_is_refused():
    lm, _ = tiny_random_llama()
    MultiTaskLoRA(lm)
    with pytest.raises(ValueError, match="already wrapped"):
        MultiTaskLoRA(lm)


TARGET_FORMS = [
    ("q_proj",),
    ("self_attn.q_proj", "mlp.down_proj"),  # dotted suffixes
    ("layers.0.self_attn.v_proj",),  # one layer
    "all-linear",
    r".*layers\.1\.(self_attn\.o_proj|mlp\.up_proj)",  # a regular expression on the full path
]


def _peft_paths(model) -> list[str]:
    return [
        path.removeprefix("base_model.model.")
        for path, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    ]


@pytest.mark.parametrize("targets", TARGET_FORMS, ids=str)
def test_every_target_form_adapts_what_peft_adapts(targets):
    """Each of PEFT's target_modules forms selects the same layers here as in PEFT, with the same logits."""
    ours_lm, peft_lm = tiny_random_llama()[0], tiny_random_llama()[0]
    lora = MultiTaskLoRA(ours_lm, rank=2, alpha=4, targets=targets)
    factors = random_factors(lora, num_tasks=1, seed=5)
    input_ids = torch.randint(0, 200, (2, 8))
    theirs = _peft_logits(peft_lm, targets, factors, 2, 4, input_ids)
    assert lora.paths() == _peft_paths(peft_lm)
    torch.testing.assert_close(logits(lora, factors, input_ids), theirs, atol=1e-5, rtol=0)


def test_a_regular_expression_in_its_cli_form_selects_what_the_string_form_does():
    """--targets 're:PATTERN' (commas kept) reaches the model as ("re:PATTERN",): the same layers as the pattern
    given to BoRA as a string, or to AdapterConfig; a name list may mix it with suffixes."""
    from bora_pyro.models.adapter import AdapterConfig, parse_targets

    pattern = r".*layers\.(0|1)\.self_attn\.(q|k)_proj"
    given = parse_targets("re:" + pattern.replace("(0|1)", "[0-1]{1,1}"))
    assert len(given) == 1  # the comma inside the pattern's {1,1} is kept
    expected = MultiTaskLoRA(tiny_random_llama()[0], targets=pattern).paths()
    assert len(expected) == 4
    assert MultiTaskLoRA(tiny_random_llama()[0], targets=given).paths() == expected
    assert MultiTaskLoRA(tiny_random_llama()[0], targets=AdapterConfig(targets=pattern).targets).paths() == expected
    mixed = MultiTaskLoRA(tiny_random_llama()[0], targets=("re:.*layers\\.0\\.self_attn\\.q_proj", "v_proj"))
    assert mixed.paths() == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert parse_targets("q_proj,v_proj") == ("q_proj", "v_proj")
    assert (
        AdapterConfig(targets="re:" + pattern).targets == AdapterConfig(targets=pattern).targets == ("re:" + pattern,)
    )


def test_all_linear_skips_the_output_head_and_reads_from_the_cli_form():
    lora = MultiTaskLoRA(tiny_random_llama()[0], rank=2, alpha=4, targets=("all-linear",))  # --targets all-linear
    assert len(lora.paths()) == 2 * 7 and not any("lm_head" in p for p in lora.paths())


@pytest.mark.parametrize(
    "targets, message",
    [
        (["nope"], r"\['nope'\] not found"),
        (["q_proj", "layers.9.self_attn.q_proj"], r"\['layers.9.self_attn.q_proj'\] not found"),
        ("model\\.layers\\.0", "is a LlamaDecoderLayer, not a linear layer"),
        (r"layers\.0\.q_proj", "matches no module path .*whole path"),
        ("(q_proj", "is not a valid regular expression"),
        (["re:(q_proj"], "is not a valid regular expression"),
        (["re:layers\\.0\\.q_proj,k_proj"], r"match no module path .*a comma after re: belongs to the pattern"),
        (["all-linear", "q_proj"], "'all-linear' takes every linear layer and is given alone"),
    ],
)
def test_bad_targets_name_the_problem(targets, message):
    lm, _ = tiny_random_llama()
    with pytest.raises(ValueError, match=message):
        MultiTaskLoRA(lm, targets=targets)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in lm.modules())
    assert type(lm.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # nothing wrapped half-way


@pytest.mark.parametrize("targets", TARGET_FORMS, ids=str)
def test_exported_target_modules_make_peft_adapt_the_same_layers(targets):
    lora = MultiTaskLoRA(tiny_random_llama()[0], rank=2, alpha=4, targets=targets)
    exported = peft_target_modules(lora.lm, lora.paths())
    model = peft.get_peft_model(tiny_random_llama()[0], peft.LoraConfig(r=2, lora_alpha=4, target_modules=exported))
    assert _peft_paths(model) == lora.paths()
    if targets == ("layers.0.self_attn.v_proj",):
        assert exported == ["model.layers.0.self_attn.v_proj"]  # the leaf name would adapt layer 1 too
    elif targets == ("q_proj",):
        assert exported == ["q_proj"]


def test_lora_dropout_matches_peft_in_training_and_is_off_when_scoring():
    """PEFT's lora_dropout drops the LoRA branch's input in train mode: ours inside ``dropping()`` draws the
    same masks (same seed, same order), and scoring outside it is deterministic and dropout-free."""
    from bora_pyro.io.export import peft_config

    ours_lm, peft_lm = tiny_random_llama()[0], tiny_random_llama()[0]
    lora = MultiTaskLoRA(ours_lm, rank=2, alpha=4, dropout=0.3)
    factors = random_factors(lora, num_tasks=1, seed=2)
    input_ids = torch.randint(0, 200, (2, 8))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.3)
    model = peft.get_peft_model(peft_lm, config)
    with torch.no_grad():
        for path, module in model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                short = path.split("base_model.model.model.", 1)[1]
                module.lora_A["default"].weight.copy_(factors[f"{short}.A"][0])
                module.lora_B["default"].weight.copy_(factors[f"{short}.B"][0])
        model.train()
        torch.manual_seed(7)
        theirs = model(input_ids=input_ids).logits
        torch.manual_seed(7)
        with lora.dropping(), lora.activate(factors):
            dropped = lora.lm(input_ids=input_ids).logits
    torch.testing.assert_close(dropped, theirs, atol=1e-5, rtol=0)
    plain = MultiTaskLoRA(tiny_random_llama()[0], rank=2, alpha=4)
    scored = logits(lora, factors, input_ids)
    torch.testing.assert_close(scored, logits(plain, factors, input_ids), atol=0, rtol=0)
    assert not torch.allclose(dropped, scored, atol=1e-4)  # the dropout did something
    assert peft_config(lora, "base")["lora_dropout"] == 0.3


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan")])
def test_lora_dropout_must_be_a_probability(p):
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        MultiTaskLoRA(tiny_random_llama()[0], dropout=p)

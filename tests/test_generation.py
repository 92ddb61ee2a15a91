"""Generation per task: a mixed batch equals one prompt at a time; 'global' is Theta; unknown tasks."""

from __future__ import annotations

import pytest
import torch

from bora_pyro.cli import main
from bora_pyro.models.generation import generate
from bora_pyro.runs import load_run

from .conftest import synthetic_rows, train_args


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    data = tmp / "corpus.csv"
    synthetic_rows({"lord": 10, "king": 6, "gold": 4}).to_csv(data, index=False)
    assert main(train_args(data, tmp / "run", "--steps", "15", "--lr", "0.05", "--eval-every", "15")) == 0
    return load_run(tmp / "run", device="cpu")


def test_mixed_batch_generation_equals_one_prompt_at_a_time(run):
    prompts = ["the lord", "and thei wenten", "the king of the", "gold"]
    tasks = ["lord", "gold", "global", "king"]
    together = run.generate(prompts, tasks, max_new_tokens=12, do_sample=False)
    alone = [run.generate([p], [t], max_new_tokens=12, do_sample=False)[0] for p, t in zip(prompts, tasks)]
    assert together == alone
    # the adapters shape the distribution: with B = 0 (the base model) the same seed samples other text
    zero = {k: torch.zeros_like(v) for k, v in run.task_factors.items()}
    options = dict(max_new_tokens=20, temperature=1.0, top_p=1.0, seed=0)
    base = generate(run.bora.lora, run.tokenizer, run.bora.tasks, zero, None, ["the"], ["lord"], **options)
    assert base != run.generate(["the"], ["lord"], **options)


def test_unknown_task_lists_the_known_ones_and_global(run, capsys):
    with pytest.raises(
        ValueError, match=r"unknown task\(s\) \['queen'\]; known tasks: \['lord', 'king', 'gold'\] and 'global'"
    ):
        run.generate(["x"], ["queen"])
    assert main(["generate", str(run.path), "--task", "queen", "--prompt", "x"]) == 2
    assert "known tasks" in capsys.readouterr().err


def test_generate_command_is_seeded(run, capsys):
    args = ["generate", str(run.path), "--task", "king", "--prompt", "the", "--max-new-tokens", "8", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("the")

"""A run folder stands alone: export, generate, diagnose and scoring other data work with the training data moved or
deleted (the folder keeps its tokenizer, tasks, input format and the digests of its documents); re-scoring the
run's own splits reads the data again and names, per task, how many documents changed."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

import bora_pyro
from bora_pyro.cli import main

from .conftest import copy_run, evaluate_on_changed_data, synthetic_rows, train_args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A quick run on rows with a split column (each change of a test lands in the split it is made in)."""
    root = tmp_path_factory.mktemp("trained")
    rows = synthetic_rows({"north": 14, "south": 8, "east": 5})
    rows["split"] = rows.groupby("task").cumcount().map(lambda i: {0: "test", 1: "valid"}.get(i, "train"))
    rows.to_csv(root / "corpus.csv", index=False)
    assert main(train_args(root / "corpus.csv", root / "run", "--steps", "2", "--eval-every", "2")) == 0
    return root


@pytest.fixture
def run(trained, tmp_path):
    return copy_run(trained, tmp_path)


def without_data(trained, tmp_path):
    """The trained run, copied, with the data it was trained on moved away; returns (run, moved data)."""
    run = copy_run(trained, tmp_path)
    moved = tmp_path / "moved.csv"
    shutil.move(trained / "corpus.csv", moved)
    return run, moved


@pytest.fixture
def deleted(trained, tmp_path):
    run, moved = without_data(trained, tmp_path)
    yield run
    shutil.move(moved, trained / "corpus.csv")


def test_the_folder_keeps_its_tokenizer_and_documents(trained):
    run = trained / "run"
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    documents = pd.read_csv(run / "documents.csv")
    assert list(documents.columns) == ["split", "task", "digest"]
    assert set(documents.split) == {"train", "valid", "test"} and set(documents.task) == {"north", "south", "east"}
    loaded = bora_pyro.load_run(run)
    assert str(loaded.tokenizer.name_or_path).endswith("tokenizer")  # the run's own, not the model's
    assert loaded.evaluate("test").token_weighted > 0  # its tokenisation gives the digests recorded


def test_export_generate_and_other_data_work_without_the_training_data(deleted, tmp_path, capsys):
    assert main(["diagnose", str(deleted)]) == 0
    assert main(["export", str(deleted), "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "north" / "adapter_model.safetensors").is_file()
    assert main(["export", str(deleted), "--format", "merged", "--task", "south", "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["generate", str(deleted), "--task", "north", "--prompt", "the", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("the")
    other = tmp_path / "other.csv"
    synthetic_rows({"east": 5, "north": 6, "south": 5}, seed=7).to_csv(other, index=False)
    assert main(["evaluate", str(deleted), "--data", f"csv:{other}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {row["task"] for row in report["per_task"]} == {"north", "south", "east"}


def test_rescoring_the_own_split_without_the_data_is_one_line(deleted, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(deleted)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "cannot be read" in err[0] and "export, generate and evaluate --data OTHER do not" in err[0]


def test_the_moved_data_scores_as_other_data_and_gives_the_same_numbers(trained, tmp_path, capsys):
    run, moved = without_data(trained, tmp_path)
    try:
        assert main(["evaluate", str(run), "--data", f"csv:{moved}", "--json"]) == 0
        moved_report = json.loads(capsys.readouterr().out)
    finally:
        shutil.move(moved, trained / "corpus.csv")
    assert main(["evaluate", str(run), "--json"]) == 0
    own = json.loads(capsys.readouterr().out)
    assert moved_report["token_weighted_ppl"] == pytest.approx(own["token_weighted_ppl"], rel=1e-6)


@pytest.mark.parametrize(
    "change, said",
    [
        ("one_text", "train: 1 task(s) changed ('south': 1 of 6 documents differ)"),
        ("one_more", "train: 1 task(s) changed ('south': 1 new)"),
        ("one_less", "train: 1 task(s) changed ('south': 1 gone)"),
        ("reordered", "train: 1 task(s) changed ('south': the same documents in another order)"),
    ],
)
def test_a_changed_corpus_is_named_to_the_document(trained, run, capsys, change, said):
    rows = pd.read_csv(trained / "corpus.csv")
    south = rows.index[(rows.task == "south") & (rows.split == "train")]
    if change == "one_text":
        rows.loc[south[0], "text"] = "entirely other words " * 3
    elif change == "one_more":
        extra = rows.loc[[south[0]]].assign(text="one more document of the south")
        rows = pd.concat([rows, extra], ignore_index=True)
    elif change == "one_less":
        rows = rows.drop(index=south[-1])
    else:  # the same rows of every task, another order within 'south'
        rows = pd.concat([rows.drop(index=south), rows.loc[south[::-1]]], ignore_index=True)
    code, err = evaluate_on_changed_data(trained / "corpus.csv", rows, run, capsys)
    assert code == 2 and "changed since" in err
    assert said in err, err
    assert "valid:" not in err and "test:" not in err


@pytest.mark.parametrize("name", ["special_tokens_map.json", "chat_template.jinja", "nested/extra.txt"])
def test_a_file_added_to_the_tokenizer_folder_is_refused(run, capsys, name):
    """The run's tokenizer/ is the tool's: a file it did not write there (which from_pretrained would read) is a
    damaged folder, named in one line, never loaded."""
    added = run / "tokenizer" / name
    added.parent.mkdir(exist_ok=True)
    added.write_text("hello")
    capsys.readouterr()
    assert main(["generate", str(run), "--task", "north", "--prompt", "the"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name.split("/")[-1] in err[0] and "not a file bora_pyro wrote" in err[0]


def test_tasks_in_another_order_are_named_so(trained, run, capsys):
    rows = pd.read_csv(trained / "corpus.csv")
    reordered = pd.concat([rows[rows.task != "north"], rows[rows.task == "north"]])
    code, err = evaluate_on_changed_data(trained / "corpus.csv", reordered, run, capsys)
    assert (
        code == 2
        and "its tasks come in another order ('south', 'east', 'north') than the run's ('north', 'south', 'east')"
        in err
    )


def test_other_data_in_another_format_is_refused(run, tmp_path, capsys):
    other = tmp_path / "pairs.csv"
    pd.DataFrame({"task": ["north", "south", "east"] * 3, "prompt": ["q"] * 9, "completion": ["a"] * 9}).to_csv(
        other, index=False
    )
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", f"csv:{other}"]) == 2
    err = capsys.readouterr().err
    assert "is prompt-completion data" in err and "trained on text data" in err

"""Run folders verified on load: every file the tool wrote is in the folder's manifest, and any change of a
byte of any of them (the manifest included) is refused, never used; a changed corpus is named."""

from __future__ import annotations

import json

import pytest

from bora_pyro.cli import main
from bora_pyro.io.integrity import MANIFEST, CorruptFile, read_manifest
from bora_pyro.runs.run_files import verified_status

from .conftest import copy_run, evaluate_on_changed_data, synthetic_rows, train_args, train_once


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_once(
        tmp_path_factory.mktemp("trained"), {"north": 14, "south": 8, "east": 4}, "--posterior-samples", "2"
    )


@pytest.fixture
def run(trained, tmp_path):
    return copy_run(trained, tmp_path)


def test_every_file_of_a_run_is_in_its_manifest(run):
    listed = set(read_manifest(run)["files"])
    on_disk = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()} - {MANIFEST}
    assert on_disk == listed


def positions(size: int) -> list[int]:
    """Every byte of a small file; 48 spread over a large one, its first and last included."""
    if size <= 4096:
        return list(range(size))
    return sorted({0, size - 1, *range(0, size, max(1, size // 46))})


def test_every_single_byte_change_is_detected_on_load(run):
    files = sorted(p for p in run.rglob("*") if p.is_file())
    checked = 0
    for path in files:
        original = path.read_bytes()
        for i in positions(len(original)):
            damaged = bytearray(original)
            damaged[i] ^= 0x01
            path.write_bytes(bytes(damaged))
            with pytest.raises((CorruptFile, ValueError)):
                verified_status(run)
            checked += 1
        path.write_bytes(original)
    verified_status(run)  # restored: accepted
    assert checked > 1000


@pytest.mark.parametrize("file", ["adapters.safetensors", "config.json", "metrics.json", "status.json"])
@pytest.mark.parametrize(
    "verb", [["evaluate"], ["export", "--out", "{tmp}/export"], ["generate", "--task", "north", "--prompt", "the"]]
)
def test_a_damaged_file_is_refused_by_every_verb(run, capsys, file, verb):
    path = run / file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))
    args = [verb[0], str(run), *(a.replace("{tmp}", str(run.parent)) for a in verb[1:])]
    capsys.readouterr()
    assert main(args) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and file in err[0]
    assert not (run.parent / "export").exists()


def test_a_damaged_fitted_state_is_never_scored(tmp_path, trained, capsys, monkeypatch):
    from bora_pyro.runs import train as run_training

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_training, "score_run", fail)
    run = tmp_path / "run"
    assert main(train_args(trained / "corpus.csv", run, "--steps", "2", "--eval-every", "2")) == 3
    monkeypatch.undo()
    state = run / "fit_state.safetensors"
    data = bytearray(state.read_bytes())
    data[-3] ^= 0xFF
    state.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 4
    assert "fit_state.safetensors" in capsys.readouterr().err
    assert json.loads((run / "status.json").read_text())["status"] == "trained"


@pytest.mark.parametrize("change", ["text", "task_removed", "test_only"])
def test_evaluate_names_what_changed_in_the_corpus(run, trained, capsys, change):
    import pandas as pd

    rows = pd.read_csv(trained / "corpus.csv")  # the file the run was trained on (config.json names it)
    if change == "text":
        rows.loc[rows.task == "south", "text"] = "entirely other words " * 3
    elif change == "task_removed":
        rows = rows[rows.task != "east"]
    else:
        rows.loc[rows.index[-1], "text"] = "a changed last row"
    code, err = evaluate_on_changed_data(trained / "corpus.csv", rows, run, capsys)
    assert code == 2
    assert "changed since" in err or "do not match" in err
    if change == "text":
        assert "'south'" in err


def test_evaluate_scores_other_data_when_asked(run, capsys):
    import pandas as pd

    other = run.parent / "other.csv"
    synthetic_rows({"east": 5, "north": 6, "south": 5}, seed=7).to_csv(other, index=False)
    assert main(["evaluate", str(run), "--data", f"csv:{other}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {row["task"] for row in report["per_task"]} == {"north", "south", "east"}
    assert pd.notna(report["token_weighted_ppl"])


def test_the_marker_and_manifest_are_checked_too(run):
    manifest = run / MANIFEST
    text = manifest.read_text()
    manifest.write_text(text.replace(",", ", ", 1))  # same content, other bytes
    with pytest.raises(CorruptFile):
        verified_status(run)

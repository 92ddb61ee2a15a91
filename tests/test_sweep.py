"""The tau sweep: end to end on a tiny model, resuming, outputs, and its helpers."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from bora_pyro.cli import main
from bora_pyro.sweep import parse_taus

from .conftest import synthetic_rows

FIGURES = ["figure1.png", "figure2.png", "figure3.png", "figure4.png", "figure5.png", "validation_curves.png"]


@pytest.fixture
def sweep_args(tmp_path):
    path = tmp_path / "corpus.csv"
    synthetic_rows({"big": 20, "mid": 8, "small": 4}).to_csv(path, index=False)
    return [
        "sweep",
        "--model",
        "tiny-random-llama",
        "--data",
        f"csv:{path}",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path / "sweep"),
    ]


def test_sweep_end_to_end_then_resume_skips_finished_taus(tmp_path, sweep_args, capsys):
    out = tmp_path / "sweep"
    assert main(sweep_args + ["--taus", "0,10,inf"]) == 0
    table = pd.read_csv(out / "tau_sweep.csv")
    assert table.tau.tolist() == [0, 10, math.inf]
    assert table["mode"].tolist() == ["independent", "hierarchical", "pooled"]
    assert {"lr", "steps", "wall_seconds", "valid_ppl", "valid_macro_ppl", "test_ppl", "test_macro_ppl"} <= set(table)
    per_task = pd.read_csv(out / "per_task.csv")
    assert len(per_task) == 3 * 3 and set(per_task.task) == {"big", "mid", "small"}
    for name in FIGURES:
        assert (out / name).stat().st_size > 5000, name
    summary = (out / "summary.md").read_text()
    assert "Best tau on validation" in summary and "Table A.1" in summary

    finished = {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("tau=*/metrics.json")}
    capsys.readouterr()
    assert main(sweep_args + ["--taus", "0,10,100,inf"]) == 0
    printed = capsys.readouterr().out
    assert "training tau=100" in printed and "training tau=10 " not in printed and "training tau=0 " not in printed
    for path in (out / "runs").glob("tau=*/metrics.json"):
        if path.parent.name != "tau=100":
            assert path.stat().st_mtime_ns == finished[path.parent.name]  # untouched
    assert pd.read_csv(out / "tau_sweep.csv").tau.tolist() == [0, 10, 100, math.inf]


def test_sweep_refuses_a_folder_with_other_settings(sweep_args, capsys):
    assert main(sweep_args + ["--taus", "inf"]) == 0
    assert main(sweep_args + ["--taus", "inf", "--rank", "4"]) == 2
    assert "holds a sweep with different settings" in capsys.readouterr().err


def test_parse_taus():
    assert parse_taus("inf, 0,10") == [0.0, 10.0, math.inf]
    with pytest.raises(ValueError, match="duplicates"):
        parse_taus("1,1")
    with pytest.raises(ValueError, match="tau must be 0, a number in .*got '-2'"):
        parse_taus("0,-2")


def test_a_sweep_over_seeds_reports_mean_sd_and_paired_differences(tmp_path, capsys):
    data = tmp_path / "corpus.csv"
    synthetic_rows({"big": 16, "small": 5}).to_csv(data, index=False)
    out = tmp_path / "seeds"
    args = [
        "sweep",
        "--model",
        "tiny-random-llama",
        "--data",
        f"csv:{data}",
        "--taus",
        "0,10,inf",
        "--seeds",
        "0,1",
        "--steps",
        "3",
        "--eval-every",
        "3",
        "--posterior-samples",
        "0",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    stats = pd.read_csv(out / "tau_seeds.csv")
    assert stats.tau.tolist() == [0.0, 10.0, float("inf")] and (stats.seeds == 2).all()
    runs = {s: json.loads((out / f"seed={s}" / "runs" / "tau=10" / "metrics.json").read_text()) for s in (0, 1)}
    assert stats.set_index("tau").loc[10.0, "test_ppl_mean"] == pytest.approx(
        (runs[0]["test_ppl"] + runs[1]["test_ppl"]) / 2
    )
    configs = [json.loads((out / f"seed={s}" / "runs" / "tau=10" / "config.json").read_text()) for s in (0, 1)]
    assert [c["train"]["seed"] for c in configs] == [0, 1] and configs[0]["corpus"]["seed"] == configs[1]["corpus"][
        "seed"
    ]
    base = {s: pd.read_csv(out / f"seed={s}" / "runs" / "tau=0" / "per_task.csv").base_test_ppl for s in (0, 1)}
    assert base[0].tolist() == pytest.approx(base[1].tolist(), rel=1e-9)  # scored once, shared by every run
    paired = pd.read_csv(out / "paired.csv")
    assert set(paired.reference) <= {0.0, math.inf} and len(paired) > 0
    for name in ("figure2.png", "figure3.png", "summary.md", "per_task_seeds.csv"):
        assert (out / name).is_file()
    capsys.readouterr()
    assert main(args) == 0  # resumable: nothing is retrained
    assert "sweep: training" not in capsys.readouterr().out

"""Every value written can be read back: each field of every config section, at its extreme values,
through config.json (JSON has no infinity) and as a --config file; bad values from a file get one line."""

from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest

from bora_pyro.cli import main
from bora_pyro.io.artifacts import read_json, write_json
from bora_pyro.runs.spec import SECTIONS, RunSpec

CANDIDATES = (None, 0, 1, 2**62, -1, 1e-300, 1e300, math.inf, -math.inf, "inf", "learn", (), ("a", "b"), True, False)


def extreme_values():
    """(section, field, value) for every value each field accepts among :data:`CANDIDATES` and its default."""
    for section, cls in {"": RunSpec, **SECTIONS}.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in SECTIONS:
                continue
            for value in CANDIDATES:
                kind = typing.get_args(hints[f.name]) or (hints[f.name],)
                if isinstance(value, bool) and bool not in kind:
                    continue
                try:
                    spec = RunSpec.from_dict({section: {f.name: value}} if section else {f.name: value})
                except (ValueError, TypeError):
                    continue
                yield pytest.param(spec, id=f"{section or 'top'}.{f.name}={value!r}")


@pytest.mark.parametrize("spec", list(extreme_values()))
def test_every_field_round_trips_through_its_json_file(tmp_path, spec):
    write_json(tmp_path / "config.json", spec.to_dict())
    assert RunSpec.from_dict(read_json(tmp_path / "config.json")) == spec


def test_extreme_values_are_among_the_cases():
    ids = {p.id for p in extreme_values()}
    assert "prior.tau=inf" in ids and "train.clip_norm=None" in ids and "train.steps=4611686018427387904" in ids


@pytest.mark.parametrize(
    "config, named",
    [
        ({"adapter": {"rank": True}}, "adapter.rank"),
        ([1, 2], "JSON object"),
        ({"train": 5}, "train"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"adapter": {"alpha": "inf"}}, "alpha"),
        ({"prior": {"tau": "-3"}}, "tau"),
        ({"model": 3}, "model"),
        ({"corpus": {"task_prompt": ["x"]}}, "task_prompt"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_a_bad_config_file_gets_one_line(tmp_path, capsys, config, named):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code = main(["train", "--config", str(path), "--model", "tiny-random-llama", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_run_at_extreme_options_is_evaluated_and_used_as_config(tmp_path):
    from .conftest import synthetic_rows, train_args

    data = tmp_path / "corpus.csv"
    synthetic_rows({"north": 14, "south": 8, "east": 4}).to_csv(data, index=False)
    run = tmp_path / "run"
    extreme = (
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--lr-tau-reference",
        "1e300",
        "--tau",
        "inf",
        "--clip-norm",
        "1e308",
    )
    assert main(train_args(data, run, *extreme)) == 0
    assert main(["evaluate", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    again = [
        "train",
        "--config",
        str(run / "config.json"),
        "--steps",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path / "b"),
    ]
    assert main(again) == 0
    assert RunSpec.from_run_folder(tmp_path / "b").prior.tau == math.inf

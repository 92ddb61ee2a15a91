"""Bad values at the library's edges are one clear error naming the value and what is allowed, never a
traceback: devices, the tau hyperprior, gate options, generation options, export task names and
non-finite adapters, a damaged posterior.nc and a damaged PEFT adapter (the Python API raises the same
ValueError, or CorruptFile, that the CLI prints on one line)."""

from __future__ import annotations

import json
import math
import os
import re
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bora_pyro.cli import main
from bora_pyro.evaluation import diagnostics
from bora_pyro.io.base_models import available_devices, resolve_device, tiny_random_llama
from bora_pyro.io.export import OWN_FILES, export_merged, export_peft, safe_names
from bora_pyro.io.integrity import CorruptFile, update_manifest
from bora_pyro.io.peft_import import import_peft
from bora_pyro.models.gates import GateConfig
from bora_pyro.models.generation import generate
from bora_pyro.models.prior import PriorConfig
from bora_pyro.models.tau_prior import TauPrior
from bora_pyro.nn.lora import MultiTaskLoRA
from bora_pyro.runs import load_run

from .conftest import copy_run, synthetic_rows, train_args, train_once

CORRUPT_EXIT = (2, 4)  # CorruptFile: 4 where the CLI tells it apart from other ValueErrors, else 2


def one_error_line(capsys, command: str) -> str:
    """The CLI's single error line on stderr (log lines aside); fails on a traceback or several lines."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = [line for line in err.splitlines() if not line.startswith(("WARNING ", "INFO "))]
    assert len(lines) == 1 and lines[0].startswith(f"bora-pyro {command}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run on the tiny model whose task names collide with an export's own files, with posterior.nc."""
    docs = {"north": 10, "tasks.json": 6, "README.md": 4}
    return train_once(tmp_path_factory.mktemp("edges"), docs, "--posterior-samples", "2")


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run (and its corpus) that a test may damage."""
    return copy_run(trained, tmp_path)


# 1. devices


def missing_devices() -> list[str]:
    """Device names this machine does not have (an index past the last GPU, MPS where there is none)."""
    names = [f"cuda:{torch.cuda.device_count() + 7}", "meta", "cpu:3"]
    if not torch.cuda.is_available():
        names.append("cuda")
    if "mps" not in available_devices():
        names.append("mps")
    return names


@pytest.mark.parametrize("device", ["foo", "", "CUDA", "cuda:-1", *missing_devices()])
def test_a_device_this_machine_lacks_names_the_available_ones(device):
    with pytest.raises(ValueError, match=rf"device '{device}' is not .*; use one of: auto, cpu"):
        resolve_device(device)


def test_usable_devices_resolve():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"
    assert str(resolve_device("auto")) in available_devices()


@pytest.mark.parametrize("device", ["foo", missing_devices()[0]])
def test_train_on_a_missing_device_is_one_line_and_writes_nothing(tmp_path, capsys, device):
    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 6, "b": 4}).to_csv(data, index=False)
    assert main(train_args(data, tmp_path / "run", "--device", device)) == 2
    assert f"device '{device}'" in one_error_line(capsys, "train") and not (tmp_path / "run").exists()


def test_generate_on_a_missing_device_is_one_line(trained, capsys):
    assert main(["generate", str(trained / "run"), "--task", "north", "--prompt", "the", "--device", "foo"]) == 2
    assert "use one of: auto, cpu" in one_error_line(capsys, "generate")


# 2. the tau hyperprior and the gates


BAD_TAU_PRIORS = [
    "lognormal:nan,2",
    "lognormal:inf,2",
    "lognormal:-inf,2",
    "lognormal:4.6,nan",
    "lognormal:4.6,inf",
    "lognormal:4.6,-2",
    "lognormal:4.6,0",
    "lognormal:4.6,1e-300",
    "lognormal:1000,2",
    "lognormal:4.6",
    "lognormal:",
    "lognormal",
    "lognormal:4.6,2,3",
    "lognormal:a,b",
    "gamma:nan,1",
    "gamma:2,inf",
    "gamma:0,1",
    "gamma:-2,0.02",
    "gamma:2,0",
    "gamma:1e30,1e-30",
    "gamma:2",
    "beta:1,2",
    "",
    ":",
]


@pytest.mark.parametrize("text", BAD_TAU_PRIORS)
def test_bad_tau_priors_are_refused_naming_the_value_and_the_form(text):
    with pytest.raises(ValueError, match=r"tau prior .*'lognormal:LOC,SCALE' .* or 'gamma:SHAPE,RATE'") as err:
        TauPrior.parse(text)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="tau prior"):
        PriorConfig(tau="learn", tau_prior=text)


@pytest.mark.parametrize("text", ["lognormal:4.6,2", "LogNormal: 0, 0.5", "gamma:2,0.02", "lognormal:-80,1"])
def test_good_tau_priors_parse(text):
    prior = TauPrior.parse(text)
    assert math.isfinite(prior.median()) and prior.median() > 0


def test_a_bad_tau_prior_on_the_command_line_is_one_line(tmp_path, capsys):
    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 6, "b": 4}).to_csv(data, index=False)
    options = ("--tau", "learn", "--inference", "vi", "--tau-prior", "lognormal:nan,2")
    assert main(train_args(data, tmp_path / "run", *options)) == 2
    assert "'lognormal:nan,2.0' is invalid: LOC=nan" in one_error_line(capsys, "train")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "options",
    [
        {"rank_lambda": math.nan},
        {"rank_lambda": math.inf},
        {"rank_lambda": -1.0},
        {"quant_lambda": math.nan},
        {"quant_lambda": -0.5},
        {"gate_init": math.nan},
        {"gate_init": -math.inf},
        {"gate_init": 1e39},
    ],
)
def test_bad_gate_options_are_refused_naming_the_value(options):
    ((name, value),) = options.items()
    with pytest.raises(ValueError, match=rf"{name} must be a finite number .*, got {re.escape(repr(value))}"):
        GateConfig(rank_gates="shared", **options)


@pytest.mark.parametrize("option", [("--rank-lambda", "nan"), ("--gate-init", "inf"), ("--quant-lambda", "-1")])
def test_bad_gate_options_on_the_command_line_are_one_line(tmp_path, capsys, option):
    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 6, "b": 4}).to_csv(data, index=False)
    assert main(train_args(data, tmp_path / "run", "--rank-gates", "--quant-gates", *option)) == 2
    assert "must be a finite number" in one_error_line(capsys, "train") and not (tmp_path / "run").exists()


# 3. generation


@pytest.mark.parametrize(
    "options, message",
    [
        ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\].*got 0.0"),
        ({"top_p": 5.0}, r"top_p must be a number in \(0, 1\].*got 5.0"),
        ({"top_p": math.nan}, r"top_p .* got nan"),
        ({"top_p": -0.1}, r"top_p .* got -0.1"),
        ({"temperature": 0.0}, r"temperature must be a finite number > 0, got 0.0"),
        ({"temperature": -1.0}, r"temperature .* got -1.0"),
        ({"temperature": math.inf}, r"temperature .* got inf"),
        ({"temperature": math.nan}, r"temperature .* got nan"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1, got 0"),
        ({"max_new_tokens": 2.5}, r"max_new_tokens .* got 2.5"),
        ({"seed": -1}, r"seed must be an integer from 0 to 2\*\*64 - 1, got -1"),
        ({"seed": 2**64}, r"seed .* got 18446744073709551616"),
        ({"prompts": [], "tasks": []}, r"need at least one prompt"),
        ({"prompts": ["a", "b"], "tasks": ["north"]}, r"need one task per prompt: got 2 prompts and 1 tasks"),
        ({"prompts": "the", "tasks": ["north"]}, r"prompts must be a list of strings"),
        ({"prompts": [1], "tasks": ["north"]}, r"prompts must be a list of strings"),
        ({"tasks": ["queen"]}, r"unknown task\(s\) \['queen'\]; known tasks: \['north', .*\] and 'global'"),
    ],
)
def test_bad_generation_options_are_refused(trained, options, message):
    loaded = load_run(trained / "run", device="cpu")
    call = {"prompts": ["the"], "tasks": ["north"], **options}
    with pytest.raises(ValueError, match=message):
        loaded.generate(call.pop("prompts"), call.pop("tasks"), **call)


def test_unknown_tasks_list_a_few_of_many_known_ones():
    lora = MultiTaskLoRA(tiny_random_llama()[0], rank=2)
    tasks = [f"t{d}" for d in range(50)]
    factors = {name: torch.zeros(len(tasks), *shape) for name, shape in lora.shapes().items()}
    with pytest.raises(ValueError, match=r"known tasks: \['t0', .*, 't9'\] \.\.\. \(50 in all\)") as err:
        generate(lora, tiny_random_llama()[1], tasks, factors, None, ["x"], ["t50"])
    assert "t10" not in str(err.value)


@pytest.mark.parametrize(
    "option", [("--top-p", "0"), ("--top-p", "5"), ("--temperature", "0"), ("--max-new-tokens", "0")]
)
def test_bad_generation_options_on_the_command_line_are_one_line(trained, capsys, option):
    assert main(["generate", str(trained / "run"), "--task", "north", "--prompt", "the", *option]) == 2
    assert "must be" in one_error_line(capsys, "generate")


# 4. export: task names and non-finite adapters


def test_task_names_never_collide_with_the_exports_own_files(tmp_path):
    tasks = ["tasks.json", "README.md", "readme.MD", "manifest.json", ".bora_pyro.json", "..", "/", "", "A", "a"]
    tasks += ["NUL", "con.txt", "Global", "task"]
    folders = safe_names(tasks)
    lowered = [f.lower() for f in folders.values()]
    assert len(set(lowered)) == len(tasks) and "global" not in lowered
    assert not {f.lower() for f in OWN_FILES} & set(lowered) and not {"nul", "con.txt"} & set(lowered)
    lora = MultiTaskLoRA(tiny_random_llama()[0], rank=2)
    factors = {name: torch.zeros(len(tasks), *shape) for name, shape in lora.shapes().items()}
    theta = {name: torch.zeros(shape) for name, shape in lora.shapes().items()}
    written = export_peft(lora, tasks, factors, theta, "tiny-random-llama", tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "tasks.json").read_text()) == written
    assert (tmp_path / "peft" / "README.md").is_file()
    for folder in written.values():
        assert (tmp_path / "peft" / folder / "adapter_model.safetensors").is_file()


def test_the_cli_exports_tasks_named_like_its_own_files(trained, tmp_path):
    out = tmp_path / "peft"
    assert main(["export", str(trained / "run"), "--out", str(out)]) == 0
    folders = json.loads((out / "tasks.json").read_text())
    assert set(folders) == {"north", "tasks.json", "README.md", "global"}
    assert folders["tasks.json"] != "tasks.json" and folders["README.md"] != "README.md"
    assert (out / "README.md").read_text().startswith("# PEFT LoRA adapters")


@pytest.mark.parametrize(
    "tasks, message",
    [
        ("north,north", r"the tasks to export name \['north'\] more than once"),
        ("north,global,north,global", r"name \['north', 'global'\] more than once"),
        (",", r"no task to export"),
        ("queen", r"unknown task\(s\) \['queen'\] to export"),
    ],
)
def test_bad_export_task_lists_are_one_line_and_write_nothing(trained, tmp_path, capsys, tasks, message):
    out = tmp_path / "peft"
    assert main(["export", str(trained / "run"), "--out", str(out), "--tasks", tasks]) == 2
    assert re.search(message, one_error_line(capsys, "export")) and not out.exists()


def test_duplicate_task_names_are_refused_by_the_api(tmp_path):
    lora = MultiTaskLoRA(tiny_random_llama()[0], rank=2)
    factors = {name: torch.zeros(2, *shape) for name, shape in lora.shapes().items()}
    with pytest.raises(ValueError, match=r"export: task names must be unique, duplicated: \['a'\]"):
        export_peft(lora, ["a", "a"], factors, None, "tiny-random-llama", tmp_path / "peft")
    with pytest.raises(ValueError, match=r"no task to export"):
        export_peft(lora, ["a", "b"], factors, None, "tiny-random-llama", tmp_path / "peft", only=[])
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_export_refuses_non_finite_factors_and_keeps_the_old_export(tmp_path, bad):
    lora = MultiTaskLoRA(tiny_random_llama()[0], rank=2)
    tasks = ["a", "b", "c"]
    factors = {name: torch.zeros(3, *shape) for name, shape in lora.shapes().items()}
    theta = {name: torch.zeros(shape) for name, shape in lora.shapes().items()}
    out = tmp_path / "peft"
    export_peft(lora, tasks, factors, theta, "tiny-random-llama", out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    name = next(iter(factors))
    factors[name][1, 0, 0] = bad
    with pytest.raises(CorruptFile, match=rf"task 'b' has non-finite values \(NaN or inf\) in '{name}'"):
        export_peft(lora, tasks, factors, theta, "tiny-random-llama", out, overwrite=True)
    theta[name][0, 0] = bad
    with pytest.raises(CorruptFile, match=rf"global \(Theta\) has non-finite values .* in '{name}'"):
        export_peft(lora, tasks, factors, theta, "tiny-random-llama", out, overwrite=True, only=["global"])
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["peft"]  # no temporary folder left


@pytest.mark.parametrize("value", [math.nan, 1e30])
def test_merged_export_refuses_non_finite_factors_or_weights(tmp_path, value):
    lm, tokenizer = tiny_random_llama()
    lora = MultiTaskLoRA(lm, rank=2)
    factors = {name: torch.full(shape, value) for name, shape in lora.shapes().items()}
    with pytest.raises(CorruptFile, match="task 'north'.* non-finite"):
        export_merged(lora, tokenizer, factors, tmp_path / "merged", task="north")
    assert len(lora.layers) == len(lora.adapted)  # nothing was merged: the model is as it was
    assert not (tmp_path / "merged").exists()


def plant(run, value: float) -> None:
    """Put ``value`` into every task's row of one factor of a run's adapters and record the change in the
    run's manifest (as a run written that way would be): only the export's own check can catch it."""
    path = run / "adapters.safetensors"
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    state = load_file(path)
    key = next(k for k in state if not k.startswith("global."))
    state[key].fill_(value)
    save_file(state, path, metadata=metadata)
    update_manifest(run, ["adapters.safetensors"])


@pytest.mark.parametrize("form", [["--format", "peft"], ["--format", "merged", "--task", "north"]])
def test_cli_export_of_a_nan_adapter_is_one_line_and_writes_nothing(run, tmp_path, capsys, form):
    plant(run, math.nan)
    assert main(["export", str(run), "--out", str(tmp_path / "out"), *form]) in CORRUPT_EXIT
    assert "non-finite" in one_error_line(capsys, "export") and not (tmp_path / "out").exists()


# 5. a damaged posterior.nc


def damaged(posterior: bytes) -> dict[str, bytes]:
    return {
        "empty": b"",
        "truncated": posterior[: len(posterior) // 2],
        "one byte short": posterior[:-1],
        "random bytes": os.urandom(4096),
        "text": b"not a netCDF file\n",
        "header only": posterior[:8],
    }


@pytest.mark.parametrize("kind", list(damaged(b"x" * 100)))
def test_a_damaged_posterior_is_corrupt_file_naming_it(trained, tmp_path, capsys, kind):
    file = tmp_path / "posterior.nc"
    file.write_bytes(damaged((trained / "run" / "posterior.nc").read_bytes())[kind])
    with pytest.raises(CorruptFile, match=rf"{file} is not a readable netCDF file"):
        diagnostics.load(file)
    assert main(["diagnose", str(file)]) in CORRUPT_EXIT
    assert str(file) in one_error_line(capsys, "diagnose")


def test_a_netcdf_without_the_posterior_groups_is_corrupt_file(tmp_path, capsys):
    import xarray as xr

    file = tmp_path / "other.nc"
    xr.Dataset({"x": ("a", [1, 2, 3])}).to_netcdf(file, engine="h5netcdf")
    with pytest.raises(CorruptFile, match=rf"{file} is not a posterior written by bora_pyro: it lacks posterior.norm"):
        diagnostics.load(file)
    assert main(["diagnose", str(file)]) in CORRUPT_EXIT
    assert "lacks posterior.norm" in one_error_line(capsys, "diagnose")


def test_every_damaged_byte_of_a_posterior_is_read_or_refused_cleanly(trained, tmp_path, capfd):
    good = (trained / "run" / "posterior.nc").read_bytes()
    file = tmp_path / "posterior.nc"
    messages = []
    for position in range(0, len(good), max(1, len(good) // 40)):
        changed = bytearray(good)
        changed[position] ^= 0xFF
        file.write_bytes(bytes(changed))
        try:
            diagnostics.load(file)
        except CorruptFile as err:
            messages.append(str(err))
    assert messages and all(str(file) in m and "\n" not in m for m in messages)
    assert "Traceback" not in capfd.readouterr().err


def test_a_sound_posterior_still_loads(trained):
    idata = diagnostics.load(trained / "run")
    assert "docs" in idata.log_likelihood and "norm" in idata.posterior


# 6. a damaged PEFT adapter


@pytest.fixture
def adapter(tmp_path):
    """A PEFT adapter folder (rank 4, q_proj and v_proj of the tiny model) and a LoRA that can import it."""
    lora = MultiTaskLoRA(tiny_random_llama()[0], rank=4)
    factors = {name: torch.randn(1, *shape) * 0.1 for name, shape in lora.shapes().items()}
    export_peft(lora, ["a"], factors, None, "tiny-random-llama", tmp_path / "peft")
    return lora, tmp_path / "peft" / "a"


def test_an_intact_adapter_imports(adapter):
    lora, folder = adapter
    assert set(import_peft(lora, folder)) == set(lora.shapes())


def safetensors_variants(data: bytes) -> dict[str, bytes]:
    """Damaged copies of a safetensors file: cut, random, and headers that lie about their tensors."""
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    name = next(k for k in header if k != "__metadata__")

    def lying(**entry) -> bytes:
        text = json.dumps({**header, name: {**header[name], **entry}}).encode()
        return struct.pack("<Q", len(text)) + text + data[8 + size :]

    return {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "random": os.urandom(512),
        "header length lies": struct.pack("<Q", 10**12) + data[8:],
        "header is not JSON": struct.pack("<Q", 4) + b"{{{{" + data[8 + size :],
        "shape lies": lying(shape=[x + 1 for x in header[name]["shape"]]),
        "offsets lie": lying(data_offsets=[0, 10**6]),
        "dtype lies": lying(dtype="F64"),
        "unknown dtype": lying(dtype="X9"),
    }


SAFETENSORS_DAMAGE = (
    "empty",
    "truncated",
    "random",
    "header length lies",
    "header is not JSON",
    "shape lies",
    "offsets lie",
    "dtype lies",
    "unknown dtype",
)


@pytest.mark.parametrize("kind", SAFETENSORS_DAMAGE)
def test_a_damaged_adapter_file_is_a_value_error_naming_it(adapter, kind):
    lora, folder = adapter
    path = folder / "adapter_model.safetensors"
    path.write_bytes(safetensors_variants(path.read_bytes())[kind])
    with pytest.raises(ValueError, match=rf"{path} is not an intact safetensors file") as err:
        import_peft(lora, folder)
    assert "\n" not in str(err.value)


def test_non_finite_adapter_weights_are_refused(adapter):
    lora, folder = adapter
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    key = sorted(state)[0]
    state[key].view(-1)[3] = math.inf
    save_file(state, path)
    with pytest.raises(ValueError, match=rf"{path}: {key} has non-finite values"):
        import_peft(lora, folder)


def test_a_missing_adapter_file_is_named(adapter):
    lora, folder = adapter
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors not found"):
        import_peft(lora, folder)


DROP = object()  # a key removed from the config


@pytest.mark.parametrize(
    "config, message",
    [
        ("[1, 2]", r"must hold a JSON object \(a PEFT adapter config\), got a list"),
        ('"LORA"', r"got a str"),
        ("{", r"is not valid JSON"),
        ("", r"is not valid JSON"),
        ({"r": True}, r"r must be an integer >= 1, got True"),
        ({"r": "4"}, r"r must be an integer >= 1, got '4'"),
        ({"r": 0}, r"r must be an integer >= 1, got 0"),
        ({"r": None}, r"r must be an integer >= 1, got None"),
        ({"lora_alpha": "8"}, r"lora_alpha must be a finite number > 0, got '8'"),
        ({"lora_alpha": -1}, r"lora_alpha must be a finite number > 0, got -1"),
        ({"use_rslora": "yes"}, r"use_rslora must be true or false, got 'yes'"),
        ({"target_modules": 3}, r"target_modules must be a string or a list of strings, got 3"),
        ({"rank_pattern": [1]}, r"rank_pattern must be an object, got \[1\]"),
        ({"peft_type": 7}, r"peft_type must be a string, got 7"),
        ({"r": DROP}, r"has no 'r'"),
        ({"lora_alpha": DROP}, r"has no 'lora_alpha'"),
    ],
)
def test_a_bad_adapter_config_is_a_value_error_naming_it(adapter, config, message):
    lora, folder = adapter
    path = folder / "adapter_config.json"
    if isinstance(config, dict):
        changed = {**json.loads(path.read_text()), **config}
        config = json.dumps({key: value for key, value in changed.items() if value is not DROP})
    path.write_text(config)
    with pytest.raises(ValueError, match=rf"{path}.*{message}"):
        import_peft(lora, folder)


def test_train_from_a_damaged_adapter_is_one_line_and_writes_nothing(adapter, tmp_path, capsys):
    _, folder = adapter
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    data = tmp_path / "corpus.csv"
    synthetic_rows({"a": 6, "b": 4}).to_csv(data, index=False)
    options = ("--rank", "4", "--init-peft", str(folder))
    assert main(train_args(data, tmp_path / "run", *options)) == 2
    assert "is not an intact safetensors file" in one_error_line(capsys, "train")
    assert not (tmp_path / "run").exists()

"""Shared fixtures: a clean Pyro state per test, tiny random models, small synthetic corpora."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyro
import pytest
import torch

import bora_pyro
from bora_pyro.io.base_models import tiny_random_llama

WORDS = "the lord seide to his puple and thei wenten forth in to the lond of the king with gold".split()


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    torch.manual_seed(0)
    yield
    pyro.clear_param_store()


def synthetic_rows(docs_per_task: dict[str, int], seed: int = 0, words: int = 12) -> pd.DataFrame:
    """Rows (task, text) of random word sequences; each task has its own favourite words."""
    rng = random.Random(seed)
    rows = []
    for t, (task, n) in enumerate(docs_per_task.items()):
        favourite = WORDS[t % len(WORDS)]
        for _ in range(n):
            text = " ".join(favourite if rng.random() < 0.4 else rng.choice(WORDS) for _ in range(words))
            rows.append({"task": task, "text": text})
    return pd.DataFrame(rows)


def train_args(data, out, *options: str) -> list[str]:
    """Arguments of a quick ``bora-pyro train`` on the tiny random model, ``options`` appended.

    Defaults: ``--model tiny-random-llama --data csv:DATA --steps 6 --eval-every 3 --no-progress
    --posterior-samples 0 --out OUT``; everything else is the CLI's default. A later option wins over an
    earlier one, so ``options`` may change a default (e.g. ``"--steps", "10"``).
    """
    return [
        "train",
        "--model",
        "tiny-random-llama",
        "--data",
        f"csv:{data}",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--no-progress",
        "--posterior-samples",
        "0",
        "--out",
        str(out),
        *options,
    ]


@pytest.fixture
def tiny_lm():
    return tiny_random_llama()


@pytest.fixture
def make_corpus(tmp_path, tiny_lm):
    """Build a corpus from {task: n_docs} through the real csv loader."""

    def build(docs_per_task: dict[str, int] | None = None, **options):
        docs_per_task = docs_per_task or {"alpha": 12, "beta": 8, "gamma": 5}
        path = tmp_path / "corpus.csv"
        synthetic_rows(docs_per_task).to_csv(path, index=False)
        options.setdefault("max_tokens", 96)
        return bora_pyro.load_corpus(f"csv:{path}", tokenizer=tiny_lm[1], **options)

    return build


@contextlib.contextmanager
def held_by_another_process(folder: Path):
    """Hold ``folder``'s bora_pyro lock from a child process for the block (a process may retake its own)."""
    script = (
        "import time; from bora_pyro.io.folders import folder_lock;"
        f"lock = folder_lock({str(folder)!r}); lock.__enter__(); print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def edit_run_file(path: Path, **changes) -> None:
    """Change keys of a run folder's JSON file as if bora_pyro had written it so (the folder's manifest is
    written anew): for tests of what a well-formed but hostile or outdated file gets."""
    from bora_pyro.io.integrity import read_manifest, write_manifest

    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    manifest = read_manifest(path.parent)
    if manifest is not None:
        write_manifest(path.parent, unhashed=manifest["unhashed"])


def train_once(root: Path, docs_per_task: dict[str, int], *options: str) -> Path:
    """Train a quick run ``root/run`` on ``root/corpus.csv`` (synthetic rows of ``docs_per_task``); returns
    ``root``. For module-scoped fixtures: tests damage copies (:func:`copy_run`), never this one."""
    from bora_pyro.cli import main

    data = root / "corpus.csv"
    synthetic_rows(docs_per_task).to_csv(data, index=False)
    assert main(train_args(data, root / "run", "--steps", "2", "--eval-every", "2", *options)) == 0
    return root


def evaluate_on_changed_data(csv: Path, rows: pd.DataFrame, run: Path, capsys) -> tuple[int, str]:
    """``bora-pyro evaluate RUN`` with the training data ``csv`` replaced by ``rows`` for the call (restored
    after); returns the exit code and stderr."""
    from bora_pyro.cli import main

    original = csv.read_bytes()
    try:
        rows.to_csv(csv, index=False)
        capsys.readouterr()
        code = main(["evaluate", str(run)])
        return code, capsys.readouterr().err
    finally:
        csv.write_bytes(original)


def copy_run(trained: Path, into: Path) -> Path:
    """A copy of ``trained``'s run folder and corpus in ``into``, for a test to damage; returns the run."""
    import shutil

    shutil.copytree(trained / "run", into / "run")
    shutil.copy(trained / "corpus.csv", into / "corpus.csv")
    return into / "run"

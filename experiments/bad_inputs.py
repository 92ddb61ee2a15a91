"""Try bad inputs on the command line and tabulate what each gets (for docs/bad-inputs.md).

    .venv/bin/python experiments/bad_inputs.py > experiments/results/bad_inputs.md

Every case runs the CLI in this process (a signal case in a subprocess); an exception escaping the
CLI (a traceback a user would see) is shown as such and counted at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from bora_pyro.cli import main
from bora_pyro.io.faults import CRASH_ENV
from bora_pyro.io.folders import MARKER, folder_lock


def run(args: list[str]) -> tuple[int | str, str]:
    err, out = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(args)
    except SystemExit as usage:  # argparse's own usage error: a message, no traceback
        return usage.code, err.getvalue().strip().splitlines()[-1].replace("|", "\\|")
    except BaseException as escaped:
        return "traceback", f"{type(escaped).__name__}: {escaped}"
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [
        line
        for line in err.getvalue().splitlines()
        if any(w in line for w in ("error", "dropped", "WARNING", "note", "interrupted", "non-finite"))
    ]
    shown = lines[-1] if lines else (err.getvalue() or out.getvalue()).strip().splitlines()[-1]
    return code, shown.replace("|", "\\|")


def run_signalled(args: list[str], checkpoint: Path) -> tuple[int, str]:
    """Start a training in a subprocess, send SIGTERM once it has saved a checkpoint; its last stderr line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bora_pyro.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    while not list(checkpoint.glob("step-*")) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate()[1]
    shown = err.strip().splitlines()[-1] if "Traceback" not in err else "traceback: " + err.strip().splitlines()[-1]
    return proc.returncode, shown.replace("|", "\\|")


def main_table() -> None:
    tmp = Path(tempfile.mkdtemp())
    # the cases that try to overwrite the working directory and the home folder point at stand-ins
    for stand_in in ("home", "cwd"):
        (tmp / stand_in).mkdir()
        (tmp / stand_in / "notes.txt").write_text("keep")
    os.environ["HOME"] = str(tmp / "home")
    os.chdir(tmp / "cwd")
    good = tmp / "good.csv"
    rows = [
        {"task": t, "text": f"{t} text number {i} with some words"} for t, n in (("a", 8), ("b", 5)) for i in range(n)
    ]
    pd.DataFrame(rows).to_csv(good, index=False)
    variants = {
        "nocol.csv": pd.DataFrame(rows).rename(columns={"task": "speaker"}),
        "few.csv": pd.DataFrame(rows + [{"task": "tiny", "text": "only one"}, {"task": "tiny", "text": "and two"}]),
        "dupes.csv": pd.DataFrame(rows + [{"task": "a ", "text": "spaced name"}]),
        "blank.csv": pd.DataFrame(rows + [{"task": "a", "text": "   "}, {"task": "b", "text": None}]),
        "global.csv": pd.DataFrame(rows + [{"task": "global", "text": "a task named like Theta"}]),
        "splits.csv": pd.DataFrame([{**row, "split": "train" if i else "holdout"} for i, row in enumerate(rows)]),
        "messages.csv": pd.DataFrame(
            [
                {
                    "task": "a",
                    "messages": json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]),
                }
            ]
            + [{"task": "a", "messages": '[{"role": "user", "content": ]'}]
        ),
    }
    variants["chat.csv"] = variants["messages.csv"].iloc[[0, 0, 0, 0]]
    for name, frame in variants.items():
        frame.to_csv(tmp / name, index=False)
    pd.DataFrame(rows + [{"task": "a", "text": "café"}]).to_csv(tmp / "latin1.csv", index=False, encoding="latin1")
    jsonl = "".join(json.dumps(row) + "\n" for row in rows)
    (tmp / "broken.jsonl").write_text(jsonl + '{"task": "a", "text": "no closing brace"\n')
    (tmp / "nulltask.jsonl").write_text(jsonl + '{"task": null, "text": "whose text?"}\n')
    train = [
        "train",
        "--model",
        "tiny-random-llama",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--no-progress",
        "--posterior-samples",
        "0",
    ]
    data = ["--data", f"csv:{good}"]
    (tmp / "exists").mkdir()
    (tmp / "exists" / "keep.txt").write_text("x")
    old = tmp / "old"
    with contextlib.redirect_stdout(io.StringIO()):  # the two good runs' own output is not part of the table
        assert main(train + data + ["--out", str(tmp / "ok")]) == 0
        main(train + data + ["--out", str(old)])
    (tmp / "dora").mkdir()
    (tmp / "dora" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_dora": True})
    )
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "format": 0, "bora_pyro_version": "0.0.1"}))
    # run folders that ask for what only the user may grant, or were trained on other weights
    for name, change in (
        ("asks_remote_code", {"trust_remote_code": True}),
        ("other_weights", {"base_model": {**config.get("base_model", {}), "weights_sha256": "0" * 64}}),
    ):
        with contextlib.redirect_stdout(io.StringIO()):
            main(train + data + ["--out", str(tmp / name)])
        (tmp / name / "config.json").write_text(
            json.dumps({**json.loads((tmp / name / "config.json").read_text()), **change})
        )
    # a run killed after its fitted state was written, its checkpoint left behind; then the data changes
    mine = tmp / "mine.csv"
    mine.write_text(good.read_text())
    killed, changed = tmp / "killed", tmp / "changed"
    for out, crash in ((killed, "checkpoint.slot-renamed:1"), (changed, "run.fitted:1")):
        args = [*train, "--data", f"csv:{mine}", "--checkpoint-every", "1", "--out", str(out)]
        subprocess.run(
            [sys.executable, "-m", "bora_pyro.cli", *args], env={**os.environ, CRASH_ENV: crash}, capture_output=True
        )
    mine.write_text(mine.read_text().replace("text number", "words numbered"))
    # a run whose training data was deleted after training
    gone = tmp / "gone.csv"
    gone.write_text(good.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        main(train + ["--data", f"csv:{gone}", "--out", str(tmp / "data_gone")])
    gone.unlink()
    (tmp / "afile").write_text("not a folder")
    (tmp / "notsweep").mkdir()
    (tmp / "notsweep" / "data.txt").write_text("x")
    cases = [
        ("unknown model", train + data + ["--model", "gpt-17", "--out", str(tmp / "r")]),
        ("unknown corpus", train + ["--data", "wikipedia", "--out", str(tmp / "r")]),
        ("missing corpus file", train + ["--data", "csv:nope.csv", "--out", str(tmp / "r")]),
        ("missing task column", train + ["--data", f"csv:{tmp / 'nocol.csv'}", "--out", str(tmp / "r")]),
        (
            "empty / whitespace texts (run continues)",
            train + ["--data", f"csv:{tmp / 'blank.csv'}", "--out", str(tmp / "r2")],
        ),
        (
            "tasks of 1 and 2 documents (trained, said unscored)",
            train + ["--data", f"csv:{tmp / 'few.csv'}", "--out", str(tmp / "r3")],
        ),
        (
            "a split column value that is no split",
            train + ["--data", f"csv:{tmp / 'splits.csv'}", "--out", str(tmp / "r")],
        ),
        ("invalid JSON in a messages cell", train + ["--data", f"csv:{tmp / 'messages.csv'}", "--out", str(tmp / "r")]),
        (
            "messages data, the tokenizer has no chat template",
            train + ["--data", f"csv:{tmp / 'chat.csv'}", "--out", str(tmp / "r")],
        ),
        ("non-UTF-8 CSV (Latin-1)", train + ["--data", f"csv:{tmp / 'latin1.csv'}", "--out", str(tmp / "r")]),
        ("malformed JSON line", train + ["--data", f"jsonl:{tmp / 'broken.jsonl'}", "--out", str(tmp / "r")]),
        ("JSON null task", train + ["--data", f"jsonl:{tmp / 'nulltask.jsonl'}", "--out", str(tmp / "r")]),
        (
            "a task named 'global' (Theta's name)",
            train + ["--data", f"csv:{tmp / 'global.csv'}", "--out", str(tmp / "r")],
        ),
        (
            "task names equal after normalisation",
            train + ["--data", f"csv:{tmp / 'dupes.csv'}", "--out", str(tmp / "r")],
        ),
        ("unknown Bible book", train + ["--data", "bible-books", "--books", "Hezekiah", "--out", str(tmp / "r")]),
        ("unknown target module", train + data + ["--targets", "qkv", "--out", str(tmp / "r")]),
        ("tau < 0", train + data + ["--tau", "-1", "--out", str(tmp / "r")]),
        ("learned tau with MAP", train + data + ["--tau", "learn", "--out", str(tmp / "r")]),
        ("rank < 1", train + data + ["--rank", "0", "--out", str(tmp / "r")]),
        (
            "max_tokens too small for the prompt",
            train + data + ["--task-prompt", "speaker {task} says: ", "--max-tokens", "8", "--out", str(tmp / "r")],
        ),
        ("existing non-empty run folder", train + data + ["--out", str(tmp / "exists")]),
        ("not a run folder", ["evaluate", str(tmp)]),
        ("run folder from an incompatible version", ["evaluate", str(old)]),
        ("unknown task at generation", ["generate", str(tmp / "ok"), "--task", "zz", "--prompt", "hi"]),
        ("resume without a checkpoint", ["train", "--resume", str(tmp / "nothing")]),
        (
            "PEFT adapter to start from is DoRA",
            train + data + ["--init-peft", str(tmp / "dora"), "--out", str(tmp / "r")],
        ),
        ("PEFT adapter folder missing", train + data + ["--init-peft", str(tmp / "nowhere"), "--out", str(tmp / "r")]),
        ("--distributed without torchrun", train + data + ["--distributed", "--out", str(tmp / "r")]),
        ("--global-prior malformed", train + data + ["--global-prior", "normal:-1", "--out", str(tmp / "r")]),
    ]
    cases += [
        (
            "--overwrite of a folder bora_pyro did not write",
            train + data + ["--out", str(tmp / "exists"), "--overwrite"],
        ),
        ("--overwrite of the working directory", train + data + ["--out", ".", "--overwrite"]),
        ("--overwrite of the home folder", train + data + ["--out", str(Path.home()), "--overwrite"]),
        ("--out is a file", train + data + ["--out", str(tmp / "afile")]),
        (
            "export over a folder bora_pyro did not write",
            ["export", str(tmp / "ok"), "--out", str(tmp / "exists"), "--overwrite"],
        ),
        (
            "sweep into a folder that is not a sweep",
            ["sweep", *train[1:], *data, "--taus", "0", "--out", str(tmp / "notsweep")],
        ),
        ("run folder asks for trust_remote_code (evaluate)", ["evaluate", str(tmp / "asks_remote_code")]),
        (
            "run folder asks for trust_remote_code (generate)",
            ["generate", str(tmp / "asks_remote_code"), "--task", "a", "--prompt", "hi"],
        ),
        (
            "run folder asks for trust_remote_code (export)",
            ["export", str(tmp / "asks_remote_code"), "--out", str(tmp / "e1")],
        ),
        ("run folder trained on other base weights", ["evaluate", str(tmp / "other_weights")]),
        ("fresh train over an earlier run's checkpoint", train + ["--data", f"csv:{mine}", "--out", str(killed)]),
        ("resume after the data changed", ["train", "--resume", str(changed)]),
        ("resume a run that was never checkpointed", ["train", "--resume", str(tmp / "ok")]),
        ("a folder another process is writing", train + data + ["--out", str(tmp / "locked")]),
        (
            "diverging training (lr 1e30, no clipping)",
            train + data + ["--lr", "1e30", "--clip-norm", "0", "--steps", "6", "--out", str(tmp / "diverged")],
        ),
        (
            "documents longer than --max-tokens (run continues)",
            train + data + ["--max-tokens", "8", "--out", str(tmp / "r3")],
        ),
        ("--long-documents unknown", train + data + ["--long-documents", "wrap", "--out", str(tmp / "r")]),
        ("--max-eval-docs 0", train + data + ["--max-eval-docs", "0", "--out", str(tmp / "r")]),
        ("--valid-fraction 0.7", train + data + ["--valid-fraction", "0.7", "--out", str(tmp / "r")]),
        ("--task-prompt without {task}", train + data + ["--task-prompt", "speaker: ", "--out", str(tmp / "r")]),
        (
            "unknown Bible translation",
            train + ["--data", "bible-books", "--translation", "klingon", "--out", str(tmp / "r")],
        ),
        (
            "generate --max-new-tokens 0",
            ["generate", str(tmp / "ok"), "--task", "a", "--prompt", "hi", "--max-new-tokens", "0"],
        ),
        ("re-scoring a run whose training data was deleted", ["evaluate", str(tmp / "data_gone")]),
        (
            "--load-in-4bit and --load-in-8bit together",
            train + data + ["--load-in-4bit", "--load-in-8bit", "--out", str(tmp / "r")],
        ),
        ("--load-in-4bit on the built-in tiny model", train + data + ["--load-in-4bit", "--out", str(tmp / "r")]),
        ("--targets re: with an invalid pattern", train + data + ["--targets", "re:(q_proj", "--out", str(tmp / "r")]),
    ]
    print("| bad input | exit code | what the user sees |")
    print("|---|---|---|")
    tracebacks = 0
    for what, args in cases:
        if what == "a folder another process is writing":
            with folder_lock(tmp / "locked"):
                code, message = run(args)
        else:
            code, message = run(args)
        tracebacks += code == "traceback"
        shown = message if len(message) <= 300 else message[:297] + "..."
        print(f"| {what} | {code} | `{shown}` |")
    sig = train + data + ["--steps", "400", "--checkpoint-every", "2", "--out", str(tmp / "signalled")]
    code, message = run_signalled(sig, tmp / "signalled.checkpoint")
    tracebacks += message.startswith("traceback")
    print(f"| SIGTERM during training (subprocess) | {code} | `{message}` |")
    print(
        f"\n{len(cases) + 1} cases; Python tracebacks shown to the user: {tracebacks}. A marker file "
        f"({MARKER}) identifies the folders bora_pyro wrote."
    )


if __name__ == "__main__":
    main_table()

"""Try bad inputs on the command line and tabulate what each gets (for the README).

    .venv/bin/python experiments/bad_inputs.py > experiments/results/bad_inputs.md
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from pathlib import Path

import pandas as pd

from bora_pyro.cli import main


def run(args: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(args)
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [line for line in err.getvalue().splitlines() if "error" in line or "dropped" in line]
    return code, (lines[-1] if lines else out.getvalue().splitlines()[0]).replace("|", "\\|")


def main_table() -> None:
    tmp = Path(tempfile.mkdtemp())
    good = tmp / "good.csv"
    rows = [{"task": t, "text": f"{t} text number {i} with some words"} for t, n in (("a", 8), ("b", 5)) for i in range(n)]
    pd.DataFrame(rows).to_csv(good, index=False)
    variants = {
        "nocol.csv": pd.DataFrame(rows).rename(columns={"task": "speaker"}),
        "few.csv": pd.DataFrame(rows + [{"task": "tiny", "text": "only one"}, {"task": "tiny", "text": "and two"}]),
        "dupes.csv": pd.DataFrame(rows + [{"task": "a ", "text": "spaced name"}]),
        "blank.csv": pd.DataFrame(rows + [{"task": "a", "text": "   "}, {"task": "b", "text": None}]),
        "global.csv": pd.DataFrame(rows + [{"task": "global", "text": "a task named like Theta"}]),
    }
    for name, frame in variants.items():
        frame.to_csv(tmp / name, index=False)
    pd.DataFrame(rows + [{"task": "a", "text": "café"}]).to_csv(tmp / "latin1.csv", index=False, encoding="latin1")
    jsonl = "".join(json.dumps(row) + "\n" for row in rows)
    (tmp / "broken.jsonl").write_text(jsonl + '{"task": "a", "text": "no closing brace"\n')
    (tmp / "nulltask.jsonl").write_text(jsonl + '{"task": null, "text": "whose text?"}\n')
    train = ["train", "--model", "tiny-random-llama", "--steps", "2", "--eval-every", "2", "--no-progress",
             "--posterior-samples", "0"]
    data = ["--data", f"csv:{good}"]
    (tmp / "exists").mkdir()
    (tmp / "exists" / "keep.txt").write_text("x")
    old = tmp / "old"
    with contextlib.redirect_stdout(io.StringIO()):  # the two good runs' own output is not part of the table
        assert main(train + data + ["--out", str(tmp / "ok")]) == 0
        main(train + data + ["--out", str(old)])
    (tmp / "dora").mkdir()
    (tmp / "dora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                                  "use_dora": True}))
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "format": 0, "bora_pyro_version": "0.0.1"}))
    cases = [
        ("unknown model", train + data + ["--model", "gpt-17", "--out", str(tmp / "r")]),
        ("unknown corpus", train + ["--data", "wikipedia", "--out", str(tmp / "r")]),
        ("missing corpus file", train + ["--data", "csv:nope.csv", "--out", str(tmp / "r")]),
        ("missing task column", train + ["--data", f"csv:{tmp / 'nocol.csv'}", "--out", str(tmp / "r")]),
        ("empty / whitespace texts (run continues)", train + ["--data", f"csv:{tmp / 'blank.csv'}", "--out", str(tmp / "r2")]),
        ("a task with too few documents", train + ["--data", f"csv:{tmp / 'few.csv'}", "--out", str(tmp / "r")]),
        ("non-UTF-8 CSV (Latin-1)", train + ["--data", f"csv:{tmp / 'latin1.csv'}", "--out", str(tmp / "r")]),
        ("malformed JSON line", train + ["--data", f"jsonl:{tmp / 'broken.jsonl'}", "--out", str(tmp / "r")]),
        ("JSON null task", train + ["--data", f"jsonl:{tmp / 'nulltask.jsonl'}", "--out", str(tmp / "r")]),
        ("a task named 'global' (Theta's name)", train + ["--data", f"csv:{tmp / 'global.csv'}", "--out", str(tmp / "r")]),
        ("task names equal after normalisation", train + ["--data", f"csv:{tmp / 'dupes.csv'}", "--out", str(tmp / "r")]),
        ("unknown Bible book", train + ["--data", "bible-books", "--books", "Hezekiah", "--out", str(tmp / "r")]),
        ("unknown target module", train + data + ["--targets", "qkv", "--out", str(tmp / "r")]),
        ("tau < 0", train + data + ["--tau", "-1", "--out", str(tmp / "r")]),
        ("learned tau with MAP", train + data + ["--tau", "learn", "--out", str(tmp / "r")]),
        ("rank < 1", train + data + ["--rank", "0", "--out", str(tmp / "r")]),
        ("max_tokens too small for the prompt", train + data + ["--task-prompt", "speaker {task} says: ",
                                                                "--max-tokens", "8", "--out", str(tmp / "r")]),
        ("existing non-empty run folder", train + data + ["--out", str(tmp / "exists")]),
        ("not a run folder", ["evaluate", str(tmp)]),
        ("run folder from an incompatible version", ["evaluate", str(old)]),
        ("unknown task at generation", ["generate", str(tmp / "ok"), "--task", "zz", "--prompt", "hi"]),
        ("resume without a checkpoint", ["train", "--resume", str(tmp / "nothing")]),
        ("PEFT adapter to start from is DoRA", train + data + ["--init-peft", str(tmp / "dora"), "--out", str(tmp / "r")]),
        ("PEFT adapter folder missing", train + data + ["--init-peft", str(tmp / "nowhere"), "--out", str(tmp / "r")]),
        ("--distributed without torchrun", train + data + ["--distributed", "--out", str(tmp / "r")]),
        ("--global-prior malformed", train + data + ["--global-prior", "normal:-1", "--out", str(tmp / "r")]),
    ]
    print("| bad input | exit code | what the user sees |")
    print("|---|---|---|")
    for what, args in cases:
        code, message = run(args)
        shown = message if len(message) <= 260 else message[:257] + "..."
        print(f"| {what} | {code} | `{shown}` |")


if __name__ == "__main__":
    main_table()

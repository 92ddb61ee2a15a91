"""Corpora at their edges: empty tasks, huge documents (bounded tokenisation), task prompts, per-task
split digests, and malformed CSV / JSON-lines files (one clear line each)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import bora_pyro
from bora_pyro.cli import main
from bora_pyro.data import IGNORE_INDEX
from bora_pyro.data.input_format import InputFormat
from bora_pyro.data.tabular import read_table
from bora_pyro.data.tokenize import tokenize_split

from .conftest import synthetic_rows, train_args


class CountingTokenizer:
    """A tokenizer that counts the characters it is given (and otherwise is the wrapped one)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.characters = 0

    def __call__(self, text: str, **kwargs):
        self.characters += len(text)
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


def old_tokenize(tokenizer, docs, max_tokens, prompt, long_documents):
    """The tokenisation before bounded prefixes: the whole text, then chunks (kept all, or the first)."""
    out = []
    for task, text in docs:
        context = [tokenizer.bos_token_id] + tokenizer(prompt.format(task=task), add_special_tokens=False)["input_ids"]
        body = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        room = max_tokens - len(context)
        pieces = [body[start : start + room] for start in range(0, max(len(body), 1), room)]
        for piece in pieces[:1] if long_documents == "truncate" else pieces:
            out.append((tuple(context + piece), tuple([IGNORE_INDEX] * len(context) + piece)))
    return out


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# --- tasks whose texts are all empty -----------------------------------------------------------------------


def test_a_task_whose_texts_are_all_empty_is_named(tmp_path, tiny_lm):
    rows = synthetic_rows({"a": 5, "b": 3})
    rows.loc[rows.task == "b", "text"] = ["", "  ", None]
    path = tmp_path / "c.jsonl"
    rows.to_json(path, orient="records", lines=True)
    with pytest.raises(
        ValueError,
        match=r"task\(s\) \['b'\] have no text: every 'text' value of theirs is empty or "
        r"whitespace-only \(line 6, 7, 8\); give them text or remove their rows",
    ) as err:
        bora_pyro.load_corpus(f"jsonl:{path}", tiny_lm[1])
    assert "\n" not in str(err.value) and "--text-column" not in str(err.value)


def test_every_text_empty_hints_at_the_text_column(tmp_path, tiny_lm):
    path = tmp_path / "c.csv"
    path.write_text("task,text,body\na,,x\na, ,y\nb,,z\n")
    with pytest.raises(
        ValueError,
        match=r"\['a', 'b'\] have no text.*\(line 2, 3, 4\) \(every 'text' value is "
        r"empty: is --text-column right\?\)",
    ):
        bora_pyro.load_corpus(f"csv:{path}", tiny_lm[1])


def test_dropped_empty_texts_are_said_in_one_line_with_rows_and_tasks(tmp_path, tiny_lm, caplog):
    rows = synthetic_rows({"a": 5, "b": 4})
    rows.loc[[1, 6], "text"] = ["\t", ""]
    path = tmp_path / "c.csv"
    rows.to_csv(path, index=False)
    with caplog.at_level("WARNING"):
        corpus = bora_pyro.load_corpus(f"csv:{path}", tiny_lm[1])
    [line] = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert "dropped 2 empty or whitespace-only text(s) (line 3, 8) of task(s) ['a', 'b']" in line
    assert corpus.tasks == ("a", "b") and "\n" not in line


def test_a_corpus_without_tasks_is_a_value_error(tiny_lm):
    with pytest.raises(ValueError, match="bible-chapters: no task has documents"):
        bora_pyro.load_corpus("bible-chapters", tiny_lm[1], books=("Obadiah",), max_tokens=5000)


# --- bounded tokenisation ----------------------------------------------------------------------------------

NORMAL = [(0, "short"), (0, "the lord seide to his puple " * 3), (1, "and thei wenten forth " * 9), (1, "x" * 200)]


@pytest.mark.parametrize("long_documents", ["split", "truncate"])
def test_tokenisation_equals_the_whole_text_tokenised(tiny_lm, long_documents):
    tokenizer = tiny_lm[1]
    split = tokenize_split("t", ("a", "b"), NORMAL, tokenizer, 24, InputFormat(task_prompt="{task}: "), long_documents)
    expected = old_tokenize(tokenizer, [(("a", "b")[t], text) for t, text in NORMAL], 24, "{task}: ", long_documents)
    assert list(zip(split.input_ids, split.labels)) == expected
    assert split.long_docs == 3 and split.source_docs == 4 and split.capped_docs == 0


def test_a_huge_document_is_tokenised_only_as_far_as_it_is_used(tiny_lm):
    huge = "in the bigynnyng god made of nouyt heuene and erthe " * 60_000  # 3 MB on one line
    counting = CountingTokenizer(tiny_lm[1])
    cut = tokenize_split("t", ("a",), [(0, huge)], counting, 32, InputFormat(task_prompt="{task}: "), "truncate")
    assert counting.characters < 2_000 and len(cut) == 1 and cut.long_docs == 1
    assert list(zip(cut.input_ids, cut.labels)) == old_tokenize(
        tiny_lm[1], [("a", huge[:100])], 32, "{task}: ", "truncate"
    )
    counting.characters = 0
    capped = tokenize_split(
        "t", ("a",), [(0, huge), (0, "more")], counting, 32, InputFormat(task_prompt="{task}: "), "split", 5
    )
    assert counting.characters < 5_000 and len(capped) == 5
    assert (capped.source_docs, capped.long_docs, capped.capped_docs) == (1, 1, 1)
    full = old_tokenize(tiny_lm[1], [("a", huge[:1000])], 32, "{task}: ", "split")
    assert list(zip(capped.input_ids, capped.labels)) == full[:5]


def test_the_chunk_cap_keeps_every_chunk_it_allows_and_counts_per_task(tiny_lm):
    tokenizer = tiny_lm[1]
    docs = [(0, "a" * 30), (0, "b" * 30), (1, "c" * 10)]  # 30 + EOS over chunks of 8: 4 chunks each
    split = tokenize_split("t", ("x", "y"), docs, tokenizer, 10, InputFormat(task_prompt="{task}"), "split", 6)
    expected = old_tokenize(tokenizer, [("x", "a" * 30), ("x", "b" * 30), ("y", "c" * 10)], 10, "{task}", "split")
    assert list(zip(split.input_ids, split.labels)) == expected[:6] + expected[8:]
    assert split.docs_per_task().tolist() == [6, 2] and split.capped_docs == 1 and split.source_docs == 3


def test_max_eval_docs_caps_held_out_chunks_and_says_so(tmp_path, tiny_lm, caplog):
    rows = pd.DataFrame({"task": ["a"] * 12, "text": ["word " * 400] * 12})
    path = tmp_path / "c.csv"
    rows.to_csv(path, index=False)
    with caplog.at_level("WARNING"):
        corpus = bora_pyro.load_corpus(f"csv:{path}", tiny_lm[1], max_tokens=32, max_eval_docs=3)
    assert len(corpus.valid) == len(corpus.test) == 3
    assert corpus.documents()["test"] == {
        "used": 1,
        "available": 1,
        "long": 1,
        "capped": 1,
        "prompt_cut": 0,
        "chunks": 3,
    }
    assert len(corpus.train) == 10 * 65  # train keeps every chunk: 1999 bytes (stripped) + EOS over chunks of 31
    assert "valid and test keep at most 3 chunks per task (--max-eval-docs), so 2 of their documents" in caplog.text
    uncapped = bora_pyro.load_corpus(f"csv:{path}", tiny_lm[1], max_tokens=32, max_eval_docs=None)
    assert len(uncapped.test) == 65 and uncapped.train.input_ids == corpus.train.input_ids


# --- task prompts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("{task}{0}", r"task_prompt '\{task\}\{0\}' holds the field '\{0\}'; the only field allowed is \{task\}"),
        ("{}: {task}", r"holds the field '\{\}'"),
        ("{task.upper}", r"holds the field '\{task.upper\}'"),
        ("{task[0]}", r"holds the field '\{task\[0\]\}'"),
        ("{task!r}", r"holds the field '\{task!r\}'"),
        ("{task:>99999999}", r"holds the field '\{task:>99999999\}'"),
        ("{task:{0}}", r"holds the field '\{task:\{0\}\}'"),
        ("{task", r"task_prompt '\{task' is not a valid format string \(expected '\}' before end of string\)"),
        ("{task} }", r"is not a valid format string \(Single '\}' encountered"),
        ("{{task}}", r"task_prompt must contain '\{task\}', got '\{\{task\}\}'"),
    ],
)
def test_task_prompts_with_other_fields_are_refused(prompt, message):
    with pytest.raises(ValueError, match=message):
        bora_pyro.CorpusConfig(task_prompt=prompt)


def test_a_bad_task_prompt_is_one_line_on_the_command_line(tmp_path, capsys):
    data = tmp_path / "c.csv"
    synthetic_rows({"a": 4, "b": 4}).to_csv(data, index=False)
    assert main(train_args(data, tmp_path / "run", "--task-prompt", "{task}{0}")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "bora-pyro train: error: task_prompt '{task}{0}' holds the field '{0}'; the only field allowed is {task} "
        "(write a literal brace as {{ or }})"
    )
    assert not (tmp_path / "run").exists()


def test_literal_braces_in_a_task_prompt_are_kept(make_corpus, tiny_lm):
    corpus = make_corpus({"a": 4, "b": 4}, task_prompt="{{{task}}} {task}: ")
    prompt = tiny_lm[1](f"{{{corpus.tasks[0]}}} {corpus.tasks[0]}: ", add_special_tokens=False)["input_ids"]
    assert corpus.train.input_ids[0][1 : 1 + len(prompt)] == tuple(prompt)


# --- per-task digests of each split ------------------------------------------------------------------------


def test_split_digests_name_the_tasks_and_splits_that_changed(tmp_path, tiny_lm):
    rows = synthetic_rows({"a": 6, "b": 6, "c": 6})
    path = tmp_path / "c.csv"
    rows.to_csv(path, index=False)
    before = bora_pyro.load_corpus(f"csv:{path}", tiny_lm[1]).split_digests()
    assert set(before) == {"train", "valid", "test"} and all(set(d) == {"a", "b", "c"} for d in before.values())
    assert all(len(h) == 64 and int(h, 16) >= 0 for d in before.values() for h in d.values())
    assert bora_pyro.load_corpus(f"csv:{path}", tiny_lm[1]).split_digests() == before
    rows.loc[rows.task == "b", "text"] = rows.loc[rows.task == "b", "text"] + " changed"
    rows.to_csv(path, index=False)
    after = bora_pyro.load_corpus(f"csv:{path}", tiny_lm[1]).split_digests()
    changed = {(s, t) for s in before for t in before[s] if before[s][t] != after[s][t]}
    assert changed == {("train", "b"), ("valid", "b"), ("test", "b")}


# --- malformed files: one clear line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, message",
    [
        (
            '{"task": "a", "text": "\\ud800x"}',
            r"line 2: the 'text' value holds '\\ud800', an unpaired UTF-16 surrogate",
        ),
        ('{"task": "\\udfff", "text": "x"}', r"line 2: the 'task' value holds '\\udfff'"),
        (
            '{"task": "a", "text": ' + "[" * 100_000 + "]" * 100_000 + "}",
            r"line 2 nests JSON arrays or objects too deeply",
        ),
        ('{"task": "a", "text": "x", "task": "b"}', r"line 2 gives the key\(s\) \['task'\] more than once"),
    ],
)
def test_bad_jsonl_values_are_named(tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"task": "a", "text": "x"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        read_table("jsonl", str(path), ("task", "text"))
    assert "\n" not in str(err.value)


def test_jsonl_keeps_only_the_wanted_columns_and_names_the_others(tmp_path, tiny_lm):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"task": "a", "text": f"t {i}", f"key{i}": i} for i in range(3000)])
    frame = read_table("jsonl", str(path), ("task", "text"))
    assert list(frame.columns) == ["task", "text"] and len(frame.attrs["columns"]) == 3002
    with pytest.raises(
        ValueError,
        match=r"missing column\(s\) \['body'\]; columns present: \['task', 'text', 'key0'"
        r".*\(3002 in all\)\] \(choose them with",
    ) as err:
        bora_pyro.load_corpus(f"jsonl:{path}", tiny_lm[1], text_column="body")
    assert len(str(err.value)) < 1000
    write_jsonl(path, [{"task": "a", "text": "x", "meta": 1, "meta2": 2}])
    path.write_text(path.read_text() + '{"task": "a", "text": "y", "meta": 1, "meta": 3}\n' * 3)
    assert bora_pyro.load_corpus(f"jsonl:{path}", tiny_lm[1]).tasks == ("a",)  # an unwanted key may repeat


def test_csv_blank_lines_before_the_header_are_skipped(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("\n\ntask,text\na,x\n")
    frame = read_table("csv", str(path))
    assert frame.to_dict("list") == {"task": ["a"], "text": ["x"]} and frame.index.tolist() == [4]


def test_messages_about_many_or_long_names_stay_short(tmp_path, tiny_lm):
    path = tmp_path / "c.csv"
    path.write_text("task,text\n" + "".join(f"{'t' * 500}{i},\n" for i in range(500)))
    with pytest.raises(ValueError, match=r"\.\.\. \(500 in all\)\] have no text") as err:
        bora_pyro.load_corpus(f"csv:{path}", tiny_lm[1])
    assert len(str(err.value)) < 2000
    path.write_text(",".join(f"c{i}" * 100 for i in range(2000)) + "\n" + "x\n")
    with pytest.raises(ValueError, match=r"line 2 has 1 field\(s\) but the header has 2000") as err:
        read_table("csv", str(path))
    assert len(str(err.value)) < 2000


@pytest.mark.parametrize("content", [b"", b'rep_name,text\n"a,b', b"\xff\xfe\x00rep_name"])
def test_an_unreadable_talk_of_norway_file_is_one_line(tmp_path, tiny_lm, content):
    path = tmp_path / "ton.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"ton.csv: not a readable Talk of Norway CSV file \(UTF-8, comma-separated\)"):
        bora_pyro.load_corpus(f"ton:{path}", tiny_lm[1])

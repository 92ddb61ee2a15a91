"""Corpora: loading, per-task splitting, tokenisation masks, batching, and bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import bora_pyro
from bora_pyro.data import IGNORE_INDEX
from bora_pyro.data.bible import pack_verses
from bora_pyro.data.input_format import InputFormat
from bora_pyro.data.tabular import documents_by_task, read_table

from .conftest import synthetic_rows


def test_split_is_stratified_seeded_and_disjoint(make_corpus):
    corpus = make_corpus({"a": 20, "b": 7, "c": 3})
    assert corpus.tasks == ("a", "b", "c")
    for split in (corpus.train, corpus.valid, corpus.test):
        assert (split.docs_per_task() >= 1).all()  # every task in every split
    assert corpus.train.docs_per_task().tolist() == [16, 5, 1]
    again = make_corpus({"a": 20, "b": 7, "c": 3})
    assert again.test.input_ids == corpus.test.input_ids  # same seed, same split
    seen = [set(s.input_ids) for s in (corpus.train, corpus.valid, corpus.test)]
    assert not (seen[0] & seen[2]) and not (seen[0] & seen[1])
    other = make_corpus({"a": 20, "b": 7, "c": 3}, seed=1)
    assert other.test.input_ids != corpus.test.input_ids


def test_caps_apply_per_task_after_the_split(make_corpus):
    corpus = make_corpus({"a": 40, "b": 6}, max_train_docs=5, max_eval_docs=2)
    assert corpus.train.docs_per_task().tolist() == [5, 4]
    assert corpus.test.docs_per_task().tolist() == [2, 1]


def test_prompt_and_padding_are_not_scored(tiny_lm):
    tokenizer = tiny_lm[1]
    frame = pd.DataFrame({"task": ["x", "x", "x"], "text": ["abc", "de", "fghij"]})
    split = bora_pyro.data.tokenize.tokenize_split(
        "train",
        ("x",),
        [(0, t) for t in frame.text],
        tokenizer,
        max_tokens=32,
        input_format=InputFormat(task_prompt="{task}: "),
    )
    ids, labels = split.input_ids[0], split.labels[0]
    # <bos> x : space are context; a b c <eos> are scored
    assert labels[:4] == (IGNORE_INDEX,) * 4
    assert tokenizer.decode(ids[4:7]) == "abc" and ids[-1] == tokenizer.eos_token_id
    assert split.tokens_per_task().tolist() == [4 + 3 + 6]  # each text plus its EOS
    batch = split.collate([1, 2])
    assert batch.input_ids.shape == (2, 4 + 6)
    assert (batch.labels[0, 4 + 3 :] == IGNORE_INDEX).all() and (batch.attention_mask[0, 4 + 3 :] == 0).all()


def test_long_documents_are_split_into_chunks_that_keep_every_token(tiny_lm):
    tokenizer = tiny_lm[1]
    text = "".join(chr(ord("a") + i % 26) for i in range(45))
    split = bora_pyro.data.tokenize.tokenize_split(
        "t",
        ("x", "y"),
        [(1, text), (0, "short")],
        tokenizer,
        max_tokens=10,
        input_format=InputFormat(task_prompt="{task}:"),
    )
    context = 1 + 2  # <bos> y :
    assert len(split) == 1 + 7 and split.source_docs == 2 and split.long_docs == 1  # 45 + EOS over 7 chunks of 7
    assert all(len(ids) <= 10 for ids in split.input_ids)
    assert split.task_index == (1,) * 7 + (0,)
    chunks = split.input_ids[:7]
    assert all(ids[:context] == chunks[0][:context] for ids in chunks)  # every chunk starts with the context
    body = [t for ids in chunks for t in ids[context:]]
    assert tokenizer.decode(body[:-1]) == text and body[-1] == tokenizer.eos_token_id
    assert all(tokenizer.eos_token_id not in ids for ids in chunks[:-1])
    assert all(labels[:context] == (IGNORE_INDEX,) * context for labels in split.labels[:7])


def test_truncation_keeps_max_tokens_when_asked(tiny_lm):
    split = bora_pyro.data.tokenize.tokenize_split(
        "t", ("x",), [(0, "a" * 100)], tiny_lm[1], max_tokens=10, long_documents="truncate"
    )
    assert len(split) == 1 and split.long_docs == 1
    assert len(split.input_ids[0]) == 10 and split.input_ids[0][-1] != tiny_lm[1].eos_token_id


def test_the_corpus_says_how_many_documents_were_split_or_cut(make_corpus, caplog):
    corpus = make_corpus({"a": 12, "b": 8}, max_tokens=20)  # 12 words of ~5 bytes: every text is longer
    assert corpus.train.long_docs == corpus.train.source_docs == 16
    assert len(corpus.train) > 16
    assert "documents are longer than max_tokens=20 tokens: split into" in caplog.text
    caplog.clear()
    cut = make_corpus({"a": 12, "b": 8}, max_tokens=20, long_documents="truncate")
    assert len(cut.train) == 16 and "cut at 20 tokens" in caplog.text


def test_prompt_longer_than_max_tokens_is_an_error(tiny_lm):
    with pytest.raises(ValueError, match="max_tokens=6 is too small"):
        bora_pyro.data.tokenize.tokenize_split(
            "t",
            ("a long task name",),
            [(0, "text")],
            tiny_lm[1],
            max_tokens=6,
            input_format=InputFormat(task_prompt="{task}: "),
        )


def test_batches_mix_tasks_and_cover_every_document(make_corpus):
    corpus = make_corpus({"a": 30, "b": 30, "c": 30})
    stream = (corpus.train.collate(c) for c in corpus.train.train_batch_indices(batch_size=8, seed=3))
    first = [next(stream) for _ in range(9)]  # 72 docs = one epoch of 72
    indices = np.concatenate([b.doc_index.numpy() for b in first])
    assert sorted(indices.tolist()) == list(range(len(corpus.train)))
    assert len(set(first[0].task_index.tolist())) > 1  # batches mix tasks
    again = (corpus.train.collate(c) for c in corpus.train.train_batch_indices(batch_size=8, seed=3))
    assert all((next(again).doc_index == b.doc_index).all() for b in first)
    evaluated = np.concatenate([b.doc_index.numpy() for b in corpus.test.eval_batches(4)])
    assert sorted(evaluated.tolist()) == list(range(len(corpus.test)))


def test_pack_verses_respects_the_token_budget(tiny_lm):
    verses = ["In the bigynnyng God made of nouyt heuene and erthe."] * 5
    docs = pack_verses(verses, tiny_lm[1], max_tokens=120)
    assert len(docs) == 5 // 2 + 1
    assert all(len(tiny_lm[1](" " + d)["input_ids"]) <= 120 for d in docs)


def test_bible_books_default_corpus(tiny_lm):
    corpus = bora_pyro.load_corpus("bible-books", tiny_lm[1], max_tokens=200, books=("Jonah", "Obadiah", "Ruth"))
    assert corpus.tasks == ("Jonah", "Obadiah", "Ruth")
    tokens = corpus.train.tokens_per_task()
    assert tokens[1] < tokens[0] < tokens[2]  # Obadiah < Jonah < Ruth
    text = tiny_lm[1].decode(corpus.train.input_ids[0][1:40])
    assert not text.lstrip()[0].isdigit()  # verse numbers are stripped


def test_unknown_book_lists_the_books(tiny_lm):
    with pytest.raises(ValueError, match=r"unknown book\(s\) \['Hezekiah'\].*Genesis"):
        bora_pyro.load_corpus("bible-books", tiny_lm[1], books=("Hezekiah",))


def test_unknown_corpus_names_the_forms(tiny_lm):
    with pytest.raises(ValueError, match="unknown corpus 'wikipedia'.*csv:PATH"):
        bora_pyro.load_corpus("wikipedia", tiny_lm[1])


def test_missing_columns_are_named(tmp_path, tiny_lm):
    path = tmp_path / "c.csv"
    pd.DataFrame({"speaker": ["a"], "text": ["hi"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['task'\]; columns present: \['speaker', 'text'\]"):
        bora_pyro.load_corpus(f"csv:{path}", tiny_lm[1])
    corpus_rows = synthetic_rows({"a": 3}).rename(columns={"task": "speaker"})
    corpus_rows.to_csv(path, index=False)
    assert bora_pyro.load_corpus(f"csv:{path}", tiny_lm[1], task_column="speaker").tasks == ("a",)


def test_empty_texts_are_dropped_with_a_count(tmp_path, tiny_lm, caplog):
    rows = synthetic_rows({"a": 5, "b": 3})
    rows.loc[0, "text"] = "   "
    rows.loc[1, "text"] = None
    path = tmp_path / "c.jsonl"
    rows.to_json(path, orient="records", lines=True)
    with caplog.at_level("WARNING"):
        corpus = bora_pyro.load_corpus(f"jsonl:{path}", tiny_lm[1])
    assert "dropped 2 empty or whitespace-only text(s)" in caplog.text
    assert len(corpus.train) + len(corpus.valid) + len(corpus.test) == 6


def read_docs(kind: str, path) -> dict[str, list[str]]:
    return documents_by_task(read_table(kind, str(path)), "task", "text", f"{kind}:{path}").docs


def test_csv_cells_are_read_as_the_text_they_are(tmp_path, tiny_lm):
    path = tmp_path / "c.csv"
    path.write_text("task,text\nNA,NA\nNone,null\nnull,0012\n001,NaN\nNA,1.0\n001,TRUE\n\n001,\n")
    assert read_docs("csv", path) == {"NA": ["NA", "1.0"], "None": ["null"], "null": ["0012"], "001": ["NaN", "TRUE"]}
    rows = "".join(f"{task},NA {i}\n" for task in ("NA", "None", "null", "001") for i in range(4))
    path.write_text("task,text\n" + rows)
    assert bora_pyro.load_corpus(f"csv:{path}", tiny_lm[1]).tasks == ("NA", "None", "null", "001")


def test_jsonl_strings_stay_verbatim_and_numbers_keep_their_json_text(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"task": "null", "text": "null"}\n{"task": "001", "text": "0012"}\n\n'
        '{"task": 7, "text": 1.50}\n{"task": true, "text": "NA"}\n{"task": "001", "text": null}\n'
        '{"task": "001", "meta": {"n": 1}}\n'
    )
    assert read_docs("jsonl", path) == {"null": ["null"], "001": ["0012"], "7": ["1.50"], "true": ["NA"]}


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"task": null, "text": "x"}', r"1 row\(s\) have an empty or missing 'task' value \(line 3\)"),
        ('{"text": "x"}', r"1 row\(s\) have an empty or missing 'task' value \(line 3\)"),
        ('{"task": "a", "text": "x"', r"c.jsonl: line 3 is not valid JSON \(Expecting ',' delimiter"),
        ('["a", "x"]', r"c.jsonl: line 3 is a JSON list, not an object"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"task": "a", "text": "x"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_docs("jsonl", path)


def test_csv_row_with_the_wrong_number_of_fields_is_named(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('task,text\na,"two\nlines"\nb,x,y\n')
    with pytest.raises(ValueError, match=r"c.csv: line 4 has 3 field\(s\) but the header has 2"):
        read_docs("csv", path)


@pytest.mark.parametrize(
    "kind, content",
    [
        ("csv", "task,text\na,café\n"),
        ("jsonl", '{"task": "a", "text": "café"}\n'),
    ],
)
def test_non_utf8_files_are_refused_with_the_offset_and_a_fix(tmp_path, kind, content):
    path = tmp_path / f"c.{kind}"
    data = content.encode("latin1")
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    line = data[:offset].count(b"\n") + 1
    message = rf"c.{kind}: not a UTF-8 file: byte 0xe9 at byte offset {offset} \(line {line}\)"
    with pytest.raises(ValueError, match=message) as err:
        read_docs(kind, path)
    assert f"iconv -f latin1 -t utf-8 {path} > {path}.utf8" in str(err.value)


@pytest.mark.parametrize(
    "kind, content",
    [
        ("csv", "task,text\nå,æøå\n"),
        ("jsonl", '{"task": "å", "text": "æøå"}\n'),
    ],
)
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, kind, content):
    path = tmp_path / f"c.{kind}"
    path.write_bytes(b"\xef\xbb\xbf" + content.encode("utf-8"))
    assert read_docs(kind, path) == {"å": ["æøå"]}


@pytest.mark.parametrize("kind", ["csv", "jsonl", "datasets"])
def test_a_task_named_global_is_refused(tmp_path, tiny_lm, kind):
    rows = synthetic_rows({"a": 5, "global": 5})
    path = tmp_path / f"c.{kind}"
    if kind == "csv":
        rows.to_csv(path, index=False)
    elif kind == "jsonl":
        rows.to_json(path, orient="records", lines=True)
    else:
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_pandas(rows).save_to_disk(str(path))
    with pytest.raises(
        ValueError,
        match=rf"{kind}:.*: a task is named 'global', a name reserved for Theta \(the "
        r"shared adapter\).*rename the task in the data",
    ):
        bora_pyro.load_corpus(f"{kind}:{path}", tiny_lm[1])


def test_dataset_loading_scripts_are_never_run(tmp_path, tiny_lm, monkeypatch):
    datasets = pytest.importorskip("datasets")
    marker = tmp_path / "ran"
    script = f"from pathlib import Path\nPath({str(marker)!r}).write_text('code from the data source ran')\n"
    scripted = tmp_path / "scripted"
    scripted.mkdir()
    (scripted / "scripted.py").write_text(script)  # what datasets would run as the loading script
    synthetic_rows({"a": 6, "b": 6}).to_csv(scripted / "data.csv", index=False)
    with pytest.raises(ValueError, match=r"scripted.py' is a dataset loading script, and bora_pyro never runs code"):
        bora_pyro.load_corpus(f"datasets:{scripted}", tiny_lm[1])
    with pytest.raises(ValueError, match="is a dataset loading script"):
        bora_pyro.load_corpus(f"datasets:{scripted / 'scripted.py'}", tiny_lm[1])
    (scripted / "scripted.py").rename(scripted / "other.py")  # not a loading script: only the data files load
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    assert bora_pyro.load_corpus(f"datasets:{scripted}", tiny_lm[1]).tasks == ("a", "b")
    assert not marker.exists()


def test_missing_file_is_named(tiny_lm):
    with pytest.raises(FileNotFoundError, match="csv corpus file not found: 'nope.csv'"):
        bora_pyro.load_corpus("csv:nope.csv", tiny_lm[1])


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("max_tokens", 2, "max_tokens must be >= 4"),
        ("valid_fraction", 0.7, "valid_fraction must be in"),
        ("max_train_docs", 0, "max_train_docs must be >= 1"),
        ("task_prompt", "no placeholder", "task_prompt must contain"),
    ],
)
def test_bad_corpus_options(make_corpus, option, value, message):
    with pytest.raises(ValueError, match=message):
        make_corpus(**{option: value})


def test_bible_chapters_are_tasks_per_translation(tiny_lm):
    corpus = bora_pyro.load_corpus(
        "bible-chapters", tiny_lm[1], books=("Ruth", "Jonah"), translations=("wyc", "kjv"), max_tokens=96
    )
    assert corpus.tasks == tuple(
        f"{t} {b} {c}" for t in ("wyc", "kjv") for b in ("Ruth", "Jonah") for c in (1, 2, 3, 4)
    )
    for split in (corpus.train, corpus.valid, corpus.test):
        assert (split.docs_per_task() >= 1).all()
    with pytest.raises(ValueError, match=r"unknown book\(s\) \['Hezekiah'\]"):
        bora_pyro.load_corpus("bible-chapters", tiny_lm[1], books=("Hezekiah",))

"""Property test: any CSV or JSON-lines corpus file, however malformed, loads or is refused in one clear line.

``hypothesis`` writes corpus files from good rows damaged in every way a careless or hostile user could
(headers, keys, quoting, cell types, encodings, bytes) and :func:`bora_pyro.load_corpus` must return a
:class:`~bora_pyro.Corpus` or raise ``ValueError`` / ``FileNotFoundError`` whose message is one short line
naming the file. The default budget is small (the fast suite); ``BORA_PYRO_FUZZ_EXAMPLES=N`` runs N examples
per test, and ``experiments/fuzz_inputs.py`` runs the same strategies end to end through the CLI.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bora_pyro
from bora_pyro.io.base_models import tiny_random_llama

settings.register_profile(
    "bora-pyro-data-fuzz",
    max_examples=int(os.environ.get("BORA_PYRO_FUZZ_EXAMPLES", "100")),
    deadline=None,
    database=None,  # nothing written in the working tree; a failure prints the example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("bora-pyro-data-fuzz")
MESSAGE_LIMIT = 3000  # characters of one error line

WORDS = "the lord seide to his puple and thei wenten forth in to the lond".split()
ODD_NAMES = [
    "", " ", "\t", " a", "a ", "NaN", "nan", "null", "None", "NA", "1", "001", "1.0", "-0", "true", "global",
    "tasks.json", "README.md", "../up", "a/b", ".", "..", "~", "$HOME", "é", "日本", "a\nb", "a\r\nb", "\x00",
    "a,b", 'q"q', "{task}", "%s", "x" * 300,
]  # fmt: skip
ODD_TEXTS = ["", " ", "\n", "\t\t", "NA", "null", "0", "\x00", "\u200b", "\ufeff", "é" * 50, "a\r\nb", '"', "\\"]
INVALID_UTF8 = [b"\xff", b"\xfe", b"\xc3", b"\xe9", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\x80"]
JSON_LINES = [
    "[1, 2]", '"a string"', "42", "null", "true", "{", '{"task": "a", "text": ', "{'task': 'a'}", "NaN",
    '{"task": "a", "text": "\\ud800"}', '{"task": "\\udc00x", "text": "t"}', '{"task": "a", "text": "x", "task": "b"}',
    '{"task": NaN, "text": Infinity}', '{"task": 1e999, "text": -0}', '{"task": 12345678901234567890123, "text": 1}',
    '{"task": "a", "text": ' + "[" * 5000 + "]" * 5000 + "}", "// comment", "\x00", '{"": ""}', "{}",
]  # fmt: skip
WELL_FORMED = "well-formed"


def words() -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)


def names() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(["a", "b", "c", "speaker 1"]), st.sampled_from(ODD_NAMES), st.text(max_size=8))


def texts() -> st.SearchStrategy[str]:
    return st.one_of(words(), st.sampled_from(ODD_TEXTS), st.text(max_size=30))


def json_values() -> st.SearchStrategy[object]:
    """A JSON cell: a string usually, else a number, boolean, null, array or object."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=6))
    return st.one_of(
        texts(),
        names(),
        scalars,
        st.lists(scalars, max_size=3),
        st.dictionaries(st.text(max_size=3), scalars, max_size=2),
    )


@st.composite
def rows(draw) -> list[tuple[str, str]]:
    """Rows (task, text): a few good tasks of three or more documents, then odd rows, in a shuffled order."""
    good = [
        (task, text)
        for task in draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True))
        for text in draw(st.lists(words(), min_size=3, max_size=6))
    ]
    odd = draw(st.lists(st.tuples(names(), texts()), max_size=draw(st.sampled_from([0, 2, 6]))))
    return draw(st.permutations(good + odd))


@st.composite
def header(draw) -> list[str]:
    """Column names: usually task and text (maybe with extras), else one missing, repeated, renamed or odd."""
    good = [["task", "text"]] * 8 + [["text", "task"], ["task", "text", "meta"]]
    odd = [["task"], ["text"], ["task", "task"], ["task", "text", "text"], ["Task", "Text"], [" task", "text "],
           ["", ""], ["speaker", "body"]]  # fmt: skip
    return draw(st.sampled_from(good + odd)) + draw(st.lists(names(), max_size=draw(st.sampled_from([0, 0, 2]))))


def _csv_text(columns: list[str], table: list[tuple[str, str]], draw) -> str:
    """The rows as CSV: quoted properly, or joined naively (breaking quoting), with a drawn line ending."""
    end = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    cells = [[task if c.strip().lower() == "task" else text for c in columns] for task, text in table]
    if draw(st.booleans()):
        out = io.StringIO()
        csv.writer(out, lineterminator=end).writerows([columns, *cells])
        return out.getvalue()
    return end.join(",".join(row) for row in [columns, *cells]) + end


def _jsonl_text(columns: list[str], table: list[tuple[str, str]], draw) -> str:
    """The rows as JSON lines, with odd values and maybe an odd line mixed in."""
    lines = []
    for task, text in table:
        record = {c: task if c.strip().lower() == "task" else text for c in columns}
        if draw(st.integers(0, 29)) == 0:
            record[draw(st.sampled_from(columns))] = draw(json_values())
        lines.append(json.dumps(record, ensure_ascii=draw(st.booleans())))
    if draw(st.integers(0, 3)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from([*JSON_LINES, "", "   "])))
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\r\n"]))


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """``data`` with up to three byte-level changes: invalid UTF-8, NUL, garbage, a cut, a deletion."""
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        change = draw(st.sampled_from(["invalid", "nul", "garbage", "cut", "delete"]))
        if change == "invalid":
            data = data[:at] + draw(st.sampled_from(INVALID_UTF8)) + data[at:]
        elif change == "nul":
            data = data[:at] + b"\x00" + data[at:]
        elif change == "garbage":
            data = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
        elif change == "cut":
            data = data[:at]
        else:
            data = data[:at] + data[at + draw(st.integers(1, 8)) :]
    return data


@st.composite
def corpus_files(draw) -> tuple[str, bytes]:
    """A corpus file ("csv" or "jsonl", its bytes): rows rendered, then maybe damaged, or a special file."""
    kind = draw(st.sampled_from(["csv", "jsonl"]))
    special = draw(st.sampled_from([WELL_FORMED] * 6 + ["empty", "bom", "blank", "binary", "huge field"]))
    if special == "empty":
        return kind, b""
    if special == "bom":
        return kind, b"\xef\xbb\xbf"
    if special == "blank":
        return kind, draw(st.sampled_from([b"\n", b"\n\n\n", b"   \r\n", b"\t"]))
    if special == "binary":
        return kind, draw(st.binary(max_size=200))
    table = draw(rows())
    if special == "huge field":
        table.append(("a", "word " * draw(st.sampled_from([10_000, 60_000]))))
    columns = draw(header())
    text = (_csv_text if kind == "csv" else _jsonl_text)(columns, table, draw)
    data = (b"\xef\xbb\xbf" if draw(st.integers(0, 5)) == 0 else b"") + text.encode()
    return kind, draw(damaged(data)) if draw(st.integers(0, 3)) == 0 else data


@st.composite
def corpus_options(draw) -> dict:
    """Corpus options that change how a file is cut: the token budget, long documents, the held-out caps."""
    return {
        "max_tokens": draw(st.sampled_from([4, 8, 64])),
        "long_documents": draw(st.sampled_from(["split", "truncate"])),
        "max_eval_docs": draw(st.sampled_from([None, 1, 8])),
    }


@functools.cache
def tokenizer():
    return tiny_random_llama()[1]


def check_outcome(path: Path, load) -> str:
    """Run ``load()``: it must return a Corpus or raise ValueError / FileNotFoundError (themselves, not a
    subclass such as UnicodeEncodeError that escaped from below) with one short line that names ``path``.
    Returns the outcome's name ("corpus", "ValueError"...)."""
    try:
        corpus = load()
    except (ValueError, FileNotFoundError) as err:
        return check_error(path, err)
    assert isinstance(corpus, bora_pyro.Corpus)
    assert corpus.tasks and (corpus.train.docs_per_task() > 0).all()
    return "corpus"


def check_error(path: Path, err: Exception) -> str:
    """``err`` is a ValueError / FileNotFoundError whose message is one short line naming ``path``."""
    assert type(err) in (ValueError, FileNotFoundError), f"a low-level error escaped: {err!r}"
    message = str(err)
    assert "\n" not in message and "\r" not in message, f"a message of several lines: {message!r}"
    assert len(message) < MESSAGE_LIMIT, f"a message of {len(message)} characters: {message[:300]!r}..."
    assert str(path) in message, f"the message does not name the file: {message!r}"
    return type(err).__name__


@FUZZ
@given(file=corpus_files(), options=corpus_options())
def test_any_corpus_file_loads_or_is_refused_in_one_line(file, options):
    kind, data = file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"corpus.{kind}"
        path.write_bytes(data)
        check_outcome(path, lambda: bora_pyro.load_corpus(f"{kind}:{path}", tokenizer=tokenizer(), **options))


@FUZZ
@given(kind=st.sampled_from(["csv", "jsonl"]), data=st.binary(max_size=300))
def test_arbitrary_bytes_load_or_are_refused_in_one_line(kind, data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"corpus.{kind}"
        path.write_bytes(data)
        check_outcome(path, lambda: bora_pyro.load_corpus(f"{kind}:{path}", tokenizer=tokenizer()))

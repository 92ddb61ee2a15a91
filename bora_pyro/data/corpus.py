"""Multi-task corpora: loading by name, per-task splitting and tokenisation.

Corpus specs:
    ``bible-books``           embedded default: each book of a Bible translation is a task
    ``bible-chapters``        many tasks: each (translation, chapter) pair is a task
    ``csv:PATH``, ``jsonl:PATH``  a table with a task column and a text column
    ``datasets:NAME_OR_PATH`` a Hugging Face ``datasets`` hub name or a saved dataset folder
    ``ton:PATH``              Talk of Norway (ton.csv): one task per speaker, the paper's selection
    ``bible-translate``       an instruction corpus: one task per target translation of very unequal size,
                              prompt = a verse in modern English, completion = the same verse in the task's one

A table's rows may be text, prompt-completion pairs or conversations (``formats.py``), from a file or passed
from Python (a pandas DataFrame, a list of dicts, a ``datasets.Dataset`` or ``DatasetDict``); a ``split`` column
(or a DatasetDict's splits) is used as given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import string
from dataclasses import asdict, dataclass, field

import numpy as np

from ..options import option, parse_csv, parse_optional_int, parse_optional_str
from .batching import Split
from .bible import bible_books, bible_chapters
from .bible_translate import bible_translate
from .chat import NotIncremental, read_chat_template
from .formats import COMPLETION, CONVERSATIONAL, DATA_FORMATS, MESSAGES, PROMPT
from .input_format import InputFormat
from .messages import shown_list
from .splitting import split_per_task
from .tabular import Grouped, documents_by_task, python_frame, read_table
from .talk_of_norway import TON_SELECTIONS, ton_documents
from .task_names import check_task_names
from .tokenize import LONG_DOCUMENTS, tokenize_split

log = logging.getLogger(__name__)

CORPUS_FORMS = (
    "bible-books",
    "bible-chapters",
    "bible-translate",
    "ton:PATH",
    "csv:PATH",
    "jsonl:PATH",
    "datasets:NAME_OR_PATH",
)


@dataclass(frozen=True)
class CorpusConfig:
    """How a corpus is cut into documents and split. Validated on construction; every field is a CLI option."""

    max_tokens: int = option(64, "tokens per document (BOS, task prompt, text and EOS)")
    long_documents: str = option(
        "split",
        "documents longer than --max-tokens: split into consecutive chunks (each a "
        "document of its task, in the same split), or truncate",
        choices=LONG_DOCUMENTS,
    )
    seed: int | None = option(
        None,
        "seed of the train/valid/test split (default: --seed); fix it to score several training seeds on one test set",
        flag="--split-seed",
    )
    valid_fraction: float = option(0.1, "share of each task's documents held out for validation")
    test_fraction: float = option(0.1, "share of each task's documents held out for testing")
    max_train_docs: int | None = option(
        None, "cap on training documents per task ('none' = no cap)", parse=parse_optional_int
    )
    max_eval_docs: int | None = option(
        8,
        "cap on validation and on test documents per task, counted in chunks: a document longer than "
        "--max-tokens counts each of its chunks ('none' = no cap; a CPU convenience: every run says how many "
        "were scored)",
        parse=parse_optional_int,
    )
    holdout_min_docs: int = option(
        3,
        "tasks with fewer documents keep them all for training under the random split (they have no held-out "
        "score); larger ones get at least one in each split",
    )
    task_prompt: str | None = option(
        None, "masked prompt before each document (a conversation: its first user message), e.g. '{task}: '"
    )
    task_column: str = option("task", "csv/jsonl/datasets: the task column")
    text_column: str = option("text", "csv/jsonl/datasets: the text column (text format)")
    data_format: str = option(
        "auto",
        "text (a text column), prompt-completion (prompt and completion columns: texts, or message lists), "
        "messages (a messages column: conversations in the chat template); auto detects it from the columns",
        choices=DATA_FORMATS,
    )
    completion_only_loss: bool = option(
        True,
        "loss on the completion / assistant turns only; --no-completion-only-loss scores the prompt and "
        "template tokens too (the task prompt and BOS stay context)",
    )
    chat_template: str | None = option(
        None, "Jinja chat template file for messages data (default: the tokenizer's own)", metavar="FILE"
    )
    split_column: str | None = option(
        "split",
        "column of each row's split (train, valid or validation, test), used as given where the table has it "
        "('none' = ignore it and split at random)",
        parse=parse_optional_str,
    )
    translation: str = option("wyc", "bible-books, bible-chapters: pythonbible version (wyc, kjv...)")
    translations: tuple[str, ...] | None = option(
        None,
        "bible-chapters: comma-separated versions, one task per (version, chapter) (default: --translation)",
        parse=parse_csv,
    )
    books: tuple[str, ...] | None = option(
        None, "bible-books: comma-separated titles, or 'all' (default: ten books of very unequal size)", parse=parse_csv
    )
    num_tasks: int | None = option(None, "keep the first N tasks (ton: speakers, default 25)")
    ton_selection: str = option(
        "paper",
        "ton: first speakers with > 100 speeches (paper) or 200 < n < 1000 in name order (reference)",
        choices=TON_SELECTIONS,
    )
    min_words: int = option(10, "ton: drop shorter speeches")

    def __post_init__(self) -> None:
        for name in ("books", "translations"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.max_tokens < 4:
            raise ValueError(f"max_tokens must be >= 4, got {self.max_tokens}")
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 0.5:
                raise ValueError(f"{name} must be in (0, 0.5), got {value}")
        for name in ("max_train_docs", "max_eval_docs", "num_tasks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.long_documents not in LONG_DOCUMENTS:
            raise ValueError(f"long_documents must be one of {LONG_DOCUMENTS}, got {self.long_documents!r}")
        if self.ton_selection not in TON_SELECTIONS:
            raise ValueError(f"ton_selection must be one of {TON_SELECTIONS}, got {self.ton_selection!r}")
        if self.task_prompt is not None:
            check_task_prompt(self.task_prompt)
        if not isinstance(self.holdout_min_docs, int) or self.holdout_min_docs < 3:
            raise ValueError(
                f"holdout_min_docs must be an integer >= 3 (one document for each split), got {self.holdout_min_docs!r}"
            )
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {self.data_format!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def check_task_prompt(prompt: str) -> None:
    """A task prompt is text with the field ``{task}`` (at least once) and no other field: no positional or
    other named field, attribute, index, conversion or format spec; literal braces are written ``{{`` and ``}}``."""
    allowed = "the only field allowed is {task} (write a literal brace as {{ or }})"
    if not isinstance(prompt, str):
        raise ValueError(f"task_prompt must be text with the field {{task}} (or None), got {prompt!r}")
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(prompt)
            if name is not None
        ]
    except ValueError as err:
        raise ValueError(f"task_prompt {prompt!r} is not a valid format string ({err}); {allowed}") from None
    for name, spec, conversion in fields:
        if (name, spec, conversion) != ("task", "", None):
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"task_prompt {prompt!r} holds the field {field!r}; {allowed}")
    if not fields:
        raise ValueError(f"task_prompt must contain '{{task}}', got {prompt!r}; {allowed}")


@dataclass(frozen=True)
class Corpus:
    """A tokenised multi-task corpus: task names, the three splits, the input format, and the held-out
    documents as given (``heldout["test"]``: the prompts and references ``evaluate --generate`` uses)."""

    name: str
    tasks: tuple[str, ...]
    train: Split
    valid: Split
    test: Split
    config: CorpusConfig = field(default_factory=CorpusConfig)
    input_format: InputFormat = field(default_factory=InputFormat)
    heldout: dict[str, tuple] = field(default_factory=dict)  # "valid" / "test": ((task index, document), ...)

    def split(self, name: str) -> Split:
        if name not in ("train", "valid", "test"):
            raise ValueError(f"unknown split {name!r}; expected 'train', 'valid' or 'test'")
        return getattr(self, name)

    def content_sha256(self) -> str:
        """SHA-256 of the tokenised corpus: task names and every split's token ids, labels and tasks
        (a resumed run must see the same data)."""
        digest = hashlib.sha256(json.dumps(list(self.tasks)).encode())
        for split in (self.train, self.valid, self.test):
            digest.update(split.name.encode())
            digest.update(np.asarray(split.task_index, dtype=np.int64).tobytes())
            for ids, labels in zip(split.input_ids, split.labels):
                digest.update(np.asarray(ids + labels, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def split_digests(self) -> dict[str, dict[str, str]]:
        """Per split (``"train"``, ``"valid"``, ``"test"``): task name -> SHA-256 (hex) of that task's documents
        in the split (each document's length, token ids and labels, in order), so that a later run can name
        which tasks of which split changed. A task's digest does not depend on the other tasks."""
        out = {}
        for name in ("train", "valid", "test"):
            split = self.split(name)
            digests = {task: hashlib.sha256() for task in self.tasks}
            for task, ids, labels in zip(split.task_index, split.input_ids, split.labels):
                digests[self.tasks[task]].update(_document_bytes(ids, labels))
            out[name] = {task: digest.hexdigest() for task, digest in digests.items()}
        return out

    def document_digests(self) -> list[tuple[str, str, str]]:
        """(split, task, digest) of every tokenised document in order: the first 16 hex digits of the SHA-256 of
        its length, token ids and labels (what lets a later run say how many documents of a task changed)."""
        return [
            (name, self.tasks[task], hashlib.sha256(_document_bytes(ids, labels)).hexdigest()[:16])
            for name in ("train", "valid", "test")
            for task, ids, labels in zip(
                self.split(name).task_index, self.split(name).input_ids, self.split(name).labels
            )
        ]

    def documents(self) -> dict[str, dict[str, int]]:
        """Per split: the source documents used (after the per-task caps), those available before the
        caps, how many were longer than ``max_tokens``, how many of them were cut short by the held-out
        splits' chunk cap (``max_eval_docs``), and the documents after chunking."""
        return {
            name: {
                "used": s.source_docs,
                "available": s.available_docs,
                "long": s.long_docs,
                "capped": s.capped_docs,
                "prompt_cut": s.prompt_cut_docs,
                "chunks": len(s),
            }
            for name, s in ((n, self.split(n)) for n in ("train", "valid", "test"))
        }

    def summary(self) -> list[dict]:
        """One row per task: documents and scored tokens in each split."""
        rows = []
        counts = {
            s: (self.split(s).docs_per_task(), self.split(s).tokens_per_task()) for s in ("train", "valid", "test")
        }
        for d, task in enumerate(self.tasks):
            row = {"task": task}
            for s, (docs, tokens) in counts.items():
                row[f"n_{s}_docs"], row[f"n_{s}_tokens"] = int(docs[d]), int(tokens[d])
            rows.append(row)
        return rows


def _documents(data: object, tokenizer, config: CorpusConfig) -> Grouped:
    """The documents of the corpus ``data`` (a spec, or a table passed from Python) by task."""
    if not isinstance(data, str):
        return _table_documents(python_frame(data, None, config.split_column), config, corpus_name(data))
    if data == "bible-books":
        return Grouped(bible_books(tokenizer, config.max_tokens, config.translation, config.books), None, "text")
    if data == "bible-chapters":
        books = None if config.books in (None, ("all",)) else config.books
        chapters = bible_chapters(tokenizer, config.max_tokens, config.translations or (config.translation,), books)
        return Grouped(chapters, None, "text")
    if data == "bible-translate":
        return bible_translate(config.translations)
    kind, sep, location = data.partition(":")
    if kind == "ton" and location:
        return Grouped(
            ton_documents(location, config.ton_selection, config.num_tasks or 25, config.min_words), None, "text"
        )
    if sep and kind in ("csv", "jsonl", "datasets") and location:
        columns = (config.task_column, config.text_column, PROMPT, COMPLETION, MESSAGES, config.split_column)
        return _table_documents(read_table(kind, location, columns, config.split_column), config, data)
    raise ValueError(f"unknown corpus {data!r}; expected one of {list(CORPUS_FORMS)}")


def _table_documents(frame, config: CorpusConfig, source: str) -> Grouped:
    return documents_by_task(
        frame, config.task_column, config.text_column, source, config.data_format, config.split_column
    )


def corpus_name(data: object) -> str:
    """The name of a corpus: its spec, or ``<DataFrame>`` (etc.) for data passed from Python."""
    return data if isinstance(data, str) else f"<{type(data).__name__}>"


def input_format_of(grouped: Grouped, tokenizer, config: CorpusConfig) -> InputFormat:
    """The input format of a corpus: its documents' format with the configured task prompt, loss mask and
    (conversational formats) chat template."""
    conversational = grouped.data_format in ("messages", CONVERSATIONAL)
    if config.chat_template is not None and not conversational:
        log.warning(
            "--chat-template %s is not used: this corpus holds %s data, not conversations",
            config.chat_template,
            grouped.data_format,
        )
    if config.data_format == "text" and grouped.data_format != "text":
        raise ValueError(f"--data-format text: this corpus holds {grouped.data_format} examples, not texts")
    return InputFormat(
        grouped.data_format,
        config.task_prompt,
        config.completion_only_loss,
        read_chat_template(config.chat_template, tokenizer) if conversational else None,
        bos=tokenizer.bos_token_id is not None,
    )


def _document_bytes(ids: list[int], labels: list[int]) -> bytes:
    """What a document's digests cover: its length, token ids and labels."""
    return np.asarray([len(ids), *ids, *labels], dtype=np.int64).tobytes()


def load_corpus(data: object, tokenizer, config: CorpusConfig | None = None, **options) -> Corpus:
    """Load, split (as given, or per task, seeded) and tokenise a multi-task corpus.

    Args:
        data: a corpus spec (the module docstring: ``"bible-books"``, ``"csv:PATH"``, ...), or a table
            passed from Python: a pandas DataFrame, a list of dicts (one per row), or a ``datasets.Dataset``
            / ``DatasetDict`` (its splits are used as given), in any format of ``formats.py``.
        tokenizer: the base model's tokenizer.
        config: the corpus settings (default :class:`CorpusConfig`'s), passed whole.
        **options: fields of :class:`CorpusConfig` (``max_tokens``, ``seed``, ``max_train_docs``...) that override
            ``config``'s.
    """
    config = dataclasses.replace(config or CorpusConfig(), **options)
    name = corpus_name(data)
    grouped = _documents(data, tokenizer, config)
    docs, given = grouped.docs, grouped.splits
    if config.num_tasks is not None:
        docs = dict(list(docs.items())[: config.num_tasks])
    check_task_names(tuple(docs), name)
    input_format = input_format_of(grouped, tokenizer, config)
    splits, available = split_per_task(
        docs,
        config.valid_fraction,
        config.test_fraction,
        config.seed or 0,
        config.max_train_docs,
        config.max_eval_docs,
        source=name,
        holdout_min_docs=config.holdout_min_docs,
        given=given,
    )
    tasks = tuple(docs)
    tokenized = {
        split: dataclasses.replace(
            _tokenize(split, tasks, rows, tokenizer, config, input_format), available_docs=available[split]
        )
        for split, rows in splits.items()
    }
    heldout = {split: tuple(splits[split]) for split in ("valid", "test")}
    corpus = Corpus(
        name, tasks, tokenized["train"], tokenized["valid"], tokenized["test"], config, input_format, heldout
    )
    _check_has_tasks(corpus)
    _report_splits(corpus, given is not None)
    _report_long_documents(corpus)
    return corpus


def _tokenize(
    name: str, tasks: tuple[str, ...], rows: list, tokenizer, config: CorpusConfig, input_format: InputFormat
) -> Split:
    """One split tokenised; valid and test keep at most ``max_eval_docs`` chunks per task (only the text those
    chunks need is tokenised), train every chunk of its documents. Valid and test are always scored on the
    completions (assistant turns) only, whatever the training loss: so runs trained either way compare."""
    cap = None if name == "train" else config.max_eval_docs
    if name != "train" and not input_format.completion_only_loss:
        scored = dataclasses.replace(input_format, completion_only_loss=True)
        try:
            return tokenize_split(name, tasks, rows, tokenizer, config.max_tokens, scored, config.long_documents, cap)
        except NotIncremental:
            log.warning(
                "%s is scored on every token, as trained: the chat template rewrites earlier turns, so its "
                "completions cannot be told apart",
                name,
            )
    return tokenize_split(name, tasks, rows, tokenizer, config.max_tokens, input_format, config.long_documents, cap)


def _report_splits(corpus: Corpus, given: bool) -> None:
    """Say where the split came from, and which tasks have no held-out documents (no held-out score)."""
    counts = {s: corpus.split(s).docs_per_task() for s in ("train", "valid", "test")}
    if given:
        log.info(
            "%s: the split is the data's own (%s)",
            corpus.name,
            ", ".join(f"{int(c.sum())} {s}" for s, c in counts.items()),
        )
    unscored = [t for d, t in enumerate(corpus.tasks) if counts["test"][d] == 0]
    if unscored:
        reason = (
            "the data's split gives them none"
            if given
            else f"fewer than --holdout-min-docs {corpus.config.holdout_min_docs} documents: all kept for training"
        )
        log.warning(
            "%s: %d of %d task(s) have no test documents (%s): %s; they are trained, but have no test score",
            corpus.name,
            len(unscored),
            len(corpus.tasks),
            reason,
            shown_list(unscored),
        )


def _check_has_tasks(corpus: Corpus) -> None:
    """A corpus needs tasks (``split_per_task`` gives each of them training documents)."""
    if not corpus.tasks:
        raise ValueError(
            f"{corpus.name}: no task has documents; check the data (and --books, --num-tasks, --max-tokens: "
            "bible-chapters leaves out chapters too short for three documents of --max-tokens tokens)"
        )


def _report_long_documents(corpus: Corpus) -> None:
    """Say how many documents were longer than the token budget and what was done with them."""
    cut = {s: corpus.split(s) for s in ("train", "valid", "test") if corpus.split(s).prompt_cut_docs}
    if cut:
        log.warning(
            "%s: %s examples are longer than max_tokens=%d tokens: their prompts were cut from the left (left out "
            "where the completion alone does not fit) so that the completion is kept",
            corpus.name,
            ", ".join(f"{s.prompt_cut_docs} of {s.source_docs} {name}" for name, s in cut.items()),
            corpus.config.max_tokens,
        )
    long = {s: corpus.split(s) for s in ("train", "valid", "test") if corpus.split(s).long_docs}
    if not long:
        return
    counts = ", ".join(f"{s.long_docs} of {s.source_docs} {name}" for name, s in long.items())
    budget = corpus.config.max_tokens
    if corpus.config.long_documents == "split":
        chunks = sum(len(s) - s.source_docs + s.long_docs for s in long.values())
        capped = sum(s.capped_docs for s in long.values())
        log.warning(
            "%s: %s documents are longer than max_tokens=%d tokens: split into %d consecutive chunks "
            "(each a document of its task; --long-documents truncate cuts them instead)%s",
            corpus.name,
            counts,
            budget,
            chunks,
            f"; valid and test keep at most {corpus.config.max_eval_docs} chunks per task (--max-eval-docs), "
            f"so {capped} of their documents were cut short"
            if capped
            else "",
        )
    else:
        log.warning(
            "%s: %s documents are longer than max_tokens=%d tokens: cut at %d tokens "
            "(--long-documents split keeps their text as consecutive chunks)",
            corpus.name,
            counts,
            budget,
            budget,
        )

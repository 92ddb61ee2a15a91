"""The embedded corpora: one task per book (``bible-books``, the default) or per chapter (``bible-chapters``)
of Bible translations (``pythonbible`` wheels).

Documents are runs of consecutive verses packed up to ``max_tokens`` tokens. Wycliffe's Middle
English (the default) is a variety SmolLM2 has barely seen, so adaptation has much to gain.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

log = logging.getLogger(__name__)

# Ten books of very unequal length (Wycliffe verses: Psalms 2526 ... Obadiah 21).
DEFAULT_BOOKS = (
    "Psalms",
    "Genesis",
    "Isaiah",
    "Matthew",
    "Acts",
    "Romans",
    "James",
    "Ruth",
    "Jonah",
    "Obadiah",
)
_VERSE_NUMBER = re.compile(r"^\s*\d+\.\s*")


def _bible(translation: str):
    try:
        import pythonbible as pb
        from pythonbible.bible import get_bible
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"the bible-books corpus needs the pythonbible wheels: pip install pythonbible pythonbible-{translation}"
        ) from err
    versions = {v.value.lower(): v for v in pb.Version}
    if translation.lower() not in versions:
        raise ValueError(f"unknown Bible translation {translation!r}; pythonbible knows {sorted(versions)}")
    try:
        return get_bible(versions[translation.lower()], "plain_text")
    except Exception as err:  # the per-translation wheel is missing
        raise ModuleNotFoundError(
            f"Bible translation {translation!r} is not installed: pip install pythonbible-{translation.lower()}"
        ) from err


def chapter_verses_by_id(translation: str = "wyc") -> dict[int, str]:
    """Every verse of a translation that has text, in canonical order: {verse id (BBCCCVVV): text}."""
    bible = _bible(translation)
    books = {book.value for book in bible.short_titles}
    verses = {}
    for verse_id in bible.get_verse_ids():
        text = _VERSE_NUMBER.sub("", bible.get_scripture(verse_id)).strip()
        if verse_id // 1_000_000 in books and text:
            verses[verse_id] = text
    return verses


def chapter_verses(translation: str = "wyc") -> dict[tuple[str, int], list[str]]:
    """All chapters of a translation, in canonical order: {(book title, chapter): [verse text, ...]}."""
    titles = {book.value: title for book, title in _bible(translation).short_titles.items()}
    chapters: dict[tuple[str, int], list[str]] = {}
    for verse_id, text in chapter_verses_by_id(translation).items():
        chapters.setdefault((titles[verse_id // 1_000_000], verse_id // 1000 % 1000), []).append(text)
    return chapters


def book_verses(translation: str = "wyc") -> dict[str, list[str]]:
    """All books of a translation, in canonical order: {book title: [verse text, ...]}."""
    books: dict[str, list[str]] = {}
    for (title, _), verses in chapter_verses(translation).items():
        books.setdefault(title, []).extend(verses)
    return books


def pack_verses(verses: Sequence[str], tokenizer, max_tokens: int, reserved: int = 2) -> list[str]:
    """Join consecutive verses into documents of at most ``max_tokens - reserved`` tokens.

    ``reserved`` leaves room for BOS/EOS. A verse longer than the budget is its own document
    (split into chunks at tokenisation, see ``tokenize.py``).
    """
    budget = max_tokens - reserved
    lengths = [len(ids) for ids in tokenizer([" " + v for v in verses], add_special_tokens=False)["input_ids"]]
    docs, current, used = [], [], 0
    for verse, n in zip(verses, lengths):
        if current and used + n > budget:
            docs.append(" ".join(current))
            current, used = [], 0
        current.append(verse)
        used += n
    if current:
        docs.append(" ".join(current))
    return docs


def bible_books(
    tokenizer,
    max_tokens: int,
    translation: str = "wyc",
    books: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Documents per book: {book: [document text, ...]}.

    ``books`` picks books by title (default: :data:`DEFAULT_BOOKS`, ten books of very unequal
    size); ``books=["all"]`` takes every book of the translation.
    """
    verses = book_verses(translation)
    if books is None:
        selection = list(DEFAULT_BOOKS)
    elif list(books) == ["all"]:
        selection = list(verses)
    else:
        selection = list(books)
    unknown = [b for b in selection if b not in verses]
    if unknown:
        raise ValueError(f"unknown book(s) {unknown} in translation {translation!r}; books are: {list(verses)}")
    return {book: pack_verses(verses[book], tokenizer, max_tokens) for book in selection}


def bible_chapters(
    tokenizer,
    max_tokens: int,
    translations: Sequence[str] = ("wyc",),
    books: Sequence[str] | None = None,
    min_docs: int = 3,
) -> dict[str, list[str]]:
    """Documents per chapter, one task per (translation, chapter): {"wyc Genesis 1": [document text, ...]}.

    A many-task corpus (Wycliffe alone has over 1,300 chapters). ``books`` restricts it to some books
    (default: every book). Chapters too short to give ``min_docs`` documents (a train, a validation and
    a test document) are left out, and how many is said.
    """
    out: dict[str, list[str]] = {}
    dropped = 0
    for translation in translations:
        chapters = chapter_verses(translation)
        known = list(dict.fromkeys(title for title, _ in chapters))
        unknown = [b for b in books or () if b not in known]
        if unknown:
            raise ValueError(f"unknown book(s) {unknown} in translation {translation!r}; books are: {known}")
        for (title, chapter), verses in chapters.items():
            if books and title not in books:
                continue
            docs = pack_verses(verses, tokenizer, max_tokens)
            if len(docs) < min_docs:
                dropped += 1
                continue
            out[f"{translation} {title} {chapter}"] = docs
    if dropped:
        log.warning(
            "bible-chapters: left out %d chapter(s) too short for %d documents of at most %d tokens "
            "(a train, a validation and a test document)",
            dropped,
            min_docs,
            max_tokens,
        )
    return out

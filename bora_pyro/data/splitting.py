"""Per-task train / valid / test split of documents: as the data gives it, or seeded and stratified."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from .messages import shown_list

SPLITS = ("train", "valid", "test")
Parts = dict[str, list[tuple[int, object]]]  # split -> [(task index, document), ...]


def split_per_task(
    docs_by_task: Mapping[str, Sequence[object]],
    valid_fraction: float,
    test_fraction: float,
    seed: int,
    max_train_docs: int | None = None,
    max_eval_docs: int | None = None,
    source: str = "documents",
    holdout_min_docs: int = 3,
    given: Mapping[str, Sequence[str]] | None = None,
) -> tuple[Parts, dict[str, int]]:
    """Split every task's documents into train / valid / test.

    ``given`` (task -> each document's split, e.g. from a split column): used as it is; every task needs
    a training document, and may have no held-out ones. Otherwise the split is seeded per task: a task of at
    least ``holdout_min_docs`` documents (>= 3) gets at least one in each split, a smaller one keeps all of
    its documents for training (it has no held-out score). ``max_train_docs`` / ``max_eval_docs`` cap the
    documents per task kept in train and in each of valid and test (after the split, so held-out sets
    never leak into training). ``source`` (the corpus spec) starts the error message.

    Returns: ({"train" | "valid" | "test": [(task_index, document), ...]}, task index in the mapping's order;
    {split: number of documents before the caps}).
    """
    if holdout_min_docs < 3:
        raise ValueError(f"holdout_min_docs must be >= 3 (one document for each split), got {holdout_min_docs}")
    if given is not None:
        untrained = [task for task in docs_by_task if "train" not in given[task]]
        if untrained:
            raise ValueError(
                f"{source}: task(s) {shown_list(untrained)} have no training document in the given split; every "
                "task needs one (move one of theirs to train, or leave them out)"
            )
    out: Parts = {name: [] for name in SPLITS}
    available = dict.fromkeys(SPLITS, 0)
    caps = {"train": max_train_docs, "valid": max_eval_docs, "test": max_eval_docs}
    for task_index, (task, docs) in enumerate(docs_by_task.items()):
        if given is not None:
            names = np.asarray(given[task])
            parts = {name: np.flatnonzero(names == name) for name in SPLITS}
        else:
            parts = _random_parts(task, len(docs), valid_fraction, test_fraction, seed, holdout_min_docs)
        for name, idx in parts.items():
            kept = idx if caps[name] is None else idx[: caps[name]]
            available[name] += len(idx)
            out[name] += [(task_index, docs[i]) for i in sorted(kept)]
    return out, available


def _random_parts(
    task: str, n: int, valid_fraction: float, test_fraction: float, seed: int, holdout_min_docs: int
) -> dict[str, np.ndarray]:
    """The seeded split of a task's ``n`` documents (depends only on (seed, task name), not on which other
    tasks are present); a task of fewer than ``holdout_min_docs`` documents keeps them all for training."""
    if n < holdout_min_docs:
        return {"valid": np.arange(0), "test": np.arange(0), "train": np.arange(n)}
    order = np.random.default_rng([seed, zlib.crc32(task.encode())]).permutation(n)
    n_valid = max(1, int(round(valid_fraction * n)))
    n_test = max(1, int(round(test_fraction * n)))
    n_valid, n_test = min(n_valid, n - 2), min(n_test, n - 1 - min(n_valid, n - 2))
    return {
        "valid": order[:n_valid],
        "test": order[n_valid : n_valid + n_test],
        "train": order[n_valid + n_test :],
    }

"""Scoring what the adapters generate: greedy answers to held-out prompts against their references.

``evaluate RUN --generate N``: the first N held-out examples of each task (prompt-completion or
conversational data), generated greedily in mixed-task batches under each example's own task adapter,
scored with chrF (sacrebleu's, the field's standard for character n-gram F-score) and exact match,
per task and overall. Overall chrF is the corpus-level chrF of all examples; task-macro the mean
of the per-task corpus chrFs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..data.formats import Document
from ..data.input_format import prompt_of, reference_text


@dataclass(frozen=True)
class GenerationScores:
    """Per example (``examples``: task, prompt, reference, output, chrf, exact) and per task (``per_task``:
    task, n, chrf, exact_match) scores, and the overall ones."""

    examples: pd.DataFrame
    per_task: pd.DataFrame
    chrf: float
    chrf_macro: float
    exact_match: float

    def metrics(self) -> dict[str, float]:
        return {
            "generate_chrf": self.chrf,
            "generate_chrf_macro": self.chrf_macro,
            "generate_exact_match": self.exact_match,
            "generate_examples": len(self.examples),
        }


def heldout_examples(
    tasks: Sequence[str], heldout: Sequence[tuple[int, Document]], per_task: int
) -> list[tuple[str, Document]]:
    """The first ``per_task`` examples of each task among ``heldout`` ((task index, document) pairs)."""
    if not isinstance(per_task, int) or isinstance(per_task, bool) or per_task < 1:
        raise ValueError(f"--generate takes the number of held-out examples per task (>= 1), got {per_task!r}")
    taken: dict[int, int] = {}
    out = []
    for task, document in heldout:
        if isinstance(document, str):
            raise ValueError(
                "--generate scores answers to prompts: it needs prompt-completion or messages data, and this run's "
                "documents are texts"
            )
        if taken.get(task, 0) < per_task:
            taken[task] = taken.get(task, 0) + 1
            out.append((tasks[task], document))
    if not out:
        raise ValueError("--generate: the split has no held-out examples to answer")
    return out


def score_generations(
    generate: Callable[[list, list[str]], list[str]],
    examples: Sequence[tuple[str, Document]],
    batch_size: int = 16,
    progress: Callable | None = None,
    split: str = "test",
) -> GenerationScores:
    """Generate an answer to every example's prompt (``generate(prompts, tasks) -> texts``, greedy, in
    mixed-task batches of ``batch_size``) and score it against the reference (``split``: where the examples
    come from, recorded with them)."""
    import sacrebleu

    outputs: list[str] = []
    starts = range(0, len(examples), batch_size)
    for start in progress(starts) if progress else starts:
        chunk = examples[start : start + batch_size]
        outputs += generate([prompt_of(d) for _, d in chunk], [t for t, _ in chunk])
    references = [reference_text(d).strip() for _, d in examples]
    outputs = [o.strip() for o in outputs]
    frame = pd.DataFrame(
        {
            "split": split,
            "task": [t for t, _ in examples],
            "prompt": [_shown(prompt_of(d)) for _, d in examples],
            "reference": references,
            "output": outputs,
            "chrf": [sacrebleu.sentence_chrf(o, [r]).score for o, r in zip(outputs, references)],
            "exact": [o == r for o, r in zip(outputs, references)],
        }
    )
    rows = []
    for task, group in frame.groupby("task", sort=False):
        chrf = sacrebleu.corpus_chrf(group.output.tolist(), [group.reference.tolist()]).score
        rows.append({"task": task, "n": len(group), "chrf": chrf, "exact_match": float(group.exact.mean())})
    per_task = pd.DataFrame(rows)
    overall = sacrebleu.corpus_chrf(outputs, [references]).score
    return GenerationScores(frame, per_task, overall, float(np.mean(per_task.chrf)), float(frame.exact.mean()))


def _shown(prompt) -> str:
    """A prompt as one cell of text: itself, or a conversation's last message content."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]

"""How a training step draws its documents, and the weights that keep the objective unbiased.

Task d (n_d of the N training documents) is drawn with probability q_d ∝ n_d^(1/T):

* ``proportional`` (T = 1, q_d = n_d / N): every document alike. Batches are epoch-wise permutations of
  the training documents (:meth:`Split.train_batch_indices`), the minibatch log-likelihood is scaled by
  N / B.
* ``uniform`` (T = inf, q_d = 1 / D over the tasks with training documents): every task alike.
* ``temperature:T``: in between for T > 1 (the multi-task convention), sharper than proportional for T < 1.

Under a mode other than proportional each of a step's B examples is drawn independently: a task from q,
then one of its documents uniformly, so document i of task d is drawn with probability pi_i = q_d / n_d.
The unbiased estimate of the full-data log-likelihood is (1 / B) sum_b log p(y_b) / pi_b: example b
carries weight 1 / (B pi_b) = (N / B) w_d with the task's importance weight w_d = (n_d / N) / q_d (1 under
proportional sampling). The posterior is that of proportional sampling; only the gradient's variance
differs (less noise on the small tasks under uniform sampling, more on the large ones).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

PROPORTIONAL, UNIFORM, TEMPERATURE = "proportional", "uniform", "temperature:"
EXPECTED = "proportional, uniform, or temperature:T with T > 0 (temperature:inf = uniform)"


def parse_task_sampling(text: str) -> float:
    """The temperature T of a ``--task-sampling`` value: "proportional" -> 1.0, "uniform" -> inf,
    "temperature:T" -> T (T > 0; "temperature:inf" is uniform). Anything else is a one-line ValueError."""
    if text == PROPORTIONAL:
        return 1.0
    if text == UNIFORM:
        return math.inf
    if text.startswith(TEMPERATURE):
        try:
            temperature = float(text[len(TEMPERATURE) :])
        except ValueError:
            temperature = math.nan
        if temperature > 0:  # False for nan
            return temperature
    raise ValueError(f"task_sampling must be {EXPECTED}, got {text!r}")


def check_task_sampling(text: str) -> str:
    """``text`` if it is a valid ``--task-sampling`` value (see :func:`parse_task_sampling`)."""
    parse_task_sampling(text)
    return text


def task_probabilities(docs_per_task: np.ndarray, temperature: float) -> np.ndarray:
    """q_d ∝ n_d^(1/T) over the tasks with documents (0 for the others). Shapes: [tasks] -> [tasks] (float64)."""
    n = np.asarray(docs_per_task, dtype=np.float64)
    present = n > 0
    if not present.any():
        raise ValueError("task sampling needs at least one training document")
    logits = np.where(present, np.log(np.where(present, n, 1.0)) / temperature, -np.inf)  # log n_d / T
    q = np.exp(logits - logits[present].max())
    return q / q.sum()


def importance_weights(docs_per_task: np.ndarray, temperature: float) -> torch.Tensor | None:
    """Each task's importance weight w_d = (n_d / N) / q_d (the probability of its documents under
    proportional sampling over their probability here; 1 where a task has no documents, never drawn);
    None under proportional sampling (T = 1: every weight 1). Shapes: [tasks] -> [tasks]."""
    if temperature == 1.0:
        return None
    n = np.asarray(docs_per_task, dtype=np.float64)
    q = task_probabilities(n, temperature)
    weights = np.ones_like(n)
    np.divide(n / n.sum(), q, out=weights, where=q > 0)
    return torch.as_tensor(weights, dtype=torch.get_default_dtype())


def iid_batch_indices(
    task_index: np.ndarray, num_tasks: int, batch_size: int, temperature: float, seed: int, start_step: int
) -> Iterator[list[int]]:
    """Endless batches of ``batch_size`` document indices, each drawn independently: a task from
    :func:`task_probabilities`, then one of its documents uniformly. Step s draws from its own generator
    (seeded by ``seed`` and s), so the batches from ``start_step`` on are those of a run from step 0.
    Shapes: task_index [docs] (each document's task)."""
    task_index = np.asarray(task_index, dtype=np.int64)
    order = np.argsort(task_index, kind="stable")  # documents grouped by task  [docs]
    counts = np.bincount(task_index, minlength=num_tasks)  # [tasks]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # [tasks]
    q = task_probabilities(counts, temperature)
    step = start_step
    while True:
        rng = np.random.default_rng([seed, step])
        tasks = rng.choice(num_tasks, size=batch_size, p=q)  # [batch]
        within = rng.integers(0, counts[tasks])  # [batch], uniform among each drawn task's documents
        yield order[starts[tasks] + within].tolist()
        step += 1

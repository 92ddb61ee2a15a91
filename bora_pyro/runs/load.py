"""A run folder brought back to life: its spec, base model (checked), tokenizer, input format and saved adapters.

A run folder stands alone: ``export``, ``generate`` and scoring other data (``evaluate --data OTHER``) read only
the folder and the base model. The training corpus is read again only for what needs its documents (re-scoring
the run's own splits, the collapsed posterior of tau, ``evaluate --generate``), and then checked against the
digests the folder recorded, naming what changed."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.batching import Split
from ..data.corpus import Corpus, load_corpus
from ..data.input_format import InputFormat
from ..evaluation.generation_scores import GenerationScores, heldout_examples, score_generations
from ..evaluation.perplexity import PerplexityReport, evaluate
from ..evaluation.tau_posterior import tau_posterior
from ..io.artifacts import ADAPTERS_FILE, AdapterFile, read_json
from ..io.folders import resolve
from ..io.integrity import CorruptFile
from ..models.bora import BoRA
from ..models.collapsed_tau import TauPosterior
from ..models.gates import GateConfig
from ..models.generation import generate
from .build import build_model, load_base
from .run_files import (
    COMPLETE,
    CONFIG_FILE,
    check_base_model,
    corpus_changes,
    input_format_changes,
    read_metrics,
    recorded_input_format,
    verified_status,
)
from .spec import RunSpec


@dataclass
class LoadedRun:
    """A run folder brought back to life: the spec, model, tokenizer and the saved adapters (read task by
    task as needed: :meth:`rows`); the training corpus is read on first use (:attr:`corpus`)."""

    path: Path
    spec: RunSpec
    bora: BoRA
    tokenizer: object
    adapters: AdapterFile
    global_factors: dict[str, torch.Tensor] | None  # Theta (None for independent runs)
    status: str = COMPLETE
    base_model: dict | None = None  # the identity recorded at training (name, hub id, weights hash)

    @cached_property
    def corpus(self) -> Corpus:
        """The corpus the run was trained on, read again from ``spec.data`` with the run's settings and checked
        against the digests the folder recorded (a change is named and refused)."""
        try:
            corpus = load_corpus(self.spec.data, self.tokenizer, config=self.spec.corpus)
        except OSError as err:
            raise ValueError(
                f"the training data {self.spec.data!r} of {self.path} cannot be read ({err}); re-scoring its own "
                "splits needs it (export, generate and evaluate --data OTHER do not)"
            ) from None
        changes = corpus_changes(self.path, corpus)
        if not changes and corpus.tasks != self.bora.tasks:
            changes = [
                f"its tasks come in another order ({_first(corpus.tasks)}) than the run's ({_first(self.bora.tasks)})"
            ]
        if changes:
            raise ValueError(
                f"the corpus {self.spec.data!r} changed since {self.path} was trained "
                f"({'; '.join(changes)}); to score it as other data, pass --data {self.spec.data}"
            )
        changed = input_format_changes(self.path, corpus)
        if changed:
            raise ValueError(
                f"{self.path} was trained with another input format than the one its settings give now "
                f"({', '.join(changed)} changed: e.g. the tokenizer's chat template); load it with the tokenizer "
                "it was trained with"
            )
        return corpus

    @cached_property
    def input_format(self) -> InputFormat:
        """How the run encodes an example (recorded in the folder; an older folder's from its corpus)."""
        return recorded_input_format(self.path) or self.corpus.input_format

    def rows(self, tasks: Sequence[int]) -> dict[str, torch.Tensor]:
        """The saved factors of the tasks ``tasks`` (ids), on the model's device. Shapes: name -> [P, ...]."""
        return {k: v.to(self.bora.device) for k, v in self.adapters.rows(tasks).items()}

    @cached_property
    def task_factors(self) -> dict[str, torch.Tensor]:
        """Every task's saved factors at once, name -> [D, ...] (prefer :meth:`rows` for many tasks)."""
        return self.rows(range(len(self.bora.tasks)))

    def tau_posterior(self, **options) -> TauPosterior:
        """The collapsed posterior of tau from the saved adapters (messages taken at them by a curvature pass over
        the run's training documents); ``options`` as :func:`bora_pyro.tau_posterior` (not ``source="guide"``:
        a run folder keeps no guide)."""
        names = list(self.bora.lora.shapes())
        tau = self.spec.prior.tau
        if isinstance(tau, float):
            taus = dict.fromkeys(names, tau)
        else:  # learned: the tau the adapters were fitted at, the guide's median (a run folder keeps no guide)
            metrics = read_metrics(self.path)
            medians = metrics.get("tau_guide_q05_q50_q95") or metrics.get("tau_posterior_q05_q50_q95")
            if not medians:
                raise ValueError(f"{self.path} has a learned tau but records no guide median of it in metrics.json")
            group = self.bora.prior.tau_prior.group_index(names)
            groups = self.bora.prior.tau_groups()
            taus = {n: float(medians[groups[group[n]]][1]) for n in names}
        theta = self.global_factors
        return tau_posterior(self.bora, self.corpus, point=self.task_factors, theta=theta, taus=taus, **options)

    def generate(self, prompts: list, tasks: list[str], **options) -> list[str]:
        """Answer or continue each prompt (a text, or a message list for conversational runs) under its task's
        adapter ("global" = Theta), encoded as in training; see :func:`generation.generate`."""
        return generate(
            self.bora.lora,
            self.tokenizer,
            self.bora.tasks,
            self.rows,
            self.global_factors,
            prompts,
            tasks,
            input_format=self.input_format,
            **options,
        )

    def generation_scores(
        self, per_task: int, split: str = "test", max_new_tokens: int = 64, batch_size: int | None = None
    ) -> GenerationScores:
        """chrF and exact match of greedy answers to the first ``per_task`` examples of each task in ``split``
        (valid or test) of the run's corpus (see :mod:`generation_scores`)."""
        if split not in ("valid", "test"):
            raise ValueError(
                f"--generate answers held-out examples: the split must be 'valid' or 'test', got {split!r}"
            )
        examples = heldout_examples(self.bora.tasks, self.corpus.heldout[split], per_task)
        return score_generations(
            lambda prompts, tasks: self.generate(prompts, tasks, max_new_tokens=max_new_tokens, do_sample=False),
            examples,
            batch_size or self.spec.train.eval_batch_size,
            progress=lambda it: tqdm(it, desc="generate", unit="batch", disable=None),
            split=split,
        )

    def evaluate(self, split: str = "test", batch_size: int | None = None, data: str | None = None) -> PerplexityReport:
        """Perplexity of the run's adapters on ``split`` of its own corpus, which must be the data it was
        trained on (a change is named and refused), or of the corpus ``data`` (other data, asked for)."""
        size = batch_size or self.spec.train.eval_batch_size
        return evaluate(self.bora, self.split(split, data), size, factors=self.rows)

    def split(self, name: str, data: str | None = None) -> Split:
        """The split ``name`` to score: of the run's corpus (checked unchanged since training), or of the
        corpus ``data`` (read with the run's corpus settings; its tasks must be the run's)."""
        if data is None:
            return self.corpus.split(name)  # checked unchanged when read
        corpus = load_corpus(data, self.tokenizer, config=self.spec.corpus)
        if corpus.input_format.data_format != self.input_format.data_format:
            raise ValueError(
                f"{data} is {corpus.input_format.data_format} data and {self.path} was trained on "
                f"{self.input_format.data_format} data: score data in the run's format"
            )
        other = corpus.split(name)
        if set(other.tasks) != set(self.bora.tasks):
            missing, extra = set(self.bora.tasks) - set(other.tasks), set(other.tasks) - set(self.bora.tasks)
            raise ValueError(
                f"{data} must hold the run's tasks: missing {sorted(missing)[:5]}, not in the run {sorted(extra)[:5]}"
            )
        index = {task: d for d, task in enumerate(self.bora.tasks)}
        return dataclasses.replace(
            other, tasks=self.bora.tasks, task_index=tuple(index[other.tasks[t]] for t in other.task_index)
        )


def _first(tasks, k: int = 3) -> str:
    return ", ".join(map(repr, tasks[:k])) + (", ..." if len(tasks) > k else "")


def load_run(path: str | Path, device: str | None = None, trust_remote_code: bool = False) -> LoadedRun:
    """Rebuild a run from its folder: same base model (the weights it was trained on: checked), its tokenizer
    and input format, the saved adapters; the training data is not read (see :attr:`LoadedRun.corpus`).
    ``trust_remote_code``: your permission for a model that needs it (never taken from the folder)."""
    path = resolve(path, "run folder")
    status = verified_status(path)["status"]  # recovered under the lock, every file checked
    spec = RunSpec.from_run_folder(path, trust_remote_code)
    if device is not None:
        spec = replace(spec, device=device)
    lm, tokenizer, identity = load_base(spec, path)
    config = read_json(path / CONFIG_FILE)
    check_base_model(path, config, identity)
    adapters = AdapterFile(path / ADAPTERS_FILE)
    tasks = tuple(config.get("tasks") or adapters.tasks)
    if tuple(adapters.tasks) != tasks:
        raise CorruptFile(
            f"{path}: the tasks of {ADAPTERS_FILE} ({list(adapters.tasks)[:5]}...) are not those of {CONFIG_FILE} "
            f"({list(tasks)[:5]}...)"
        )
    bora = build_model(replace(spec, gates=GateConfig()), lm, tasks)  # gates are folded in the saved adapters
    for name, shape in bora.lora.shapes().items():
        if adapters.shapes.get(name) != shape:
            raise ValueError(
                f"{path}: adapter tensor {name!r} is missing or has the wrong shape (expected [D, *{shape}])"
            )
    theta = adapters.global_factors()
    theta = None if theta is None else {k: v.to(bora.device) for k, v in theta.items()}
    return LoadedRun(path, spec, bora, tokenizer, adapters, theta, status, config.get("base_model"))

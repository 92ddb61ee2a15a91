"""A run folder brought back to life: its spec, corpus, base model (checked) and saved adapters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from ..data.corpus import Corpus
from ..evaluation.generation import generate
from ..evaluation.perplexity import PerplexityReport, evaluate
from ..io.artifacts import ADAPTERS_FILE, AdapterFile, read_json
from ..io.folders import recover
from ..models.bora import BoRA
from ..models.gates import GateConfig
from .folder import COMPLETE, CONFIG_FILE, check_base_model, load_inputs, read_status
from .spec import RunSpec


@dataclass
class LoadedRun:
    """A run folder brought back to life: the spec, corpus, model, and the saved adapters (read task by
    task as needed: :meth:`rows`)."""

    path: Path
    spec: RunSpec
    corpus: Corpus
    bora: BoRA
    tokenizer: object
    adapters: AdapterFile
    global_factors: dict[str, torch.Tensor] | None  # Theta (None for independent runs)
    status: str = COMPLETE
    base_model: dict | None = None  # the identity recorded at training (name, hub id, weights hash)

    def rows(self, tasks: Sequence[int]) -> dict[str, torch.Tensor]:
        """The saved factors of the tasks ``tasks`` (ids), on the model's device. Shapes: name -> [P, ...]."""
        return {k: v.to(self.bora.device) for k, v in self.adapters.rows(tasks).items()}

    @cached_property
    def task_factors(self) -> dict[str, torch.Tensor]:
        """Every task's saved factors at once, name -> [D, ...] (prefer :meth:`rows` for many tasks)."""
        return self.rows(range(len(self.bora.tasks)))

    def generate(self, prompts: list[str], tasks: list[str], **options) -> list[str]:
        """Continue each prompt under its task's adapter ("global" = Theta); see :func:`generation.generate`."""
        return generate(
            self.bora.lora, self.tokenizer, self.bora.tasks, self.rows, self.global_factors, prompts, tasks, **options
        )

    def evaluate(self, split: str = "test", batch_size: int | None = None) -> PerplexityReport:
        size = batch_size or self.spec.train.eval_batch_size
        return evaluate(self.bora, self.corpus.split(split), size, factors=self.rows)


def load_run(path: str | Path, device: str | None = None, trust_remote_code: bool = False) -> LoadedRun:
    """Rebuild a run from its folder: same base model (the weights it was trained on: checked), same
    corpus split, the saved adapters. ``trust_remote_code``: your permission for a model that needs it
    (never taken from the folder)."""
    path = Path(path)
    recover(path)
    spec = RunSpec.from_run_folder(path, trust_remote_code)
    if device is not None:
        spec = replace(spec, device=device)
    status = read_status(path)["status"]
    lm, tokenizer, identity, corpus = load_inputs(spec)
    config = read_json(path / CONFIG_FILE)
    check_base_model(path, config, identity)
    adapters = AdapterFile(path / ADAPTERS_FILE)
    if tuple(adapters.tasks) != corpus.tasks:
        raise ValueError(
            f"{path}: adapter tasks {adapters.tasks[:5]}... do not match the rebuilt corpus tasks "
            f"{list(corpus.tasks)[:5]}..."
        )
    bora = replace(spec, gates=GateConfig()).build_model(lm, corpus.tasks)  # gates are folded in the saved adapters
    for name, shape in bora.lora.shapes().items():
        if adapters.shapes.get(name) != shape:
            raise ValueError(
                f"{path}: adapter tensor {name!r} is missing or has the wrong shape (expected [D, *{shape}])"
            )
    theta = adapters.global_factors()
    theta = None if theta is None else {k: v.to(bora.device) for k, v in theta.items()}
    return LoadedRun(path, spec, corpus, bora, tokenizer, adapters, theta, status, config.get("base_model"))

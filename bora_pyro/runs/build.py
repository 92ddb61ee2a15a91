"""Building a run's objects from its spec: the base model, the task store and the BoRA model (every run,
trained, adapted, resumed or loaded, is built here). ``spec.py`` describes; this module builds."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from ..data.corpus import Corpus, load_corpus
from ..distributed import World
from ..io.base_models import BASE_DTYPES, describe_base_model, load_base_model, quantization_config, resolve_device
from ..io.task_store import TaskStore, table_bytes
from ..models.bora import BoRA
from ..models.prior import POOLED
from .run_files import run_tokenizer
from .spec import RunSpec


def load_model(spec: RunSpec):
    """The base LM and tokenizer of ``spec``, on its device, at its dtype or quantisation."""
    device, dtype = resolve_device(spec.device), BASE_DTYPES[spec.dtype]
    quantization = quantization_config(spec.quantized_bits, dtype)
    return load_base_model(
        spec.model, device=device, dtype=dtype, trust_remote_code=spec.trust_remote_code, quantization=quantization
    )


def load_base(spec: RunSpec, folder: Path | None = None) -> tuple[object, object, dict]:
    """A run's base LM, its tokenizer (the one kept in the run ``folder``, if given and kept) and the LM's
    identity (taken before the LM is wrapped)."""
    lm, tokenizer = load_model(spec)
    identity = describe_base_model(spec.model, lm)
    tokenizer = (run_tokenizer(folder, spec) if folder is not None else None) or tokenizer
    return lm, tokenizer, identity


def load_inputs(spec: RunSpec, folder: Path | None = None) -> tuple[object, object, dict, Corpus]:
    """:func:`load_base` and the run's corpus."""
    lm, tokenizer, identity = load_base(spec, folder)
    return lm, tokenizer, identity, load_corpus(spec.data, tokenizer, config=spec.corpus)


def task_store(
    spec: RunSpec, num_tasks: int, parameters_per_task: int, folder: Path | None, reopen: bool = False
) -> TaskStore:
    """The store of the task tables: "auto" picks disk when the guide's rows and their two moments need
    more than :data:`AUTO_DISK_BYTES`; a disk store keeps its files in ``folder`` (None: in memory) and,
    with ``reopen``, starts from the files there (a resumed run)."""
    adapter = spec.adapter
    needed = 3 * table_bytes((num_tasks, parameters_per_task))
    kind = "memory" if adapter.inference != "map" else TaskStore.choose(adapter.task_store, needed)
    if kind == "disk" and folder is None:
        kind = "memory"  # a model that is not trained here (a loaded run) creates no tables
    if kind == "disk" and not adapter.task_subsampling:
        raise ValueError("a disk task store needs task subsampling (a step must touch only its batch's tasks)")
    processes = World.current().size
    if kind == "disk" and processes > 1:
        raise ValueError(
            f"a disk task store belongs to one process, and this is one of {processes} data-parallel processes "
            f"(--task-store {adapter.task_store}, {needed / 1e9:.1f} GB of task tables): every process "
            "would write the same table files. Use --task-store memory, or one process (sharding the task "
            "rows over processes is a design in docs/multi-node.md, not implemented)"
        )
    return TaskStore(kind, folder if kind == "disk" else None, reopen=reopen)


def build_model(
    spec: RunSpec,
    lm,
    tasks,
    init: Mapping | None = None,
    store_folder: Path | None = None,
    reopen_store: bool = False,
) -> BoRA:
    """The BoRA model of ``spec`` over ``lm``, its task tables in a store chosen by :func:`task_store` (files in
    ``store_folder`` for a disk store)."""
    adapter = dataclasses.replace(spec.adapter, init_peft=None)  # started from a PEFT adapter by the caller
    bora = BoRA(lm, tasks, adapter=adapter, prior=spec.prior, gates=spec.gates, seed=spec.train.seed, init=init)
    store = task_store(spec, len(tasks), bora.lora.num_parameters(), store_folder, reopen_store)
    if store.disk and bora.mode != POOLED:  # tau = inf has no task rows: nothing to store
        bora.use_task_store(store)
    return bora

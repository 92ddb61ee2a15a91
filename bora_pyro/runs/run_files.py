"""The run folder on disk: which files it holds, its status, and how each stage is written.

A run is written in two stages, so that nothing fitted is lost when scoring fails (out of memory, a
full disk, an interrupted process):

1. as soon as the fit ends, the whole folder is written atomically (``folders.atomic_folder``):
   ``config.json``, ``adapters.safetensors``, ``fit_state.safetensors`` (every fitted parameter, to
   score or continue the run later), ``train_log.csv``, ``metrics.json`` (training part) and
   ``status.json`` with the status ``trained`` (or ``interrupted`` / ``diverged`` when the fit
   stopped early, holding the best validated state so far);
2. scoring then adds ``per_task.csv``, ``posterior.nc``, ``training_curve.png``, the gate report and
   the full ``metrics.json``, each file replaced atomically, sets the status ``complete``, writes the
   new manifest and removes ``fit_state.safetensors`` (and ``task_store/``: a disk task store's table
   files, the fitted task rows, linked in at stage 1). ``bora-pyro evaluate RUN`` finishes a ``trained`` run.

Each stage ends with ``manifest.json`` (``io/integrity.py``): the digest of every file, checked by every
command that reads the folder (:func:`verified_status`), so a changed or damaged file is refused, never
used. While stage 2 runs, the journal file ``.scoring`` says so: a folder that holds it was interrupted
while being scored, counts as ``trained`` and is checked on its stage-1 files only (stage 2 rewrites
the others).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from ..data.corpus import Corpus
from ..data.input_format import InputFormat
from ..evaluation.generation_scores import GenerationScores
from ..evaluation.scoring import Scores
from ..inference.svi import FitResult
from ..io.artifacts import ADAPTERS_FILE, RUN_FORMAT, read_json, save_adapters, write_json
from ..io.folders import JOURNAL, atomic_folder, atomic_write, fsync_path, reading
from ..io.integrity import MANIFEST, CorruptFile, update_manifest, verify
from ..models.bora import BoRA
from ..models.readout import iter_task_factors
from ..version import __version__
from .spec import CHAT_TEMPLATE_FILE

CONFIG_FILE, METRICS_FILE, STATUS_FILE, CORPUS_FILE = "config.json", "metrics.json", "status.json", "corpus.json"
TASK_STORE_FOLDER = "task_store"  # a disk task store's table files (the fitted task rows), until complete
FIT_STATE_FILE, TRAIN_LOG_FILE, PER_TASK_FILE = "fit_state.safetensors", "train_log.csv", "per_task.csv"
POSTERIOR_FILE, CURVE_FILE, GATES_FILE, GATES_FIGURE = "posterior.nc", "training_curve.png", "gates.csv", "gates.png"
TRAINED, COMPLETE, INTERRUPTED, DIVERGED = "trained", "complete", "interrupted", "diverged"
TAU_POSTERIOR_FILE, PRIOR_CHECK_FILE, TEST_DOCS_FILE = "tau_posterior.csv", "prior_check.csv", "test_docs.csv"
TAU_FIGURE, SHRINKAGE_FIGURE, SCALES_FIGURE = "tau_posterior.png", "shrinkage.png", "guide_scales.png"
TOKENIZER_FOLDER = "tokenizer"  # the tokenizer trained with (save_pretrained): the folder stands alone
DOCUMENTS_FILE = "documents.csv"  # split, task, digest of every document trained and scored on

SCORING = JOURNAL  # present while stage 2 writes: the folder counts as trained
STAGE1_FILES = (  # what stage 2 never rewrites
    CONFIG_FILE,
    CORPUS_FILE,
    DOCUMENTS_FILE,
    TOKENIZER_FOLDER,
    CHAT_TEMPLATE_FILE,
    ADAPTERS_FILE,
    FIT_STATE_FILE,
    TRAIN_LOG_FILE,
)
STAGE2_FILES = (
    PER_TASK_FILE,
    POSTERIOR_FILE,
    TEST_DOCS_FILE,
    TAU_POSTERIOR_FILE,
    PRIOR_CHECK_FILE,
    TAU_FIGURE,
    SHRINKAGE_FIGURE,
    SCALES_FIGURE,
    GATES_FILE,
    GATES_FIGURE,
    CURVE_FILE,
    METRICS_FILE,
    STATUS_FILE,
)
LOO_FILE = "loo_training.csv"  # diagnose: PSIS-LOO per training document (VI runs)
DIAGNOSE_FILES = ("tau_guide_draws.png", "distance_forest.png", "elbo_trace.png", "compare.csv")  # before manifests
GENERATION_FILE, GENERATION_TASKS_FILE = "generation.csv", "generation_per_task.csv"  # evaluate --generate
LEGACY_ENTRIES = (  # every name the tool wrote in a run folder before manifests (see folders.foreign_entries)
    CONFIG_FILE,
    CORPUS_FILE,
    TASK_STORE_FOLDER,
    FIT_STATE_FILE,
    TRAIN_LOG_FILE,
    ADAPTERS_FILE,
    *STAGE2_FILES,
    *DIAGNOSE_FILES,
)  # (before manifests, diagnose wrote tau_posterior.png, the name stage 2 now writes)


def run_entries(path: Path) -> tuple[str, ...]:
    """The names the tool may have written in the run folder ``path`` outside its manifest: the fitted state
    and task store of a cleanup a crash cut short, the stage-2 files while the journal says stage 2 was
    writing; for a folder without a manifest (an older version's), every name it wrote."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return LEGACY_ENTRIES
    return (FIT_STATE_FILE, TASK_STORE_FOLDER, *(STAGE2_FILES if (path / SCORING).exists() else ()))


log = logging.getLogger(__name__)
STATUSES = (TRAINED, COMPLETE, INTERRUPTED, DIVERGED)


def read_status(path: Path) -> dict[str, Any]:
    """``{"status": ..., "message": ..., ...}`` of a run folder; a folder written before statuses existed
    is ``complete`` if it has its metrics; one whose scoring was interrupted is ``trained``."""
    path = Path(path)
    if (path / STATUS_FILE).is_file():
        status = read_json(path / STATUS_FILE)
        if not isinstance(status, dict) or status.get("status") not in STATUSES:
            raise CorruptFile(
                f"{path / STATUS_FILE} is not a run status (a JSON object whose 'status' is one of {STATUSES})"
            )
        if (path / SCORING).exists():
            return {**status, "status": TRAINED, "message": "its scoring was interrupted"}
        return status
    if (path / METRICS_FILE).is_file():
        return {"status": COMPLETE, "message": None}
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path / CONFIG_FILE} not found: is {path} a bora_pyro run folder?")
    raise ValueError(f"{path} has neither {STATUS_FILE} nor {METRICS_FILE}: it is not a complete run folder")


def status_of(path: Path) -> str | None:
    """The status of a run folder (see :func:`read_status`), or None where there is no run folder yet."""
    try:
        return read_status(path)["status"]
    except (FileNotFoundError, ValueError):
        return None


def verified_status(path: Path) -> dict[str, Any]:
    """The status of the run folder ``path`` after the checks every command makes before it reads one:
    an interrupted replacement recovered (under the folder's lock, see ``folders.reading``), then every
    file checked against the manifest (a folder being scored: its stage-1 files). Raises
    :class:`CorruptFile` naming a changed file, FileNotFoundError if it is no run folder."""
    with reading(path, "run folder") as path:
        if not path.is_dir():
            raise FileNotFoundError(f"run folder {str(path)!r} does not exist")
        scoring = (path / SCORING).exists()
        if verify(path, only=STAGE1_FILES if scoring else None) is None:
            log.warning(
                "%s has no %s (written before bora_pyro recorded digests): its files are not checked", path, MANIFEST
            )
        status = read_status(path)
        if status["status"] == TRAINED and not (path / FIT_STATE_FILE).is_file():
            raise CorruptFile(f"{path} is marked trained but its fitted state {FIT_STATE_FILE} is missing")
        return status


def train_log(result: FitResult) -> pd.DataFrame:
    """One row per step: the objective, training NLL and prior terms, the gradient norm before clipping and the
    learning rate; the validation columns where validated."""
    losses = pd.DataFrame(result.state.losses)
    if losses.empty:
        columns = ["step", "loss_per_token", "train_nll_per_token", "train_ppl", "prior_per_token", "grad_norm", "lr"]
        losses = pd.DataFrame(columns=columns)
    evals = pd.DataFrame(
        result.state.evals,
        columns=["step", "valid_ppl", "valid_macro_ppl", "valid_loglik_per_token"] if not result.state.evals else None,
    )  # learned-tau runs add tau_median.<group> columns
    return losses.merge(evals, on="step", how="left")


def training_metrics(result: FitResult, bora: BoRA, corpus: Corpus, tau: Any, processes: int) -> dict[str, Any]:
    """The part of metrics.json that the fit alone determines."""
    return {
        "tau": tau,
        "mode": bora.mode,
        "lr": result.lr,
        "steps": result.state.step,
        "best_step": result.state.best_step,
        "stopped_early": result.stopped_early,
        "train_seconds": result.state.train_seconds,
        "eval_seconds_during_training": result.state.eval_seconds,
        "train_tokens": result.state.train_tokens,
        "train_tokens_per_second": result.state.tokens_per_second,
        "num_tasks": len(corpus.tasks),
        "lora_parameters_per_task": bora.lora.num_parameters(),
        "device": str(bora.device),
        "processes": processes,
    }


def run_config(spec_dict: dict, corpus: Corpus, base_model: dict, extra: dict | None = None) -> dict:
    """config.json: the run spec (a valid ``--config``), the tasks, versions and the base model's identity."""
    return {
        "format": RUN_FORMAT,
        "bora_pyro_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "tasks": list(corpus.tasks),
        **spec_dict,
        "base_model": base_model,
        **(extra or {}),
    }


def write_fitted(
    out: Path,
    config: dict,
    bora: BoRA,
    corpus: Corpus,
    result: FitResult,
    metrics: dict,
    status: str,
    replace: bool,
    fingerprint: str | None = None,
    sources: tuple[Path, ...] = (),
    tokenizer=None,
) -> None:
    """Stage 1: write the whole folder with the fitted state (atomically), status ``status``; ``replace`` and
    ``sources``: the run's target as claimed before training (``runs.checkpoints.RunTarget``), verified again
    here under the folder's lock (``fingerprint``: the digest of what the run's checkpoints must match, see
    ``runs.fingerprint_id``; ``tokenizer``: the one trained with, kept in the folder)."""
    with atomic_folder(out, "run", replace, run_entries(out), sources, unhashed=(TASK_STORE_FOLDER,)) as tmp:
        write_json(tmp / CONFIG_FILE, config)
        write_json(
            tmp / CORPUS_FILE,
            {
                "sha256": corpus.content_sha256(),
                "splits": corpus.split_digests(),
                "input_format": corpus.input_format.to_dict(),
            },
        )
        pd.DataFrame(corpus.document_digests(), columns=["split", "task", "digest"]).to_csv(
            tmp / DOCUMENTS_FILE, index=False
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_FOLDER))
        if corpus.input_format.chat_template is not None:  # every later command renders with this one
            (tmp / CHAT_TEMPLATE_FILE).write_text(corpus.input_format.chat_template, encoding="utf-8")
        save_adapters(
            tmp / ADAPTERS_FILE,
            corpus.tasks,
            iter_task_factors(bora, export=True),  # in chunks of tasks: never every adapter at once
            bora.global_factors(),
            {"rank": bora.lora.rank, "alpha": bora.lora.alpha, "targets": bora.lora.paths(), "tau": bora.tau},
            shapes=bora.lora.shapes(),
        )
        save_file(bora.state_dict(), str(tmp / FIT_STATE_FILE))
        if bora.task_store.disk:  # its files are the fitted task rows: linked in, not copied
            bora.task_store.flush()
            bora.task_store.link_into(tmp / TASK_STORE_FOLDER)
        train_log(result).to_csv(tmp / TRAIN_LOG_FILE, index=False)
        write_json(tmp / METRICS_FILE, metrics)
        write_json(
            tmp / STATUS_FILE,
            {
                "status": status,
                "message": result.message,
                "step": result.state.step,
                "best_step": result.state.best_step,
                "fingerprint": fingerprint,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )


def fit_state(path: Path) -> dict[str, torch.Tensor]:
    """The fitted parameters saved by :func:`write_fitted` (present until the run is complete)."""
    file = Path(path) / FIT_STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: the run's fitted state is needed to score it")
    state = load_file(str(file))
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CorruptFile(f"{file}: the fitted parameter {name!r} holds non-finite values; it cannot be scored")
    return state


def read_metrics(path: Path) -> dict[str, Any]:
    """A run folder's metrics.json (a JSON object, else :class:`CorruptFile`)."""
    metrics = read_json(Path(path) / METRICS_FILE)
    if not isinstance(metrics, dict):
        raise CorruptFile(f"{Path(path) / METRICS_FILE} is not a JSON object of metrics")
    return metrics


def write_scores(out: Path, scores: Scores, title: str, wall_seconds: float) -> dict:
    """Stage 2: add the scores to a ``trained`` folder (each file atomically), then mark it ``complete``
    and drop the fitted state. Returns the full metrics."""
    from ..evaluation.plots import (  # matplotlib: imported when a run is written
        plot_collapsed_tau,
        plot_gates,
        plot_guide_scales,
        plot_shrinkage,
        plot_training_curve,
    )

    journal = out / SCORING
    journal.touch()
    fsync_path(out)
    with atomic_write(out / PER_TASK_FILE) as tmp:
        scores.per_task.to_csv(tmp, index=False)
    with atomic_write(out / TEST_DOCS_FILE) as tmp:
        scores.test_docs.to_csv(tmp, index=False)
    if scores.collapsed is not None:
        tau_frame = scores.collapsed.posterior.to_frame()
        with atomic_write(out / TAU_POSTERIOR_FILE) as tmp:
            tau_frame.to_csv(tmp, index=False)
        with atomic_write(out / PRIOR_CHECK_FILE) as tmp:
            scores.collapsed.prior_check.to_csv(tmp, index=False)
        with atomic_write(out / TAU_FIGURE) as tmp:
            plot_collapsed_tau(tau_frame, tmp, read_metrics(out).get("tau"), f"{title}: collapsed posterior of τ")
        with atomic_write(out / SHRINKAGE_FIGURE) as tmp:
            plot_shrinkage(scores.per_task, tmp, f"{title}: shrinkage per task")
        if scores.collapsed.scale_histogram is not None:
            with atomic_write(out / SCALES_FIGURE) as tmp:
                plot_guide_scales(scores.collapsed.scale_histogram, scores.per_task.task, tmp, title)
    if scores.idata is not None:
        with atomic_write(out / POSTERIOR_FILE) as tmp:
            scores.idata.to_netcdf(str(tmp))
    if scores.gates is not None:
        with atomic_write(out / GATES_FILE) as tmp:
            scores.gates.to_csv(tmp, index=False)
        with atomic_write(out / GATES_FIGURE) as tmp:
            plot_gates(scores.gates, tmp, f"{title}: B-LoRA gates")
    with atomic_write(out / CURVE_FILE) as tmp:
        plot_training_curve(pd.read_csv(out / TRAIN_LOG_FILE), tmp, title)
    metrics = {**read_metrics(out), **scores.metrics}
    metrics["wall_seconds"] = metrics.get("wall_seconds", 0.0) + wall_seconds
    write_json(out / METRICS_FILE, metrics)
    status = read_json(out / STATUS_FILE)
    write_json(out / STATUS_FILE, {**status, "status": COMPLETE, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    written = [name for name in STAGE2_FILES if (out / name).is_file()]
    update_manifest(out, written, (FIT_STATE_FILE, TASK_STORE_FOLDER))
    journal.unlink()
    fsync_path(out)
    with contextlib.suppress(FileNotFoundError):
        (out / FIT_STATE_FILE).unlink()
    shutil.rmtree(out / TASK_STORE_FOLDER, ignore_errors=True)
    for leftover in out.glob(".*.tmp-*"):  # temporaries of a write a crash interrupted
        leftover.unlink(missing_ok=True)
    return metrics


def write_generation_scores(path: Path, scores: GenerationScores) -> None:
    """``evaluate --generate``: the answers and their scores (each file atomically, then the manifest; the
    caller holds the folder's lock)."""
    with atomic_write(path / GENERATION_FILE) as tmp:
        scores.examples.to_csv(tmp, index=False)
    with atomic_write(path / GENERATION_TASKS_FILE) as tmp:
        scores.per_task.to_csv(tmp, index=False)
    update_manifest(path, [GENERATION_FILE, GENERATION_TASKS_FILE])


def check_base_model(path: Path, config: dict, loaded: dict) -> None:
    """Refuse a base model whose weights differ from those the run's adapters were trained against."""
    recorded = (config.get("base_model") or {}).get("weights_sha256")
    if recorded is None:
        log.warning("%s records no base-model hash (written before bora_pyro recorded one): not checked", path)
        return
    if recorded != loaded["weights_sha256"]:
        raise ValueError(
            f"{path} was trained against other weights of {config.get('model')!r} than those loaded now "
            f"(sha256 {recorded[:12]}... recorded, {loaded['weights_sha256'][:12]}... loaded): the base model "
            "changed since (another revision, conversion or file); load the exact weights it was trained on"
        )


def corpus_changes(path: Path, corpus: Corpus) -> list[str]:
    """What differs between the corpus a run was trained on (its corpus.json and documents.csv) and ``corpus``,
    one phrase per split (e.g. "test: 2 task(s) changed ('a': 3 of 40 documents differ, 1 new; ...)"); empty if
    nothing (or nothing was recorded)."""
    file = Path(path) / CORPUS_FILE
    if not file.is_file():
        return []
    recorded, now = read_json(file)["splits"], corpus.split_digests()
    documents: dict | None = None  # read, and today's digested, only where a task changed
    changes = []
    for split in ("train", "valid", "test"):
        before, after = recorded.get(split, {}), now.get(split, {})
        changed = [t for t in before if t in after and before[t] != after[t]]
        if changed and documents is None:
            documents, current = _recorded_documents(path), _documents_by_task(corpus.document_digests())
        parts = {
            "changed": [_task_change(t, documents.get((split, t)), current.get((split, t), [])) for t in changed],
            "missing": [repr(t) for t in before if t not in after],
            "new": [repr(t) for t in after if t not in before],
        }
        said = [f"{len(n)} task(s) {label} ({_first(n)})" for label, n in parts.items() if n]
        if said:
            changes.append(f"{split}: " + "; ".join(said))
    return changes


def _documents_by_task(rows) -> dict[tuple[str, str], list[str]]:
    """(split, task) -> the digests of its documents, from (split, task, digest) rows."""
    out: dict[tuple[str, str], list[str]] = {}
    for split, task, digest in rows:
        out.setdefault((split, task), []).append(digest)
    return out


def _recorded_documents(path: Path) -> dict[tuple[str, str], list[str]]:
    """The run's documents.csv by (split, task) (empty for a folder written before it existed)."""
    file = Path(path) / DOCUMENTS_FILE
    if not file.is_file():
        return {}
    table = pd.read_csv(file, dtype=str, keep_default_na=False)
    return _documents_by_task(table[["split", "task", "digest"]].itertuples(index=False, name=None))


def _task_change(task: str, before: list[str] | None, after: list[str]) -> str:
    """``'a': 3 of 40 documents differ, 1 new`` (the recorded documents of a changed task against today's)."""
    if before is None:
        return repr(task)
    gone, added = Counter(before) - Counter(after), Counter(after) - Counter(before)
    n_gone, n_added = sum(gone.values()), sum(added.values())
    if not n_gone and not n_added:
        return f"{task!r}: the same documents in another order"
    replaced = min(n_gone, n_added)
    said = [f"{replaced} of {len(before)} documents differ"] if replaced else []
    said += [f"{n_added - replaced} new"] if n_added > replaced else []
    said += [f"{n_gone - replaced} gone"] if n_gone > replaced else []
    return f"{task!r}: {', '.join(said)}"


def recorded_input_format(path: Path) -> InputFormat | None:
    """The input format a run recorded in its corpus.json (None for a folder written before it did)."""
    file = Path(path) / CORPUS_FILE
    recorded = read_json(file).get("input_format") if file.is_file() else None
    return InputFormat(**recorded) if isinstance(recorded, dict) else None


def run_tokenizer(path: Path, spec):
    """The tokenizer a run was trained with, from its folder (None for a folder written before it kept one, or a
    model with remote code, whose tokenizer class is that code's)."""
    folder = Path(path) / TOKENIZER_FOLDER
    if not folder.is_dir() or spec.trust_remote_code:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def input_format_changes(path: Path, corpus: Corpus) -> list[str]:
    """The fields of the input format (data format, task prompt, loss mask, chat template, BOS) that differ
    between the run's corpus.json and ``corpus`` (empty if none, or none was recorded)."""
    file = Path(path) / CORPUS_FILE
    recorded = read_json(file).get("input_format") if file.is_file() else None
    if not isinstance(recorded, dict):
        return []
    now = corpus.input_format.to_dict()
    return [name for name in now if name in recorded and recorded[name] != now[name]]


def _first(said: list[str], k: int = 3) -> str:
    return "; ".join(said[:k]) + ("; ..." if len(said) > k else "")

"""Sweep the prior precision tau: one run per tau on the same split and seed, then the paper's tables.

``DIR/runs/tau=<tau>/`` holds each run folder (written atomically, so a finished tau is one whose
folder exists; it is not rerun). ``summarize_sweep`` writes ``tau_sweep.csv``, ``per_task.csv``,
``figure1.png`` ... ``figure5.png``, ``validation_curves.png`` and ``summary.md``. The best tau is
chosen on the validation split (token-weighted perplexity); numbers are reported on the test split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from .io.artifacts import read_json, write_json
from .io.folders import MARKER, folder_kind, folder_lock, mark, protected
from .models.prior import LEARN, parse_tau
from .runs import RunSpec, checkpoint_folder, resume_run, train_run
from .runs.run_files import COMPLETE, TRAINED, status_of

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"


def tau_label(tau: float) -> str:
    return f"{tau:g}"


def parse_taus(text: str) -> list[float]:
    """ "0,1,10,inf" -> [0.0, 1.0, 10.0, inf]; sorted, duplicates refused."""
    taus = [parse_tau(t.strip()) for t in text.split(",") if t.strip()]
    if LEARN in taus:
        raise ValueError("a sweep takes fixed taus; for a learned tau run: bora-pyro train --tau learn --inference vi")
    if not taus:
        raise ValueError(f"--taus needs at least one value, got {text!r}")
    if len(set(taus)) != len(taus):
        raise ValueError(f"--taus has duplicates: {text!r}")
    return sorted(taus)


def _spec_without_tau(spec: RunSpec) -> dict:
    """The sweep's shared settings (JSON values): the spec without tau and the device."""
    d = spec.settings()
    d["prior"] = {k: v for k, v in d["prior"].items() if k != "tau"}
    d.pop("device")
    return d


def known_base_test_ppl(folders: Sequence[Path]) -> list[float] | None:
    """The base model's per-task test perplexity from a complete run under ``folders`` (every run of a sweep
    shares the split and the base model, so it is scored once), or None."""
    for folder in folders:
        for run in sorted(Path(folder).glob("runs/tau=*")):
            if status_of(run) == COMPLETE and (run / "per_task.csv").is_file():
                return pd.read_csv(run / "per_task.csv").base_test_ppl.tolist()
    return None


def check_sweep_folder(out: str | Path) -> Path:
    """Refuse a sweep folder that could hold a user's files: a protected folder, or one not written by
    bora_pyro (a sweep is resumed in place, never replaced)."""
    out = Path(out)
    why = protected(out)
    if why is not None:
        raise FileExistsError(f"refusing to use {str(out)!r} as a sweep folder: it is {why}; choose a new folder")
    kind = folder_kind(out) if out.is_dir() and any(out.iterdir()) else "sweep"
    if kind != "sweep":
        what = "not a bora_pyro folder" if kind is None else f"a {kind} folder"
        raise FileExistsError(
            f"{str(out)!r} exists, is not empty and is {what}: a sweep is written only into a new, empty or "
            f"sweep folder (one with a {MARKER} of kind sweep); choose another --out"
        )
    return out


def run_sweep(
    spec: RunSpec, taus: Sequence[float], out: str | Path, base_test_ppl: list[float] | None = None
) -> pd.DataFrame:
    """Train one run per tau (skipping finished ones, resuming or completing unfinished ones) and
    summarise; returns the tau_sweep table. ``base_test_ppl``: the base model's per-task test perplexity
    on this split, if known (else read from the sweep's first complete run)."""
    out = check_sweep_folder(out)
    with folder_lock(out):
        out.mkdir(parents=True, exist_ok=True)
        settings = _spec_without_tau(spec)
        if (out / SWEEP_FILE).exists():  # compared after filling defaults, so older sweep files still match
            if _spec_without_tau(load_sweep_spec(out, spec.trust_remote_code)) != settings:
                raise ValueError(f"{out} holds a sweep with different settings; use another --out")
        else:
            mark(out, "sweep")
        write_json(out / SWEEP_FILE, {"spec": settings, "taus": sorted(set(taus) | set(_finished_taus(out)))})
        for tau in taus:
            folder = out / "runs" / f"tau={tau_label(tau)}"
            status = status_of(folder)
            if status == COMPLETE:
                log.warning("tau=%s already finished in %s: not rerun", tau_label(tau), folder)
                continue
            if status == TRAINED or (checkpoint_folder(folder) / "spec.json").is_file():
                print(f"sweep: continuing tau={tau_label(tau)} -> {folder}", flush=True)
                resume_run(folder, spec.trust_remote_code)
                continue
            print(f"sweep: training tau={tau_label(tau)} -> {folder}", flush=True)
            base_test_ppl = base_test_ppl or known_base_test_ppl([out])
            train_run(
                replace(spec, prior=replace(spec.prior, tau=tau)), folder, overwrite=True, base_test_ppl=base_test_ppl
            )
        return summarize_sweep(out)


def _finished_taus(out: Path) -> list[float]:
    return [parse_tau(p.name.split("=", 1)[1]) for p in (out / "runs").glob("tau=*") if status_of(p) == COMPLETE]


def collect(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Read every finished run: (tau table, per-task table, validation curves), sorted by tau."""
    rows, tasks, curves = [], [], []
    for tau in sorted(_finished_taus(out)):
        folder = out / "runs" / f"tau={tau_label(tau)}"
        m = read_json(folder / "metrics.json")
        rows.append(
            {
                "tau": tau,
                "mode": m["mode"],
                "lr": m["lr"],
                "steps": m["steps"],
                "best_step": m["best_step"],
                "wall_seconds": m["wall_seconds"],
                "train_seconds": m["train_seconds"],
                "valid_ppl": m["valid_ppl"],
                "valid_macro_ppl": m["valid_macro_ppl"],
                "test_ppl": m["test_ppl"],
                "test_macro_ppl": m["test_macro_ppl"],
                "base_test_ppl": m["base_test_ppl"],
            }
        )
        tasks.append(pd.read_csv(folder / "per_task.csv").assign(tau=tau))
        curves.append(pd.read_csv(folder / "train_log.csv").dropna(subset=["valid_ppl"]).assign(tau=tau))
    if not rows:
        raise ValueError(f"no finished runs under {out / 'runs'}")
    per_task = pd.concat(tasks, ignore_index=True)
    per_task = per_task[["tau"] + [c for c in per_task.columns if c != "tau"]]
    return pd.DataFrame(rows), per_task, pd.concat(curves, ignore_index=True)[["tau", "step", "valid_ppl"]]


def best_tau(table: pd.DataFrame) -> float:
    """The tau with the lowest validation perplexity (token-weighted)."""
    return float(table.loc[table.valid_ppl.idxmin(), "tau"])


def relative_improvement(per_task: pd.DataFrame, tau: float, reference: float) -> pd.Series | None:
    """Per task (ppl_reference - ppl_tau) / ppl_reference on test; None if the reference was not run."""
    by_tau = per_task.pivot(index="task", columns="tau", values="test_ppl")
    if reference not in by_tau.columns or tau not in by_tau.columns:
        return None
    return (by_tau[reference] - by_tau[tau]) / by_tau[reference]


def _markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    cell = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    return "\n".join(
        [header, rule] + ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    )


def summarize_sweep(out: str | Path) -> pd.DataFrame:
    """Write the sweep's tables, figures and summary.md from the finished runs in ``out``."""
    out = Path(out)
    table, per_task, curves = collect(out)
    table.to_csv(out / "tau_sweep.csv", index=False)
    per_task.to_csv(out / "per_task.csv", index=False)
    best = best_tau(table)
    improvements = {
        name: relative_improvement(per_task, best, ref)
        for name, ref in (("over tau=0", 0.0), ("over tau=inf", math.inf))
    }
    from .evaluation.plots import plot_sweep_figures  # matplotlib: imported when figures are drawn

    plot_sweep_figures(out, table, per_task, curves, best, improvements)
    shown = table[["tau", "mode", "lr", "steps", "best_step", "valid_ppl", "test_ppl", "test_macro_ppl"]].copy()
    shown["tau"] = shown["tau"].map(tau_label)
    shown["lr"] = shown["lr"].map(lambda v: f"{v:.3g}")
    pivot = per_task.pivot(index="task", columns="tau", values="test_ppl")
    pivot.columns = [f"tau={tau_label(t)}" for t in pivot.columns]
    sizes = per_task.drop_duplicates("task").set_index("task")["n_train_tokens"]
    pivot = pivot.loc[sizes.sort_values(ascending=False).index]
    pivot.insert(0, "train tokens", sizes.loc[pivot.index].astype(int).astype(str))
    lines = [
        "# tau sweep",
        "",
        f"Best tau on validation: **{tau_label(best)}** "
        f"(test perplexity {table.set_index('tau').loc[best, 'test_ppl']:.2f}, "
        f"token-weighted). Base model test perplexity: {table.base_test_ppl.iloc[0]:.2f}.",
        "",
        "## Overall (Table 1)",
        "",
        _markdown(shown),
        "",
        "## Per task, test perplexity (Table A.1)",
        "",
        _markdown(pivot.reset_index()),
        "",
    ]
    for name, values in improvements.items():
        if values is not None:
            lines.append(
                f"Mean relative improvement of tau={tau_label(best)} {name}: {100 * values.mean():.1f}% "
                f"(tasks improved: {(values > 0).sum()} of {len(values)})"
            )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return table


def load_sweep_spec(out: str | Path, trust_remote_code: bool = False) -> RunSpec:
    """The RunSpec of a sweep folder (tau: the default), to rerun the same settings with changes
    (``trust_remote_code``: your permission, never taken from the file)."""
    settings = read_json(Path(out) / SWEEP_FILE)["spec"]
    return RunSpec.from_dict({**settings, "device": "auto"}, trust_remote_code, str(Path(out) / SWEEP_FILE))

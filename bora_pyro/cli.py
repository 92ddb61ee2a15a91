"""The ``bora-pyro`` command line.

bora-pyro train    --model M --data C [--tau T|0|inf] [--inference map|vi] [--steps N] --out RUN
bora-pyro sweep    --model M --data C --taus 0,1,10,100,1000,inf --out DIR
bora-pyro adapt    RUN --data C --out RUN2
bora-pyro evaluate RUN [--split test]
bora-pyro export   RUN --format peft|merged [--task NAME] --out DIR
bora-pyro generate RUN --task NAME --prompt TEXT
bora-pyro diagnose RUN [RUN ...]

Exit codes: 0 done; 1 the fit diverged (the run folder holds its best validated state); 2 bad input or
usage; 3 an operating-system error (disk full, no permission, a read-only folder); 4 a file bora_pyro
wrote failed its check (changed since it was written, damaged, not finite); 75 another bora_pyro process
holds the folder (try again later); 130 interrupted (Ctrl-C); 128 + N killed by signal N.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import sys
from pathlib import Path

from safetensors import SafetensorError

from .data.formats import parse_messages
from .distributed import World, init_distributed
from .evaluation.collapsed import tau_posterior_line
from .evaluation.scoring import documents_line, scored_tasks_line
from .io.artifacts import read_json
from .io.export import export_merged, export_peft
from .io.folders import FolderBusy, atomic_write, check_target, folder_kind, folder_lock
from .io.integrity import CorruptFile, update_manifest
from .models.generation import check_sampling, task_indices
from .models.tau_prior import TauPrior
from .options import add_options, dest, parse_csv, section_values
from .runs import SECTIONS, RunSpec, RunStopped, adapt_run, complete_run, load_run, resume_run, train_run
from .runs.diagnose import COMPARE_BY, compare_folders, run_lines
from .runs.run_files import (
    COMPLETE,
    GENERATION_FILE,
    GENERATION_TASKS_FILE,
    LOO_FILE,
    TRAINED,
    verified_status,
    write_generation_scores,
)
from .runs.spec import TRUST_HELP
from .seed_sweep import parse_seeds, run_seed_sweep
from .sweep import best_tau, parse_taus, run_sweep


def _add_run_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Every field of :class:`RunSpec` and its sections as an option (``skip``: fields left out)."""
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="take the settings from a JSON file (a run folder's config.json works); options given on "
        "the command line override it",
    )
    add_options(p, RunSpec, "", skip=skip)
    for name, cls in SECTIONS.items():
        add_options(p.add_argument_group(name), cls, name, skip=skip)


def _spec_from_args(a: argparse.Namespace) -> RunSpec:
    sections = {name: cls(**section_values(a, cls, name)) for name, cls in SECTIONS.items()}
    top = {k: v for k, v in section_values(a, RunSpec, "").items() if k not in SECTIONS}
    return RunSpec(**top, **sections)


def _config_defaults(path: str, trust_remote_code: bool) -> dict:
    """A --config file's settings as parser defaults (by argparse destination); the file never grants
    trust_remote_code."""
    spec = RunSpec.from_dict(read_json(Path(path)), trust_remote_code, path)
    values = spec.to_dict()
    out = {dest("", k): v for k, v in values.items() if k not in SECTIONS and k != "trust_remote_code"}
    for name in SECTIONS:
        out.update({dest(name, k): v for k, v in values[name].items()})
    return out


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fit BoRA on a multi-task corpus and write a run folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument(
        "--resume",
        metavar="RUN",
        default=None,
        help="continue an interrupted run from its last checkpoint, or complete a run whose scoring did "
        "not finish (other options are ignored but --trust-remote-code)",
    )
    _add_run_options(p)
    p.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel over the processes of `torchrun --nproc_per_node N` / `accelerate launch` "
        "(gloo on CPU, nccl on GPU); --batch-size is the global batch",
    )
    p.set_defaults(func=_train)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="one run per tau on the same split; the paper's tables and figures",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="sweep folder (resumable: finished taus are not rerun)")
    p.add_argument("--taus", default="0,1,10,100,1000,inf", help="comma-separated precisions (0 and inf allowed)")
    p.add_argument(
        "--seeds",
        default=None,
        metavar="S,S,...",
        help="repeat the sweep for these training seeds on one split (--split-seed, default: --seed) into "
        "OUT/seed=S/, and report mean ± sd over seeds with paired differences",
    )
    _add_run_options(p, skip=("tau",))
    p.set_defaults(func=_sweep)


def _sweep(a: argparse.Namespace) -> None:
    if a.seeds is not None:
        stats = run_seed_sweep(_spec_from_args(a), parse_taus(a.taus), parse_seeds(a.seeds), a.out)
        shown = stats[["tau", "seeds", "valid_ppl_mean", "test_ppl_mean", "test_ppl_sd", "test_macro_ppl_mean"]]
        print(shown.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
        print(f"tables (mean ± sd over seeds, paired differences), figures and summary.md in {a.out}")
        return
    table = run_sweep(_spec_from_args(a), parse_taus(a.taus), a.out)
    shown = table[["tau", "mode", "lr", "best_step", "valid_ppl", "test_ppl", "test_macro_ppl"]]
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"best tau on validation: {best_tau(table):g}; tables, figures and summary.md in {a.out}")


def _train(a: argparse.Namespace) -> None:
    if a.distributed:
        init_distributed()
    if a.resume:
        a.out = a.resume
        metrics = resume_run(a.resume, a.trust_remote_code)
    elif not a.out:
        raise ValueError("train needs --out RUN (or --resume RUN)")
    else:
        metrics = train_run(_spec_from_args(a), a.out, overwrite=a.overwrite)
    if not World.current().is_main:
        return
    print(f"wrote {a.out}")
    if math.isnan(float(metrics["test_ppl"])):
        print("test perplexity: none (no task has test documents)")
    else:
        print(
            f"test perplexity: {metrics['test_ppl']:.2f} (task-macro {metrics['test_macro_ppl']:.2f}); "
            f"base model: {metrics['base_test_ppl']:.2f} (task-macro {metrics['base_test_macro_ppl']:.2f})"
        )
    if "documents" in metrics:
        print(documents_line(metrics["documents"], "test"))
    if scored_tasks_line(metrics):
        print(scored_tasks_line(metrics))
    if "data_format" in metrics:
        print(f"data: {metrics['data_format']}")
    for line in (tau_posterior_line(metrics), metrics.get("guide_scale_warning")):
        if line:
            print(line)
    print(
        f"{metrics['steps']} steps in {metrics['train_seconds']:.0f} s of training "
        f"({metrics['train_tokens_per_second']:.0f} tokens/s), {metrics['wall_seconds']:.0f} s in all"
    )


ADAPT_CORPUS = ("books", "task_column", "text_column", "max_train_docs", "max_eval_docs")
ADAPT_TRAIN = ("steps", "lr", "eval_every", "progress")


def _add_adapt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapt", help="fit adapters for new tasks under a run's prior N(Theta, 1/tau), Theta fixed")
    p.add_argument("run", help="source run folder (fixed finite tau)")
    p.add_argument(
        "--data",
        required=True,
        help="the new tasks: bible-books, csv:PATH, jsonl:PATH, datasets:NAME_OR_PATH, ton:PATH",
    )
    p.add_argument("--out", required=True, help="run folder to create for the new tasks")
    p.add_argument("--overwrite", action="store_true", help="replace a run folder bora_pyro wrote")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    g = p.add_argument_group(
        "settings of the new tasks", "every other setting, and these when not given, are the source run's"
    )
    add_options(g, SECTIONS["corpus"], "corpus", only=ADAPT_CORPUS, suppress_defaults=True)
    add_options(g, SECTIONS["train"], "train", only=ADAPT_TRAIN, suppress_defaults=True)
    p.set_defaults(func=_adapt)


def _adapt(a: argparse.Namespace) -> None:
    metrics = adapt_run(
        a.run,
        a.data,
        a.out,
        a.overwrite,
        section_values(a, SECTIONS["corpus"], "corpus"),
        section_values(a, SECTIONS["train"], "train"),
        a.trust_remote_code,
    )
    print(f"wrote {a.out}")
    print(f"test perplexity of the new tasks: {metrics['test_ppl']:.2f}; base model: {metrics['base_test_ppl']:.2f}")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="per-task and overall perplexity of a run on a split")
    p.add_argument("run", help="run folder written by 'bora-pyro train'")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test")
    p.add_argument(
        "--data",
        default=None,
        metavar="C",
        help="score this corpus (the run's tasks, read with the run's corpus settings) instead of the run's own, "
        "which must be unchanged since training",
    )
    p.add_argument(
        "--generate",
        type=int,
        default=None,
        metavar="N",
        help="also answer the first N held-out examples of each task greedily (mixed-task batches) and score the "
        f"answers with chrF and exact match (sacrebleu): written to RUN/{GENERATION_FILE} and "
        f"RUN/{GENERATION_TASKS_FILE} (prompt-completion or messages data)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="--generate: tokens generated per answer at most")
    p.add_argument("--device", default=None, help="override the run's device")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_evaluate)


def _evaluate(a: argparse.Namespace) -> None:
    if a.generate is not None:  # before the run is loaded
        if a.generate < 1 or a.max_new_tokens < 1:
            raise ValueError(f"--generate and --max-new-tokens must be >= 1, got {a.generate} and {a.max_new_tokens}")
        if a.data is not None or a.split == "train":
            raise ValueError(
                "--generate answers the run's own held-out examples: use it without --data, on valid or test"
            )
    run = load_run(a.run, device=a.device, trust_remote_code=a.trust_remote_code)  # recovered and checked once
    if run.status == TRAINED:
        print(f"{a.run} is trained but was never scored completely: scoring it now", file=sys.stderr)
        complete_run(a.run, a.trust_remote_code, a.device)
        run = load_run(a.run, device=a.device, trust_remote_code=a.trust_remote_code)
    if run.status != COMPLETE:
        print(
            f"note: {a.run} is marked {run.status}: its adapters are the best validated state before it stopped",
            file=sys.stderr,
        )
    if a.generate is not None and run.input_format.data_format == "text":
        raise ValueError(
            f"--generate scores answers to prompts: {a.run} was trained on text data, not prompt-completion or messages"
        )
    report = run.evaluate(a.split, data=a.data)
    if a.split != "train" and a.data is None:
        print(documents_line(run.corpus.documents(), a.split), file=sys.stderr)
    generated = None if a.generate is None else _score_generations(a, run)
    if a.json:
        summary = {"split": a.split, **report.summary(), "per_task": report.to_frame().to_dict(orient="records")}
        if generated is not None:
            summary["generation"] = {**generated.metrics(), "per_task": generated.per_task.to_dict(orient="records")}
        print(json.dumps(_json_safe(summary), default=float, indent=2))
        return
    print(report.to_frame().to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    print(f"{a.split}: token-weighted perplexity {report.token_weighted:.2f}, task-macro {report.task_macro:.2f}")
    if generated is not None:
        print(generated.per_task.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        print(
            f"{a.split}, {len(generated.examples)} greedy answers: chrF {generated.chrf:.2f} (task-macro "
            f"{generated.chrf_macro:.2f}), exact match {generated.exact_match:.3f}; "
            f"wrote {Path(a.run) / GENERATION_FILE}"
        )


def _json_safe(value):
    """``value`` with every NaN float as null (strict JSON has no NaN: a task without held-out documents)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _score_generations(a: argparse.Namespace, run):
    """``evaluate --generate N``: score the answers and write them into the run folder (under its lock)."""
    scores = run.generation_scores(a.generate, a.split, a.max_new_tokens)
    with folder_lock(run.path):
        verified_status(run.path)
        write_generation_scores(run.path, scores)
    return scores


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write every task's adapter (and Theta as 'global') in PEFT's LoRA format")
    p.add_argument("run", help="run folder written by 'bora-pyro train'")
    p.add_argument(
        "--format",
        choices=("peft", "merged"),
        default="peft",
        help="peft: one adapter folder per task; merged: a full model with --task merged in",
    )
    p.add_argument("--task", default=None, help="--format merged: the task to merge ('global' = Theta)")
    p.add_argument(
        "--tasks",
        type=parse_csv,
        default=None,
        metavar="A,B,...",
        help="--format peft: export these tasks only ('global' = Theta; default: every task and Theta)",
    )
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an export folder bora_pyro wrote")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_export)


def _export(a: argparse.Namespace) -> None:
    kind = "export" if a.format == "peft" else "merged"
    bits = RunSpec.from_run_folder(a.run, a.trust_remote_code).quantized_bits if a.format == "merged" else None
    if bits is not None:
        raise ValueError(
            f"--format merged folds an adapter into the base weights, and {a.run}'s base was loaded in {bits}-bit "
            "(bitsandbytes): export --format peft and merge into the full-precision model (PEFT's merge_and_unload)"
        )
    a.out = check_target(Path(a.out), a.overwrite, kind, sources=(Path(a.run),))  # before the model is loaded
    with folder_lock(a.out):
        _export_locked(a)


def _export_locked(a: argparse.Namespace) -> None:
    run = load_run(a.run, device="cpu", trust_remote_code=a.trust_remote_code)
    if a.format == "merged":
        if a.task is None:
            raise ValueError("--format merged needs --task NAME (or --task global)")
        (d,) = task_indices(run.bora.tasks, [a.task], run.global_factors is not None)
        factors = run.global_factors if d == len(run.bora.tasks) else {k: v[0] for k, v in run.rows([d]).items()}
        export_merged(
            run.bora.lora,
            run.tokenizer,
            factors,
            a.out,
            overwrite=a.overwrite,
            task=a.task,
            input_format=run.input_format,
        )
        print(f"wrote {a.out}: {run.spec.model} with the adapter of task {a.task!r} merged in")
        return
    base = run.base_model or {}
    folders = export_peft(
        run.bora.lora,
        run.bora.tasks,
        run.rows,
        run.global_factors,
        base.get("hub_id") or base.get("path") or run.spec.model,
        a.out,
        overwrite=a.overwrite,
        note=base.get("note"),
        only=a.tasks,
        input_format=run.input_format,
    )
    print(
        f"wrote {len(folders)} PEFT adapters to {a.out} (task -> folder map in tasks.json); load one with "
        f"peft.PeftModel.from_pretrained(base_model, '{Path(a.out) / next(iter(folders.values()))}')"
    )


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with one task's adapter ('global' = Theta)")
    p.add_argument("run", help="run folder written by 'bora-pyro train'")
    p.add_argument("--task", required=True, help="task name, or 'global'")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument(
        "--prompt",
        help="text to continue (a text run) or to answer (a prompt-completion run; a conversational run: as the "
        "user's message), encoded as in training: BOS, the run's task prompt, its chat template",
    )
    given.add_argument(
        "--messages",
        type=_messages_option,
        metavar="JSON",
        help='a conversation to answer (conversational runs), e.g. \'[{"role": "user", "content": "Hi"}]\': '
        "rendered with the run's chat template and its generation prompt",
    )
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="override the run's device")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_generate)


def _generate(a: argparse.Namespace) -> None:
    check_sampling(a.max_new_tokens, a.temperature, a.top_p, a.seed)  # before the run is loaded
    run = load_run(a.run, device=a.device, trust_remote_code=a.trust_remote_code)
    conversational = run.input_format.conversational
    if a.messages is not None and not conversational:
        raise ValueError(
            f"{a.run} was trained on {run.input_format.data_format} data, not conversations: give --prompt TEXT"
        )
    prompt = a.messages or ([{"role": "user", "content": a.prompt}] if conversational else a.prompt)
    text = run.generate(
        [prompt],
        [a.task],
        max_new_tokens=a.max_new_tokens,
        do_sample=not a.greedy,
        temperature=a.temperature,
        top_p=a.top_p,
        seed=a.seed,
    )[0]
    print(a.prompt + text if run.input_format.data_format == "text" else text)


def _messages_option(text: str) -> list[dict]:
    """``--messages JSON``: a conversation, checked like a corpus' messages cell."""
    try:
        return list(parse_messages(text, "--messages", "messages", "generate"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("generate: --messages: ")) from None


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose",
        help="a run's tau posterior, shrinkage per task and prior check (ArviZ plots with posterior.nc); "
        "several runs: compared by held-out elpd with paired standard errors",
    )
    p.add_argument("runs", nargs="+", help="run folders (or a posterior.nc file, for its ArviZ summary only)")
    p.add_argument(
        "--by",
        choices=tuple(COMPARE_BY),
        default="elpd",
        help="several runs: compare by the log predictive density of the test documents (elpd: averaged over the "
        "guide's draws, the plug-in for MAP), the plug-in adapters', or the tau-averaged adapters'",
    )
    p.add_argument(
        "--tau-prior",
        default=None,
        metavar="SPEC",
        help="also show each run's tau posterior under this hyperprior (lognormal:LOC,SCALE or gamma:SHAPE,RATE): "
        "its grid reweighted, nothing refitted",
    )
    p.add_argument("--out", default=None, help="where to write compare.csv (default: the first run folder)")
    p.set_defaults(func=_diagnose)


def _diagnose(a: argparse.Namespace) -> None:
    if a.tau_prior is not None:
        TauPrior.parse(a.tau_prior)  # a bad spec is refused before any run is read
    targets = []  # (argument, its run folder or the posterior file's folder, loose)
    for path in a.runs:
        folder = Path(path).parent if Path(path).is_file() else Path(path)
        targets.append((path, folder, Path(path).is_file() and folder_kind(folder) != "run"))
    if len(targets) > 1 and any(loose for *_, loose in targets):
        raise ValueError("compare needs run folders (a posterior.nc file alone holds no test documents)")
    folders: list[tuple[str, Path]] = []
    for path, folder, loose in targets:
        print(f"== {path}")
        with contextlib.nullcontext() if loose else folder_lock(folder):  # the plots go into the run folder
            if not loose:
                verified_status(folder)  # recovered; its files checked against the run's manifest
                for line in run_lines(folder, a.tau_prior):
                    print(line)
                names = [n for n, _ in folders]
                name = folder.name if folder.name not in names else str(folder.resolve())
                folders.append((name if name not in names else f"{name} ({len(folders) + 1})", folder))
            _arviz(path, folder, loose)
    if len(folders) > 1:
        table = compare_folders(folders, a.by)
        out = Path(a.out) if a.out else folders[0][1]
        out.mkdir(parents=True, exist_ok=True)
        with folder_lock(out):
            with atomic_write(out / "compare.csv") as tmp:
                table.to_csv(tmp)
            update_manifest(out, ["compare.csv"])
        print(
            f"== compared by {a.by} of the {int(table.docs.iloc[0])} test documents (higher is better; elpd_diff: "
            "the best's minus this run's, with paired standard errors over documents and over tasks; mc_se: the "
            "Monte Carlo error of a run's elpd from its draws)"
        )
        print(table.to_string(float_format=lambda x: f"{x:.4g}"))
        print(f"wrote {out / 'compare.csv'}")


def _arviz(path: str, folder: Path, loose: bool) -> None:
    """The ArviZ summary and plots of a run's posterior.nc, if it has one (or of a loose posterior.nc file)."""
    if not loose and not (folder / "posterior.nc").is_file():
        print("no posterior.nc (train with --posterior-samples N for ArviZ plots)")
        return
    from .evaluation import diagnostics  # ArviZ is slow to import: only for this command

    idata = diagnostics.load(path)
    print(diagnostics.summary(idata).to_string(float_format=lambda x: f"{x:.4g}"))
    written = diagnostics.plot(idata, folder)
    loo = diagnostics.loo_training(idata)
    if loo is not None:  # training documents only: LOO is not defined on held-out ones
        print(loo.line())
        for said in loo.warnings:
            print(f"  ArviZ: {said}")
        with atomic_write(folder / LOO_FILE) as tmp:
            loo.pointwise.to_csv(tmp, index_label="train_doc")
        written.append(folder / LOO_FILE)
    update_manifest(folder, [w.name for w in written])
    print("wrote: " + ", ".join(str(w) for w in written))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bora-pyro", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_sweep, _add_adapt, _add_evaluate, _add_export, _add_generate, _add_diagnose):
        add(sub)
    parser.set_defaults(commands=sub.choices)  # name -> sub-parser, for --config
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; with ``--config FILE`` the file's settings become the defaults and parsing is redone,
    so that options given on the command line win."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        args.commands[args.command].set_defaults(**_config_defaults(args.config, args.trust_remote_code))
        args = parser.parse_args(argv)
    return args


EXIT_USAGE, EXIT_OS, EXIT_CORRUPT, EXIT_BUSY = 2, 3, 4, 75  # see the module docstring (1: RunStopped's own)


def _one_line(err: BaseException) -> str:
    """An error's message on one line (a library's multi-line message folded)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 2000 else text[:2000] + "..."


def _out_of_memory(err: BaseException) -> bool:
    """A failed allocation (host or accelerator), as opposed to a bug."""
    import torch

    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)


def _terminate(signum: int, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: temporary files are removed on the way out


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as usage:  # argparse printed the usage error (or --help)
        return int(usage.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        args = _parse(argv)
        args.func(args)
    except SystemExit as usage:  # a usage error in the re-parse with --config's defaults
        return int(usage.code or 0)
    except RunStopped as stop:
        if World.current().is_main:
            print(f"bora-pyro {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(
            f"bora-pyro {args.command}: interrupted; what was complete stays written, nothing half-written is left",
            file=sys.stderr,
        )
        return 130
    except (CorruptFile, SafetensorError) as err:
        print(f"bora-pyro {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_CORRUPT
    except FolderBusy as err:
        print(f"bora-pyro {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BUSY
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ModuleNotFoundError) as err:
        print(f"bora-pyro {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise  # a bug: its traceback is what a report needs
        print(f"bora-pyro {args.command}: system error: out of memory ({_one_line(err)[:300]})", file=sys.stderr)
        return EXIT_OS
    except OSError as err:  # the disk is full, a folder is read-only, no permission...
        where = f" ({err.filename})" if err.filename and str(err.filename) not in str(err) else ""
        print(f"bora-pyro {args.command}: system error: {_one_line(err)}{where}", file=sys.stderr)
        return EXIT_OS
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``bora-pyro`` command line.

    bora-pyro train    --model M --data C [--tau T|0|inf] [--inference map|vi] [--steps N] --out RUN
    bora-pyro sweep    --model M --data C --taus 0,1,10,100,1000,inf --out DIR
    bora-pyro adapt    RUN --data C --out RUN2
    bora-pyro evaluate RUN [--split test]
    bora-pyro export   RUN --format peft|merged [--task NAME] --out DIR
    bora-pyro generate RUN --task NAME --prompt TEXT
    bora-pyro diagnose RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from .data.corpus import CORPUS_FORMS, CorpusConfig
from .distributed import World, init_distributed
from .export import export_merged, export_peft
from .generation import task_indices
from .inference.config import TrainConfig
from .models.gates import QUANT_MODES, RANK_MODES
from .models.guides import INFERENCE
from .models.prior import PARAMETERIZATIONS
from .folders import FolderBusy, check_target, folder_lock
from .run_folder import COMPLETE, TRAINED, read_status
from .runs import AdapterConfig, RunSpec, RunStopped, adapt_run, complete_run, load_run, resume_run, train_run
from .scoring import documents_line
from .sweep import best_tau, parse_taus, run_sweep

TRUST_HELP = ("allow the model's own Python code (from its hub repository) to run; off by default, only for models "
              "you trust. Never taken from a run folder: a run trained with it needs it again")


def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "all") else int(text)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``sweep`` (everything but tau and the output)."""
    d_corpus, d_adapter, d_train = CorpusConfig(), AdapterConfig(), TrainConfig()
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (embedded), tiny-random-llama (tests), or a HF id / local path")
    p.add_argument("--data", default="bible-books", help=f"corpus: {', '.join(CORPUS_FORMS)}")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA init, batch order and guide draws (and of "
                   "the data split unless --split-seed is given)")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the train/valid/test split (default: --seed); fix it to score several training "
                        "seeds on one test set")
    g = p.add_argument_group("corpus")
    g.add_argument("--max-tokens", type=int, default=d_corpus.max_tokens, help="tokens per document")
    g.add_argument("--long-documents", choices=("split", "truncate"), default=d_corpus.long_documents,
                   help="documents longer than --max-tokens: split into consecutive chunks, or truncate")
    g.add_argument("--valid-fraction", type=float, default=d_corpus.valid_fraction)
    g.add_argument("--test-fraction", type=float, default=d_corpus.test_fraction)
    g.add_argument("--max-train-docs", type=_optional_int, default=d_corpus.max_train_docs,
                   help="cap on training documents per task ('none' = no cap)")
    g.add_argument("--max-eval-docs", type=_optional_int, default=d_corpus.max_eval_docs,
                   help="cap on validation and on test documents per task ('none' = no cap)")
    g.add_argument("--task-prompt", default=None, help="masked prompt before each document, e.g. '{task}: '")
    g.add_argument("--task-column", default=d_corpus.task_column, help="csv/jsonl/datasets: task column")
    g.add_argument("--text-column", default=d_corpus.text_column, help="csv/jsonl/datasets: text column")
    g.add_argument("--translation", default=d_corpus.translation, help="bible-books: pythonbible version (wyc, kjv...)")
    g.add_argument("--books", type=_csv_list, default=None, help="bible-books: comma-separated titles, or 'all'")
    g.add_argument("--num-tasks", type=int, default=None, help="keep the first N tasks (ton: speakers, default 25)")
    g.add_argument("--ton-selection", choices=("paper", "reference"), default=d_corpus.ton_selection,
                   help="ton: first speakers with > 100 speeches (paper) or 200 < n < 1000 in name order (reference)")
    g.add_argument("--min-words", type=int, default=d_corpus.min_words, help="ton: drop shorter speeches")
    g = p.add_argument_group("adapter model")
    g.add_argument("--rank", type=int, default=d_adapter.rank)
    g.add_argument("--alpha", type=float, default=d_adapter.alpha)
    g.add_argument("--targets", type=_csv_list, default=None, help="module-name suffixes to adapt (default by model type)")
    g.add_argument("--parameterization", choices=PARAMETERIZATIONS, default=d_adapter.parameterization)
    g.add_argument("--inference", choices=INFERENCE, default=d_adapter.inference,
                   help="map: AutoDelta (the paper's MAP); vi: AutoNormal")
    g.add_argument("--tau-prior", default=d_adapter.tau_prior,
                   help="hyperprior of --tau learn: lognormal:LOC,SCALE (of log tau) or gamma:SHAPE,RATE")
    g.add_argument("--tau-groups", choices=("global", "module"), default=d_adapter.tau_groups,
                   help="--tau learn: one tau, or one per module type (q_proj, v_proj...)")
    g.add_argument("--global-prior", default=d_adapter.global_prior,
                   help="Theta: flat (a parameter, empirical Bayes) or normal:SCALE (a latent site, inferred)")
    g.add_argument("--init-peft", default=None, metavar="DIR",
                   help="start Theta and every task from this PEFT LoRA adapter (same rank and target modules)")
    g.add_argument("--task-subsampling", action=argparse.BooleanOptionalAction, default=d_adapter.task_subsampling,
                   help="a step samples, scores and updates only the tasks of its batch, their prior terms weighted "
                        "to an unbiased estimate (cost independent of the number of tasks); --no-task-subsampling: "
                        "every task's prior term at every step")
    g.add_argument("--rank-gates", nargs="?", const="shared", choices=RANK_MODES, default=None,
                   help="B-LoRA: learn each block's rank with nested hard-concrete gates, shared by the tasks "
                        "(default when given) or per-task")
    g.add_argument("--quant-gates", nargs="?", const="weights", choices=QUANT_MODES, default=None,
                   help="B-LoRA: learn each block's precision (2-32 bits) of the LoRA factors (default when given) "
                        "and optionally of the layer's input activations")
    g.add_argument("--rank-lambda", type=float, default=d_adapter.rank_lambda,
                   help="penalty per expected open rank gate (B-LoRA's lambda; log prior of a gate, default 1)")
    g.add_argument("--quant-lambda", type=float, default=d_adapter.quant_lambda,
                   help="penalty per expected open precision gate (default 1)")
    g.add_argument("--gate-init", type=float, default=d_adapter.gate_init,
                   help="the gates' starting log-alpha: 3 = open with probability 0.99, relaxed below 1 a fifth "
                        "of the time; higher = less training noise at the start")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=d_train.steps)
    g.add_argument("--batch-size", type=int, default=d_train.batch_size)
    g.add_argument("--lr", type=float, default=d_train.lr)
    g.add_argument("--guide-lr", type=float, default=d_train.guide_lr,
                   help="learning rate of the guide's scales and a learned tau (--inference vi) and of the "
                        "B-LoRA gates' log-alphas")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=d_train.lr_schedule)
    g.add_argument("--weight-decay", type=float, default=d_train.weight_decay)
    g.add_argument("--clip-norm", type=float, default=d_train.clip_norm, help="global gradient-norm clip (0 = off)")
    g.add_argument("--lr-tau-scaling", action="store_true", help="the paper's rule: lr proportional to tau")
    g.add_argument("--lr-tau-reference", type=float, default=d_train.lr_tau_reference,
                   help="with --lr-tau-scaling, the tau that gets --lr")
    g.add_argument("--eval-every", type=int, default=d_train.eval_every, help="validate every N steps")
    g.add_argument("--patience", type=int, default=None, help="early stop after N validations without improvement")
    g.add_argument("--eval-batch-size", type=int, default=d_train.eval_batch_size)
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute decoder layers in the backward pass: less memory for long sequences, ~1 more forward")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast of the base LM (for GPUs)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--checkpoint-every", type=int, default=None,
                   help="save a resumable checkpoint every N steps (in RUN.checkpoint/)")
    g.add_argument("--posterior-samples", type=int, default=RunSpec().posterior_samples,
                   help="guide draws for posterior-predictive perplexity and ArviZ posterior.nc (0 = skip)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fit BoRA on a multi-task corpus and write a run folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", metavar="RUN", default=None,
                   help="continue an interrupted run from its last checkpoint, or complete a run whose scoring did "
                        "not finish (other options are ignored but --trust-remote-code)")
    p.add_argument("--tau", default="100",
                   help="prior precision: a number >= 0, 0 = independent, inf = pooled, learn = inferred (with --inference vi)")
    _add_run_options(p)
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the processes of `torchrun --nproc_per_node N` / `accelerate launch` "
                        "(gloo on CPU, nccl on GPU); --batch-size is the global batch")
    p.set_defaults(func=_train)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="one run per tau on the same split; the paper's tables and figures",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="sweep folder (resumable: finished taus are not rerun)")
    p.add_argument("--taus", default="0,1,10,100,1000,inf", help="comma-separated precisions (0 and inf allowed)")
    _add_run_options(p)
    p.set_defaults(func=_sweep)


def _sweep(a: argparse.Namespace) -> None:
    table = run_sweep(_spec_from_args(a, tau=0.0), parse_taus(a.taus), a.out)
    shown = table[["tau", "mode", "lr", "best_step", "valid_ppl", "test_ppl", "test_macro_ppl"]]
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"best tau on validation: {best_tau(table):g}; tables, figures and summary.md in {a.out}")


def _spec_from_args(a: argparse.Namespace, tau: str | float) -> RunSpec:
    corpus = CorpusConfig(
        max_tokens=a.max_tokens, long_documents=a.long_documents,
        seed=a.seed if a.split_seed is None else a.split_seed, valid_fraction=a.valid_fraction, test_fraction=a.test_fraction,
        max_train_docs=a.max_train_docs, max_eval_docs=a.max_eval_docs, task_prompt=a.task_prompt,
        task_column=a.task_column, text_column=a.text_column, translation=a.translation, books=a.books,
        num_tasks=a.num_tasks, ton_selection=a.ton_selection, min_words=a.min_words,
    )
    adapter = AdapterConfig(rank=a.rank, alpha=a.alpha, tau=tau, targets=a.targets,
                            parameterization=a.parameterization, inference=a.inference, init_seed=a.seed,
                            tau_prior=a.tau_prior, tau_groups=a.tau_groups,
                            global_prior=a.global_prior, init_peft=a.init_peft, task_subsampling=a.task_subsampling,
                            rank_gates=a.rank_gates, quant_gates=a.quant_gates, rank_lambda=a.rank_lambda,
                            quant_lambda=a.quant_lambda, gate_init=a.gate_init)
    train = TrainConfig(
        steps=a.steps, batch_size=a.batch_size, lr=a.lr, guide_lr=a.guide_lr, lr_schedule=a.lr_schedule, weight_decay=a.weight_decay,
        clip_norm=a.clip_norm or None, lr_tau_scaling=a.lr_tau_scaling, lr_tau_reference=a.lr_tau_reference,
        eval_every=a.eval_every, patience=a.patience, eval_batch_size=a.eval_batch_size, seed=a.seed,
        progress=not a.no_progress, checkpoint_every=a.checkpoint_every,
        gradient_checkpointing=a.gradient_checkpointing, bf16=a.bf16,
    )
    return RunSpec(model=a.model, data=a.data, device=a.device, corpus=corpus, adapter=adapter, train=train,
                   posterior_samples=a.posterior_samples, trust_remote_code=a.trust_remote_code)


def _train(a: argparse.Namespace) -> None:
    if a.distributed:
        init_distributed()
    if a.resume:
        a.out = a.resume
        metrics = resume_run(a.resume, a.trust_remote_code)
    elif not a.out:
        raise ValueError("train needs --out RUN (or --resume RUN)")
    else:
        metrics = train_run(_spec_from_args(a, a.tau), a.out, overwrite=a.overwrite)
    if not World.current().is_main:
        return
    print(f"wrote {a.out}")
    print(
        f"test perplexity: {metrics['test_ppl']:.2f} (task-macro {metrics['test_macro_ppl']:.2f}); "
        f"base model: {metrics['base_test_ppl']:.2f} (task-macro {metrics['base_test_macro_ppl']:.2f})"
    )
    if "documents" in metrics:
        print(documents_line(metrics["documents"], "test"))
    print(f"{metrics['steps']} steps in {metrics['train_seconds']:.0f} s of training "
          f"({metrics['train_tokens_per_second']:.0f} tokens/s), {metrics['wall_seconds']:.0f} s in all")


def _add_adapt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapt", help="fit adapters for new tasks under a run's prior N(Theta, 1/tau), Theta fixed",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="source run folder (fixed finite tau)")
    p.add_argument("--data", required=True, help=f"the new tasks: {', '.join(CORPUS_FORMS)}")
    p.add_argument("--out", required=True, help="run folder to create for the new tasks")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--books", type=_csv_list, default=None, help="bible-books: comma-separated titles")
    p.add_argument("--task-column", default=None)
    p.add_argument("--text-column", default=None)
    p.add_argument("--max-train-docs", type=_optional_int, default=None,
                   help="cap on training documents per new task (default: the source run's)")
    p.add_argument("--max-eval-docs", type=_optional_int, default=None,
                   help="cap on validation and test documents per new task (default: the source run's)")
    p.add_argument("--steps", type=int, default=None, help="default: the source run's")
    p.add_argument("--lr", type=float, default=None, help="default: the source run's")
    p.add_argument("--eval-every", type=int, default=None, help="default: the source run's")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_adapt)


def _adapt(a: argparse.Namespace) -> None:
    corpus = {k: v for k, v in {"books": a.books, "task_column": a.task_column, "text_column": a.text_column,
                                "max_train_docs": a.max_train_docs, "max_eval_docs": a.max_eval_docs}.items()
              if v is not None}
    train = {k: v for k, v in {"steps": a.steps, "lr": a.lr, "eval_every": a.eval_every}.items() if v is not None}
    if a.no_progress:
        train["progress"] = False
    metrics = adapt_run(a.run, a.data, a.out, a.overwrite, corpus, train, a.trust_remote_code)
    print(f"wrote {a.out}")
    print(f"test perplexity of the new tasks: {metrics['test_ppl']:.2f}; base model: {metrics['base_test_ppl']:.2f}")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="per-task and overall perplexity of a run on a split")
    p.add_argument("run", help="run folder written by 'bora-pyro train'")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test")
    p.add_argument("--device", default=None, help="override the run's device")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_evaluate)


def _evaluate(a: argparse.Namespace) -> None:
    if read_status(Path(a.run))["status"] == TRAINED:
        print(f"{a.run} is trained but was never scored completely: scoring it now", file=sys.stderr)
        complete_run(a.run, a.trust_remote_code, a.device)
    run = load_run(a.run, device=a.device, trust_remote_code=a.trust_remote_code)
    if run.status != COMPLETE:
        print(f"note: {a.run} is marked {run.status}: its adapters are the best validated state before it stopped",
              file=sys.stderr)
    report = run.evaluate(a.split)
    if a.split != "train":
        print(documents_line(run.corpus.documents(), a.split), file=sys.stderr)
    if a.json:
        print(json.dumps({"split": a.split, **report.summary(),
                          "per_task": report.to_frame().to_dict(orient="records")}, default=float, indent=2))
        return
    print(report.to_frame().to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    print(f"{a.split}: token-weighted perplexity {report.token_weighted:.2f}, task-macro {report.task_macro:.2f}")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write every task's adapter (and Theta as 'global') in PEFT's LoRA format")
    p.add_argument("run", help="run folder written by 'bora-pyro train'")
    p.add_argument("--format", choices=("peft", "merged"), default="peft",
                   help="peft: one adapter folder per task; merged: a full model with --task merged in")
    p.add_argument("--task", default=None, help="--format merged: the task to merge ('global' = Theta)")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an export folder bora_pyro wrote")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_export)


def _export(a: argparse.Namespace) -> None:
    check_target(Path(a.out), a.overwrite, "export folder")  # before the model is loaded
    with folder_lock(Path(a.out)):
        _export_locked(a)


def _export_locked(a: argparse.Namespace) -> None:
    run = load_run(a.run, device="cpu", trust_remote_code=a.trust_remote_code)
    if a.format == "merged":
        if a.task is None:
            raise ValueError("--format merged needs --task NAME (or --task global)")
        (d,) = task_indices(run.bora.tasks, [a.task], run.global_factors is not None)
        factors = run.global_factors if d == len(run.bora.tasks) else {k: v[d] for k, v in run.task_factors.items()}
        export_merged(run.bora.lora, run.tokenizer, factors, a.out, overwrite=a.overwrite)
        print(f"wrote {a.out}: {run.spec.model} with the adapter of task {a.task!r} merged in")
        return
    base = run.base_model or {}
    folders = export_peft(run.bora.lora, run.bora.tasks, run.task_factors, run.global_factors,
                          base.get("hub_id") or base.get("path") or run.spec.model, a.out, overwrite=a.overwrite,
                          note=base.get("note"))
    print(f"wrote {len(folders)} PEFT adapters to {a.out} (task -> folder map in tasks.json); load one with "
          f"peft.PeftModel.from_pretrained(base_model, '{Path(a.out) / next(iter(folders.values()))}')")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with one task's adapter ('global' = Theta)")
    p.add_argument("run", help="run folder written by 'bora-pyro train'")
    p.add_argument("--task", required=True, help="task name, or 'global'")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="override the run's device")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_generate)


def _generate(a: argparse.Namespace) -> None:
    run = load_run(a.run, device=a.device, trust_remote_code=a.trust_remote_code)
    text = run.generate([a.prompt], [a.task], max_new_tokens=a.max_new_tokens, do_sample=not a.greedy,
                        temperature=a.temperature, top_p=a.top_p, seed=a.seed)[0]
    print(a.prompt + text)


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="ArviZ summary and plots of runs; az.compare when given several")
    p.add_argument("runs", nargs="+", help="run folders holding posterior.nc")
    p.add_argument("--out", default=None, help="where to write compare.csv (default: the first run folder)")
    p.set_defaults(func=_diagnose)


def _diagnose(a: argparse.Namespace) -> None:
    from . import diagnostics  # ArviZ is slow to import: only for this command

    runs = {}
    for path in a.runs:
        name = Path(path).name
        if name in runs:
            name = str(path)
        runs[name] = diagnostics.load(path)
        print(f"== {path}")
        print(diagnostics.summary(runs[name]).to_string(float_format=lambda x: f"{x:.4g}"))
        written = diagnostics.plot(runs[name], Path(path))
        print("plots: " + ", ".join(str(w) for w in written))
    if len(runs) > 1:
        table = diagnostics.compare(runs)
        out = Path(a.out or a.runs[0])
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "compare.csv")
        print("== az.compare (PSIS-LOO on held-out test documents; higher elpd_loo is better)")
        print(table.to_string(float_format=lambda x: f"{x:.4g}"))
        print(f"wrote {out / 'compare.csv'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bora-pyro", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_sweep(sub)
    _add_adapt(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_generate(sub)
    _add_diagnose(sub)
    return parser


def _terminate(signum: int, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: temporary files are removed on the way out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        args.func(args)
    except RunStopped as stop:
        if World.current().is_main:
            print(f"bora-pyro {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"bora-pyro {args.command}: interrupted; what was complete stays written, nothing half-written "
              "is left", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError, KeyError, FolderBusy) as err:
        print(f"bora-pyro {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())

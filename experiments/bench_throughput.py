"""Training-step time and peak memory of multi-task LoRA, as ratios measured in one run.

Configurations (same batches: same tokens, rank, alpha and target modules):
  a  bora_pyro MAP step: the ``TrainStep`` that ``fit`` runs (SVI + AutoDelta, task subsampling,
     TaskSparseAdamW, finiteness checks, clipping), D = 25
  b  plain single-adapter PEFT LoRA step (the floor)
  c  the reference approach: PEFT with D = 25 adapters, one forward per task present (set_adapter)
  d  bora_pyro with D in {1, 10, 100, 1000}
  e  the step of (a) as a plain PyTorch loop without Pyro (Pyro's overhead)

Each configuration runs in its own process (peak memory is per process): median step time over
--steps steps after --warmup, and peak RSS (CPU) or peak allocated memory (CUDA).

    .venv/bin/python experiments/bench_throughput.py --model smollm2-135m --tokens 128
    .venv/bin/python experiments/bench_throughput.py --model tiny-random-llama --steps 3   # CI smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = ["b", "a", "e", "c", "d1", "d10", "d100", "d1000"]


def batch_for(tokenizer, num_tasks: int, batch_size: int, tokens: int, device):
    """A fixed mixed-task batch of random text ids (every example a different task where possible)."""
    from bora_pyro.data.batching import Batch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(len(tokenizer), 5000), (batch_size, tokens), generator=g)
    task = torch.arange(batch_size) % num_tasks
    docs_per_task = torch.full((num_tasks,), max(1, 100 * batch_size // num_tasks))  # a corpus of ~100 batches
    return Batch(
        ids, torch.ones_like(ids), ids.clone(), task, torch.arange(batch_size), int(docs_per_task.sum()), docs_per_task
    ).to(device)


def step_fn(config: str, args):
    """Build the model for ``config`` and return a closure running one training step."""

    import bora_pyro
    from bora_pyro.inference import TrainConfig
    from bora_pyro.inference.svi import TrainStep
    from bora_pyro.inference.task_sparse_adamw import TaskSparseAdamW
    from bora_pyro.models.likelihood import token_log_probs
    from bora_pyro.models.task_subsample import TaskSubsample

    device = bora_pyro.io.base_models.resolve_device(args.device)
    lm, tokenizer = bora_pyro.load_base_model(args.model, device=device)
    num_tasks = int(config[1:]) if config.startswith("d") else (1 if config == "b" else args.tasks)
    batch = batch_for(tokenizer, num_tasks, args.batch_size, args.tokens, device)
    if config in ("b", "c"):
        import peft

        cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = peft.get_peft_model(lm, cfg, adapter_name="t0")
        for d in range(1, num_tasks):
            model.add_adapter(f"t{d}", cfg)
        for n, p in model.named_parameters():  # every adapter trainable, as in the reference code
            p.requires_grad_("lora_" in n)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            if config == "b":
                loss = -token_log_probs(model(input_ids=batch.input_ids).logits, batch.labels).sum()
            else:  # one forward per task present, the reference code's loop
                loss = 0.0
                for d in batch.task_index.unique().tolist():
                    rows = batch.task_index == d
                    model.base_model.set_adapter(f"t{d}")
                    loss = (
                        loss - token_log_probs(model(input_ids=batch.input_ids[rows]).logits, batch.labels[rows]).sum()
                    )
            loss.backward()
            opt.step()

        return step

    bora = bora_pyro.BoRA(lm, [f"t{d}" for d in range(num_tasks)], rank=args.rank, alpha=args.alpha, tau=100.0)
    if config == "e":  # the same objective in plain PyTorch: non-centred z of the present tasks, Theta, weighted prior
        theta = {k: v.clone().requires_grad_() for k, v in bora.init.items()}
        z = {k: torch.zeros(num_tasks, *v.shape, device=device, requires_grad=True) for k, v in bora.init.items()}
        opt = TaskSparseAdamW(list(theta.values()) + list(z.values()), lr=1e-3, task_params=z.values())
        tasks = TaskSubsample.of(batch, num_tasks)
        present, local, weight = tasks.index, tasks.local, tasks.weight  # [P], [batch], [P]

        def step():
            opt.zero_grad(set_to_none=True)
            z_present = {k: v.index_select(0, present) for k, v in z.items()}
            factors = {k: theta[k] + z_present[k] / 10.0 for k in theta}
            loglik = bora.log_likelihood(factors, batch.replace(task_index=local)).sum() * batch.num_docs / len(batch)
            prior = sum((weight * -0.5 * v.flatten(1).square().sum(1)).sum() for v in z_present.values())
            (-(loglik + prior)).backward()
            opt.clip_grad_norm_(1.0, present)
            opt.step(present)

        return step

    train_step = TrainStep(bora, TrainConfig(), batch, total_tokens=int(batch.num_docs * args.tokens))  # fit's own step
    counter = iter(range(1, 10**9))

    def step():
        outcome = train_step(batch, next(counter))
        assert outcome.problem is None, outcome.problem

    return step


def run_one(config: str, args) -> dict:
    step = step_fn(config, args)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"config": config, "median_step_s": statistics.median(times), "peak_bytes": peak}


def main(args) -> None:
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    rows = {}
    passthrough = sys.argv[1:]
    for config in CONFIGS:
        out = subprocess.run([sys.executable, __file__, *passthrough, "--one", config], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"config {config} failed:\n{out.stderr[-2000:]}")
        rows[config] = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{config:>6}: {rows[config]['median_step_s'] * 1000:9.1f} ms/step, "
            f"peak {rows[config]['peak_bytes'] / 2**20:8.0f} MiB",
            flush=True,
        )
    t = {k: v["median_step_s"] for k, v in rows.items()}
    m = {k: v["peak_bytes"] for k, v in rows.items()}
    print(
        f"\n{args.model}, batch {args.batch_size} x {args.tokens} tokens, r={args.rank}, D={args.tasks} "
        f"(median of {args.steps} steps after {args.warmup} warm-up; one run)"
    )
    print(f"(a)/(b) bora_pyro D={args.tasks} vs single-adapter PEFT: {t['a'] / t['b']:.3f}")
    print(f"(a)/(e) bora_pyro vs the same step without Pyro:       {t['a'] / t['e']:.3f}")
    print(f"(c)/(a) reference per-task loop vs bora_pyro:          {t['c'] / t['a']:.3f}")
    print(f"(d) D=1000 vs D=1 step time:                            {t['d1000'] / t['d1']:.3f}")
    print(f"(d) D=1000 peak memory vs (b):                          {m['d1000'] / m['b']:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--tasks", type=int, default=25)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    main(parser.parse_args())

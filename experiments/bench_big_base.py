"""Peak memory and step time of BoRA on a model of real size: a random-initialised LLaMA of the Llama-3.2-1B
shape (built from its config, no download), D = 25 tasks, rank 8 on q_proj + v_proj (issue: models of real size).

Configurations, each in its own process (peak RSS is per process), in turn:

    f32         the frozen base in float32, one batch of --docs documents x --tokens tokens
    bf16        the frozen base in bfloat16 (--dtype bfloat16), the same batch
    f32/accum   float32, the same batch as --docs accumulated micro-batches of one document (--grad-accum)
    bf16/accum  bfloat16, likewise
    nf4         the frozen base in 4 bits (--load-in-4bit: bitsandbytes NF4, double quantisation, bfloat16
                compute; saved to --scratch first, as from_pretrained quantises a saved model), one batch

The timed step is ``bora_pyro.inference.svi.TrainStep`` (the step ``fit`` runs); its cost is the slope of the
wall time between --short and --long steps. Printed: per configuration the step time, the peak RSS of the
steps, the RSS after the model is built (freed memory returned by malloc_trim), bytes per base parameter (that
RSS minus the RSS before the build, and the parameters' own bytes, ``get_memory_footprint``: what a GPU holds),
and the ratios bf16 / f32, accum / one batch and nf4 / bf16 measured in this run. They feed the memory
estimates of docs/bigger-models.md.

    .venv/bin/python experiments/bench_big_base.py --out experiments/results/bench_big_base
    .venv/bin/python experiments/bench_big_base.py --layers 2 --hidden 256 --short 1 --long 2   # a quick check
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = ("f32", "bf16", "f32/accum", "bf16/accum", "nf4")


def llama_1b_config(args):
    """Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B config.json), depth and width overridable for a check."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        head_dim=64,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    )


def rss() -> int:
    """This process's resident set now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def saved_model(args) -> Path:
    """The random model in bfloat16, saved once under --scratch by a process of its own (so that building it
    counts in no measured process's peak), for nf4 to load as --load-in-4bit does."""
    folder = Path(args.scratch or tempfile.gettempdir()) / f"bench-big-base-{args.layers}x{args.hidden}"
    if not (folder / "config.json").is_file():
        proc = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--one", "save"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"saving the model failed:\n{proc.stderr[-3000:]}")
    return folder


def save_model(args) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(llama_1b_config(args), dtype=torch.bfloat16)
    folder = Path(args.scratch or tempfile.gettempdir()) / f"bench-big-base-{args.layers}x{args.hidden}"
    lm.save_pretrained(folder)


def quantized(folder: Path):
    """The saved model loaded in 4 bits as ``--load-in-4bit`` loads a base (NF4, double quantisation, bf16)."""
    from transformers import AutoModelForCausalLM

    from bora_pyro.io.base_models import keep_differentiable, quantization_config

    lm = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=quantization_config(4, torch.bfloat16), device_map={"": "cpu"}
    )
    keep_differentiable(lm)  # as load_base_model does (which needs a tokenizer: a config has none)
    return lm


def parameters(lm) -> int:
    """The base's parameter count (a 4-bit weight packs two values per byte: its unpacked shape counts)."""
    return sum(p.quant_state.shape.numel() if hasattr(p, "quant_state") else p.numel() for p in lm.parameters())


def run_one(config: str, args) -> dict:
    from transformers import AutoModelForCausalLM

    from bora_pyro.data.batching import Batch
    from bora_pyro.inference import TrainConfig
    from bora_pyro.inference.svi import TrainStep
    from bora_pyro.runs.build import build_model
    from bora_pyro.runs.spec import RunSpec

    dtype_name, _, variant = config.partition("/")
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "nf4": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    folder = saved_model(args) if dtype_name == "nf4" else None
    before = rss()
    lm = quantized(folder) if folder else AutoModelForCausalLM.from_config(llama_1b_config(args), dtype=dtype)
    lm.eval().requires_grad_(False)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what loading freed (a 4-bit load frees the bf16 weights) goes back
    built = rss()
    params = parameters(lm)
    tasks = [f"t{d}" for d in range(args.tasks)]
    bora = build_model(RunSpec(model="llama-1b-shape"), lm, tasks)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.long):
        ids = torch.randint(10, 120000, (args.docs, args.tokens), generator=g)
        draw = torch.randint(0, args.tasks, (args.docs,), generator=g)
        counts = torch.full((args.tasks,), 100)
        batches.append(
            Batch(ids, torch.ones_like(ids), ids.clone(), draw, torch.arange(args.docs), 100 * args.tasks, counts)
        )
    accum = args.docs if variant == "accum" else 1
    step = TrainStep(bora, TrainConfig(grad_accum=accum), batches[0], total_tokens=100 * args.tasks * args.tokens)
    start, done = time.perf_counter(), []
    for i, batch in enumerate(batches, 1):
        step(batch, i)
        done.append(time.perf_counter() - start)
    slope = (done[args.long - 1] - done[args.short - 1]) / (args.long - args.short)
    return {
        "config": config,
        "parameters": params,
        "step_s": slope,
        "first_step_s": done[0],
        "peak_rss_bytes": peak_rss(),
        "built_rss_bytes": built,
        "base_bytes_per_parameter": (built - before) / params,
        "footprint_bytes": lm.get_memory_footprint(),  # the parameters' and buffers' bytes (what a GPU would hold)
    }


def main(args) -> None:
    if args.one == "save":
        save_model(args)
        return
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    rows = {}
    for config in args.configs.split(","):
        proc = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--one", config], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
        r = rows[config] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"{config:>10}: {r['step_s']:.2f} s/step (first {r['first_step_s']:.1f} s), peak RSS "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB, after build {r['built_rss_bytes'] / 2**30:.2f} GiB, "
            f"{r['base_bytes_per_parameter']:.2f} bytes per base parameter ({r['parameters'] / 1e9:.2f} B parameters; "
            f"footprint {r['footprint_bytes'] / r['parameters']:.2f} bytes each)",
            flush=True,
        )
    if not {"f32", "bf16", "f32/accum", "bf16/accum"} <= set(rows):
        return
    ratios = {
        "bf16/f32 peak RSS": rows["bf16"]["peak_rss_bytes"] / rows["f32"]["peak_rss_bytes"],
        "bf16/f32 step time": rows["bf16"]["step_s"] / rows["f32"]["step_s"],
        "accum/one-batch peak RSS (f32)": rows["f32/accum"]["peak_rss_bytes"] / rows["f32"]["peak_rss_bytes"],
        "accum/one-batch step time (f32)": rows["f32/accum"]["step_s"] / rows["f32"]["step_s"],
        "accum/one-batch peak RSS (bf16)": rows["bf16/accum"]["peak_rss_bytes"] / rows["bf16"]["peak_rss_bytes"],
        "accum/one-batch step time (bf16)": rows["bf16/accum"]["step_s"] / rows["bf16"]["step_s"],
        **(
            {
                "nf4/bf16 peak RSS": rows["nf4"]["peak_rss_bytes"] / rows["bf16"]["peak_rss_bytes"],
                "nf4/bf16 step time": rows["nf4"]["step_s"] / rows["bf16"]["step_s"],
            }
            if "nf4" in rows
            else {}
        ),
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        summary = {"settings": {k: v for k, v in vars(args).items() if k != "one"}, "runs": rows, "ratios": ratios}
        out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
        print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (Llama-3.2-1B: 16)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (Llama-3.2-1B: 2048)")
    parser.add_argument("--tasks", type=int, default=25, help="tasks D")
    parser.add_argument("--docs", type=int, default=4, help="documents per step (= micro-batches when accumulated)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per document")
    parser.add_argument("--short", type=int, default=1)
    parser.add_argument("--long", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of " + ", ".join(CONFIGS))
    parser.add_argument("--scratch", default=None, help="folder for nf4's saved model (default: the temp folder; kept)")
    parser.add_argument("--out", default=None, help="write OUT.json")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    main(parser.parse_args())

"""The Python API in one page: load a base LM and a multi-task corpus, fit BoRA, evaluate.

.venv/bin/python experiments/example_python_api.py                      # SmolLM2-135M, ~2 min on CPU
.venv/bin/python experiments/example_python_api.py --model tiny-random-llama --steps 5
"""

from __future__ import annotations

import argparse

import bora_pyro


def main(args: argparse.Namespace) -> None:
    lm, tokenizer = bora_pyro.load_base_model(args.model)
    corpus = bora_pyro.load_corpus(
        "bible-books", tokenizer=tokenizer, max_tokens=64, books=("Ruth", "Jonah", "Obadiah", "James"), max_eval_docs=4
    )
    bora = bora_pyro.BoRA(lm, tasks=corpus.tasks, rank=8, alpha=16, tau=args.tau, inference="map")
    base = bora_pyro.evaluate(bora, corpus.test, base_model=True)
    result = bora_pyro.fit(bora, corpus, steps=args.steps, eval_every=max(1, args.steps // 2))
    report = bora_pyro.evaluate(bora, corpus.test)
    table = report.to_frame().assign(base_perplexity=base.per_task)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    print(
        f"test perplexity {report.token_weighted:.2f} (base model {base.token_weighted:.2f}); "
        f"{result.state.step} steps at {result.state.tokens_per_second:.0f} training tokens/s"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tau", type=float, default=100.0)
    main(parser.parse_args())

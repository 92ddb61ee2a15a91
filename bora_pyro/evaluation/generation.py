"""Text generation per task: many prompts, each with its own task (or ``global`` = Theta), one batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..data.task_names import GLOBAL
from ..nn.lora import Factors, MultiTaskLoRA, TaskRows, rows_of


def task_indices(tasks: Sequence[str], wanted: Sequence[str], has_global: bool) -> list[int]:
    """Index of each wanted task; ``global`` maps to one past the last task. Unknown names are an error."""
    index = {t: d for d, t in enumerate(tasks)}
    if has_global:
        index[GLOBAL] = len(tasks)
    unknown = sorted({w for w in wanted if w not in index})
    if unknown:
        extra = f" and '{GLOBAL}' (Theta)" if has_global else f" ('{GLOBAL}' does not exist: this run has no Theta)"
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {list(tasks)}{extra}")
    return [index[w] for w in wanted]


@torch.no_grad()
def generate(
    lora: MultiTaskLoRA,
    tokenizer,
    task_names: Sequence[str],
    task_factors: Factors | TaskRows,
    global_factors: Mapping[str, torch.Tensor] | None,
    prompts: Sequence[str],
    tasks: Sequence[str],
    max_new_tokens: int = 50,
    do_sample: bool = True,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> list[str]:
    """Continue every prompt under its own task's adapter, all prompts in one left-padded batch.

    Only the prompts' tasks' adapters are read. Shapes: task_factors name -> [D, ...] stacked, or a function
    of task ids (``TaskRows``); global_factors name -> [...] (used for task "global").
    """
    if len(prompts) != len(tasks):
        raise ValueError(f"need one task per prompt: got {len(prompts)} prompts and {len(tasks)} tasks")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    index = task_indices(task_names, tasks, global_factors is not None)
    used = sorted(set(index))
    wanted = [d for d in used if d < len(task_names)]
    factors = {k: v.to(lora.device) for k, v in rows_of(task_factors)(wanted).items()} if wanted else None
    if len(wanted) < len(used):  # "global": Theta, after the tasks' rows
        theta = {k: v.unsqueeze(0).to(lora.device) for k, v in global_factors.items()}
        factors = theta if factors is None else {k: torch.cat([v, theta[k]]) for k, v in factors.items()}
    index = [used.index(d) for d in index]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=lora.device)  # left padding
    attention_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=lora.device)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    with lora.activate(factors, torch.tensor(index, device=lora.device)):
        out = lora.lm.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            **sampling,
        )
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]

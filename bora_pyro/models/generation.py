"""Text generation per task: many prompts, each with its own task (or ``global`` = Theta), one batch."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch

from ..data.formats import Messages, parse_messages
from ..data.input_format import InputFormat
from ..data.task_names import GLOBAL
from ..nn.lora import Factors, MultiTaskLoRA, TaskRows, rows_of

SHOWN = 10  # known task names listed in an error message


def _listing(names: Sequence[str]) -> str:
    """The first ``SHOWN`` names, and how many there are in all when there are more."""
    names = list(names)
    return f"{names}" if len(names) <= SHOWN else f"{names[:SHOWN]} ... ({len(names)} in all)"


def task_indices(tasks: Sequence[str], wanted: Sequence[str], has_global: bool) -> list[int]:
    """Index of each wanted task; ``global`` maps to one past the last task. Unknown names are an error."""
    index = {t: d for d, t in enumerate(tasks)}
    if has_global:
        index[GLOBAL] = len(tasks)
    unknown = sorted({w for w in wanted if w not in index})
    if unknown:
        extra = f" and '{GLOBAL}' (Theta)" if has_global else f" ('{GLOBAL}' does not exist: this run has no Theta)"
        raise ValueError(f"unknown task(s) {_listing(unknown)}; known tasks: {_listing(tasks)}{extra}")
    return [index[w] for w in wanted]


def _is_int(value: object) -> bool:
    """An integer (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int) -> None:
    """Refuse options ``generate`` cannot use, naming the value and what is allowed."""
    if not (_is_int(max_new_tokens) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] (the nucleus' probability mass), got {top_p!r}")
    if not (_is_int(seed) and 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")


def check_prompts(prompts: Sequence[str | Messages], tasks: Sequence[str], input_format: InputFormat) -> None:
    """One task per prompt, at least one prompt; prompts are texts (or message lists for a conversational
    format); an empty text prompt needs a BOS token."""
    kind = "message lists" if input_format.conversational else "strings"
    if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"tasks must be a list of strings, got {tasks!r:.80}")
    if isinstance(prompts, str) or not all(
        isinstance(p, (list, tuple)) if input_format.conversational else isinstance(p, str) for p in prompts
    ):
        raise ValueError(f"prompts must be a list of {kind} ({input_format.describe()}), got {prompts!r:.80}")
    if not prompts:
        raise ValueError("need at least one prompt to generate from, got none")
    if input_format.conversational:
        for k, prompt in enumerate(prompts):
            parse_messages(list(prompt), f"prompt {k}", "messages", "generate")  # one line for a bad message
    if len(prompts) != len(tasks):
        raise ValueError(f"need one task per prompt: got {len(prompts)} prompts and {len(tasks)} tasks")
    if not input_format.conversational and not input_format.bos and any(p == "" for p in prompts):
        raise ValueError(
            f"prompt {list(prompts).index('')} is empty and the tokenizer has no BOS token to start from: "
            "give at least one character"
        )


@torch.no_grad()
def generate(
    lora: MultiTaskLoRA,
    tokenizer,
    task_names: Sequence[str],
    task_factors: Factors | TaskRows,
    global_factors: Mapping[str, torch.Tensor] | None,
    prompts: Sequence[str | Messages],
    tasks: Sequence[str],
    max_new_tokens: int = 50,
    do_sample: bool = True,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    input_format: InputFormat | None = None,
) -> list[str]:
    """Continue every prompt under its own task's adapter, all prompts in one left-padded batch.

    Each prompt is encoded as in training (``input_format``, the run's: BOS, task prompt, chat template with
    its generation prompt; None: a text run without task prompt), so a prompt's ids are those it has in
    training. Only the prompts' tasks' adapters are read. Shapes: task_factors name -> [D, ...] stacked, or a function
    of task ids (``TaskRows``); global_factors name -> [...] (used for task "global"). Options it cannot
    use (``top_p`` outside (0, 1], a ``temperature`` <= 0, no prompt, an unknown task...) are a ValueError.
    """
    input_format = input_format or InputFormat(bos=tokenizer.bos_token_id is not None)
    check_prompts(prompts, tasks, input_format)
    check_sampling(max_new_tokens, temperature, top_p, seed)
    index = task_indices(task_names, tasks, global_factors is not None)
    used = sorted(set(index))
    wanted = [d for d in used if d < len(task_names)]
    factors = {k: v.to(lora.device) for k, v in rows_of(task_factors)(wanted).items()} if wanted else None
    if len(wanted) < len(used):  # "global": Theta, after the tasks' rows
        theta = {k: v.unsqueeze(0).to(lora.device) for k, v in global_factors.items()}
        factors = theta if factors is None else {k: torch.cat([v, theta[k]]) for k, v in factors.items()}
    index = [used.index(d) for d in index]
    encoded = [input_format.prompt_ids(tokenizer, p, task) for p, task in zip(prompts, tasks)]
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

"""Export a run's adapters in PEFT's on-disk LoRA format: one folder per task, plus ``global`` (Theta).

Each folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` and loads with
``peft.PeftModel.from_pretrained(base_model, folder)``. Task names become filesystem-safe folder
names, never one of the export's own files (``tasks.json``, ``README.md``...) nor a name Windows reserves;
``tasks.json`` maps every task name to its folder. Adapters with NaN or inf values are refused
(:class:`~bora_pyro.io.integrity.CorruptFile`), and a failed export leaves no folder behind.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..data.input_format import InputFormat
from ..data.task_names import GLOBAL, check_task_names
from ..nn.lora import Factors, MultiTaskLoRA, TaskRows, rows_of
from ..nn.targets import peft_target_modules
from .artifacts import write_json
from .folders import MARKER, atomic_folder
from .integrity import MANIFEST, CorruptFile
from .serving import vllm_warnings

log = logging.getLogger(__name__)
MAX_FOLDER_NAME = 100  # bytes (ASCII characters); file systems allow 255
TASKS_FILE, README, INPUT_FORMAT_FILE = "tasks.json", "README.md", "input_format.json"
OWN_FILES = (TASKS_FILE, README, MANIFEST, MARKER)  # what an export folder holds besides the adapters
WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10))}


def _reserved(name: str) -> bool:
    """A folder name an export cannot use (case-insensitively): ``global``, one of the export's own files,
    or a device name Windows reserves with any extension ("NUL", "con.txt")."""
    lower = name.lower()
    return lower in {GLOBAL, *(f.lower() for f in OWN_FILES)} or lower.split(".")[0] in WINDOWS_DEVICES


def safe_names(tasks: Sequence[str]) -> dict[str, str]:
    """Task name -> a unique folder name of letters, digits, '-', '_' and '.' (see :func:`_reserved`).

    Other characters become '_' and leading or trailing '.' and '_' go ("..", "/" and "" become "task");
    a reserved name with an extension has its first '.' made '_' ("con.txt" -> "con_txt").
    A name longer than ``MAX_FOLDER_NAME`` keeps its start and ends in '-' and the first 8 hex digits of
    the SHA-1 of the task name (stable, and distinct for names that share the start); names that would
    still clash (also by case, for case-insensitive file systems) or are reserved get '_2', '_3'...
    """
    out: dict[str, str] = {}
    used: set[str] = set()
    for task in tasks:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", task).strip("._") or "task"
        if "." in base and _reserved(base):  # "con.txt": Windows reserves the stem whatever follows it
            base = base.replace(".", "_", 1)
        if len(base) > MAX_FOLDER_NAME:
            digest = hashlib.sha1(task.encode("utf-8")).hexdigest()[:8]
            base = f"{base[: MAX_FOLDER_NAME - 9]}-{digest}"
        name, k = base, 1
        while name.lower() in used or _reserved(name):
            k += 1
            suffix = f"_{k}"
            name = base[: MAX_FOLDER_NAME - len(suffix)] + suffix
        used.add(name.lower())
        out[task] = name
    return out


def _check_names(tasks: Sequence[str], wanted: Sequence[str], has_global: bool) -> None:
    """The run's task names are distinct and none is ``global``; ``wanted`` is non-empty and names no task
    twice and none unknown."""
    check_task_names(tasks, "export")
    twice = [name for name, n in Counter(wanted).items() if n > 1]
    if twice:
        raise ValueError(f"the tasks to export name {twice[:5]} more than once; name each task once")
    if not wanted:
        raise ValueError("no task to export: name at least one task (or 'global')")
    unknown = [t for t in wanted if t not in tasks and not (t == GLOBAL and has_global)]
    if unknown:
        raise ValueError(
            f"unknown task(s) {unknown[:5]} to export; tasks: {list(tasks)[:10]}"
            f"{'...' if len(tasks) > 10 else ''}{' and global' if has_global else ''}"
        )


def _adapter_of(task: str | None) -> str:
    """How an error names the adapter of ``task`` (None: an adapter of no named task)."""
    if task is None:
        return "the adapter"
    return "the adapter of global (Theta)" if task == GLOBAL else f"the adapter of task {task!r}"


def check_finite(factors: Mapping[str, torch.Tensor], task: str | None) -> None:
    """Refuse an adapter with NaN or inf values: :class:`CorruptFile` naming the task and the tensor."""
    for name, value in factors.items():
        if not torch.isfinite(value).all():
            raise CorruptFile(
                f"{_adapter_of(task)} has non-finite values (NaN or inf) in {name!r}: the run's adapters are "
                "damaged; nothing was exported (train the run again or restore it from a copy)"
            )


def peft_state_dict(lora: MultiTaskLoRA, factors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One adapter's factors (name -> [r, in] / [out, r]) under PEFT's key names."""
    state = {}
    for layer in lora.adapted:
        state[f"base_model.model.{layer.path}.lora_A.weight"] = factors[f"{layer.name}.A"].detach().cpu().contiguous()
        state[f"base_model.model.{layer.path}.lora_B.weight"] = factors[f"{layer.name}.B"].detach().cpu().contiguous()
    return state


def peft_config(lora: MultiTaskLoRA, base_model: str) -> dict:
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in lora.layers.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "bias": "none",
        "target_modules": peft_target_modules(lora.lm, lora.paths()),
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def export_peft(
    lora: MultiTaskLoRA,
    tasks: Sequence[str],
    task_factors: Factors | TaskRows,
    global_factors: Mapping[str, torch.Tensor] | None,
    base_model: str,
    out: str | Path,
    overwrite: bool = False,
    note: str | None = None,
    only: Sequence[str] | None = None,
    input_format: InputFormat | None = None,
) -> dict[str, str]:
    """Write one PEFT adapter folder per task (and ``global`` when Theta exists); returns the name map.

    Each folder also holds the input format the adapter was trained on (``input_format.json``: data format,
    the task's prompt text, BOS, chat template) and a README.md model card saying how to build that input,
    so that a server feeds it what training did.

    ``base_model`` becomes every adapter's ``base_model_name_or_path`` (a hub id or path a user can
    load); ``note`` (e.g. how the training weights differ from it) goes into the folder's README.md.
    ``only``: export these tasks (and ``global``, if named) only. Adapters are read and written one task
    at a time. Shapes: task_factors name -> [D, ...] stacked, or a function of task ids (``TaskRows``);
    global_factors name -> [...]. Unknown or repeated task names are a ValueError before anything is
    written; an adapter with NaN or inf values is :class:`CorruptFile`, and no export folder is left.
    """
    wanted = list(tasks) + ([GLOBAL] if global_factors is not None else []) if only is None else list(only)
    _check_names(tasks, wanted, global_factors is not None)
    names = {**safe_names(tasks), GLOBAL: GLOBAL}
    rows, index = rows_of(task_factors), {t: d for d, t in enumerate(tasks)}
    config = peft_config(lora, base_model)
    for line in vllm_warnings(lora):
        log.warning("%s: the %d adapters: %s", out, len(wanted), line)
    with atomic_folder(Path(out), "export", overwrite=overwrite) as tmp:
        folders = {}
        for task in wanted:
            factors = dict(global_factors) if task == GLOBAL else {k: v[0] for k, v in rows([index[task]]).items()}
            check_finite(factors, task)
            folder = tmp / names[task]
            folder.mkdir()
            write_json(folder / "adapter_config.json", config)
            save_file(peft_state_dict(lora, factors), str(folder / "adapter_model.safetensors"))
            if input_format is not None:
                write_json(folder / INPUT_FORMAT_FILE, {"task": task, **served_format(input_format, task)})
                (folder / README).write_text(model_card(task, base_model, input_format, note), encoding="utf-8")
            folders[task] = names[task]
        write_json(tmp / TASKS_FILE, folders)
        (tmp / README).write_text(
            f"# PEFT LoRA adapters exported by bora_pyro\n\nOne folder per task (tasks.json maps task names to "
            f"folders){', plus global (Theta)' if global_factors is not None else ''}. Base model: `{base_model}`"
            f'{f" ({note})" if note else ""}.\n\n    base = AutoModelForCausalLM.from_pretrained("{base_model}")\n'
            f'    model = peft.PeftModel.from_pretrained(base, "<folder>")\n\nEach folder\'s README.md and '
            f"{INPUT_FORMAT_FILE} say the input format its adapter was trained on (task prompt, chat template).\n"
        )
    return folders


def served_format(input_format: InputFormat, task: str) -> dict:
    """What a server needs to build ``task``'s input as in training: the format, its prompt text, BOS, template."""
    return {
        **input_format.to_dict(),
        "task_prompt_text": input_format.task_text(task),
        "where_the_task_prompt_goes": "start of the first user message"
        if input_format.conversational
        else "after BOS, before the prompt or text",
    }


def model_card(task: str, base_model: str | None, input_format: InputFormat, note: str | None) -> str:
    """A short README.md for one exported adapter (PEFT's convention: YAML front matter, then text), or with
    ``base_model`` None for a merged model (the folder is the model)."""
    prompt = input_format.task_text(task)
    if input_format.conversational:
        how = (
            "Render the conversation with the chat template in `input_format.json` and "
            "`add_generation_prompt=True`"
            + (f", with `{prompt}` put before the content of its first user message" if prompt else "")
            + "; do not add another BOS token. Training tokenised the rendering in pieces, cut before and after "
            "each assistant turn's generation prompt; one tokenisation of the whole text gives the same ids for "
            "templates whose pieces meet at special tokens or line ends (ChatML, SmolLM2's)."
        )
    else:
        bos = "the tokenizer's BOS token, then " if input_format.bos else ""
        task_prompt = f"the ids of the task prompt `{prompt}`, then " if prompt else ""
        how = (
            f"Feed {bos}{task_prompt}the ids of the prompt, each part tokenised on its own without special tokens "
            "and the ids concatenated (as training did: one tokenisation of the joined text may differ at the "
            "joins)."
        )
    if base_model is None:
        return (
            f"---\ntags:\n- bora_pyro\n---\n\n# {task}: a base model with a BoRA adapter merged in, by bora_pyro\n\n"
            f"Trained on {input_format.describe()}.\n\n## Input format\n\n{how}\n\n"
            '    model = AutoModelForCausalLM.from_pretrained("<this folder>")\n'
        )
    front = f"---\nbase_model: {base_model}\nlibrary_name: peft\ntags:\n- lora\n- bora_pyro\n---\n\n"
    return (
        f"{front}# {task}: a BoRA LoRA adapter exported by bora_pyro\n\n"
        f"Trained on {input_format.describe()}. Base model: `{base_model}`{f' ({note})' if note else ''}.\n\n"
        f"## Input format\n\n{how}\n\n"
        f'    base = AutoModelForCausalLM.from_pretrained("{base_model}")\n'
        f'    model = peft.PeftModel.from_pretrained(base, "<this folder>")\n'
    )


def _merged_weight(wrapped: torch.nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The base weight of one adapted layer plus the update ``scaling * B @ A`` (in the weight's layout)."""
    delta = wrapped.scaling * (B @ A)  # [out, in]
    weight = wrapped.base_layer.weight
    return weight + (delta.T if wrapped.fan_in_fan_out else delta).to(weight.dtype)


@torch.no_grad()
def merge_into_base(
    lora: MultiTaskLoRA, factors: Mapping[str, torch.Tensor], task: str | None = None
) -> torch.nn.Module:
    """Fold one adapter (name -> [r, in] / [out, r]) into the base weights and unwrap the layers.

    Returns the plain Hugging Face model (``lora`` is unusable afterwards). An adapter with NaN or inf
    values, or one whose merged weights are not finite, is :class:`CorruptFile` naming ``task`` and the
    tensor, and ``lora`` is left as it was.
    """
    check_finite(factors, task)
    for layer in lora.adapted:  # every merged weight is checked before the first one is changed
        merged = _merged_weight(lora.layers[layer.name], factors[f"{layer.name}.A"], factors[f"{layer.name}.B"])
        if not torch.isfinite(merged).all():
            raise CorruptFile(
                f"merging {_adapter_of(task)} gives non-finite weights in {layer.path!r} (its factors are too "
                "large): the run's adapters are damaged; nothing was exported"
            )
    for layer in lora.adapted:
        wrapped = lora.layers[layer.name]
        merged = _merged_weight(wrapped, factors[f"{layer.name}.A"], factors[f"{layer.name}.B"])
        wrapped.base_layer.weight.copy_(merged)
        parent, _, child = layer.path.rpartition(".")
        setattr(lora.lm.get_submodule(parent) if parent else lora.lm, child, wrapped.base_layer)
    lora.layers.clear()
    return lora.lm


def export_merged(
    lora: MultiTaskLoRA,
    tokenizer,
    factors: Mapping[str, torch.Tensor],
    out: str | Path,
    overwrite: bool = False,
    task: str | None = None,
    input_format: InputFormat | None = None,
) -> None:
    """Write a full Hugging Face model (safetensors) with one adapter merged in, plus the tokenizer.

    ``task`` names the adapter in errors (see :func:`merge_into_base`). ``input_format``: the run's; its chat
    template goes into the saved tokenizer, and ``input_format.json`` and a README.md say how training built
    the input (task prompt, BOS).
    """
    model = merge_into_base(lora, factors, task)
    with atomic_folder(Path(out), "merged", overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        template = getattr(tokenizer, "chat_template", None)
        if input_format is not None and input_format.chat_template is not None:
            tokenizer.chat_template = input_format.chat_template
        try:
            tokenizer.save_pretrained(tmp)
        finally:
            tokenizer.chat_template = template
        if input_format is not None:
            name = task or GLOBAL
            write_json(tmp / INPUT_FORMAT_FILE, {"task": name, **served_format(input_format, name)})
            (tmp / README).write_text(model_card(name, None, input_format, None), encoding="utf-8")

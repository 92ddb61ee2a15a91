"""How a document becomes the model's input: the one format training, scoring, generation and exported
adapters share (a run records it; ``generate`` and export read it back).

    text               [BOS] + task prompt (context) + text + EOS (scored)
    prompt-completion  [BOS] + task prompt (context) + prompt (context) + completion + EOS (scored)
    messages           the chat template's rendering; the assistant turns scored, the rest context
    conversational     the prompt's rendering with the generation prompt (context) + the completion's turns
    prompt-completion  (scored)

The task prompt (``--task-prompt``, e.g. ``"{task}: "``) of a conversation is put before the content of its
first user message. ``global`` (Theta) gets no task prompt. ``completion_only_loss=False`` scores the prompt and the
template's tokens too (TRL's ``completion_only_loss=False``); the task prompt and BOS stay context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .batching import IGNORE_INDEX
from .chat import NotIncremental, chat_segments, render
from .formats import CONVERSATIONAL, Document, Example, Messages
from .task_names import GLOBAL

FORMAT_NAMES = ("text", "prompt-completion", "messages", CONVERSATIONAL)


def token_ids(tokenizer, text: str) -> list[int]:
    """The ids of ``text`` without added special tokens (special tokens written in it are recognised)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


@dataclass(frozen=True)
class InputFormat:
    """The input format of a run: its data format, task prompt, loss mask and chat template.

    ``chat_template``: the template's text (conversational formats; None otherwise).
    ``bos``: whether a BOS token starts each text or prompt-completion example (the tokenizer has one)."""

    data_format: str = "text"
    task_prompt: str | None = None
    completion_only_loss: bool = True
    chat_template: str | None = None
    bos: bool = True

    def __post_init__(self) -> None:
        if self.data_format not in FORMAT_NAMES:
            raise ValueError(f"data_format must be one of {FORMAT_NAMES}, got {self.data_format!r}")
        if self.conversational and not self.chat_template:
            raise ValueError(f"the {self.data_format} format needs a chat template")

    @property
    def conversational(self) -> bool:
        return self.data_format in ("messages", CONVERSATIONAL)

    def task_text(self, task: str) -> str:
        """The task prompt of ``task`` ("" without one, and for ``global``, Theta, which no task prompt trained)."""
        return self.task_prompt.format(task=task) if self.task_prompt and task != GLOBAL else ""

    def context(self, tokenizer, task: str) -> list[int]:
        """The ids every chunk of a ``task`` example starts with, never scored: BOS and the task prompt
        (a conversation's task prompt is inside its rendering, so its context is empty)."""
        if self.conversational:
            return []
        bos = [tokenizer.bos_token_id] if self.bos and tokenizer.bos_token_id is not None else []
        return bos + token_ids(tokenizer, self.task_text(task))

    def body(self, tokenizer, example: Example, task: str) -> tuple[list[int], list[int]]:
        """The ids of an example after its :meth:`context`, and their labels (-100 where not scored)."""
        if self.conversational:
            prompt, completion = self._conversation(example, task)
            try:
                parts = chat_segments(tokenizer, self.chat_template, prompt, completion)
            except NotIncremental:
                if self.completion_only_loss:
                    raise
                parts = [(render(tokenizer, self.chat_template, (*prompt, *(completion or ())), False), True)]
        else:
            parts = [(example.prompt, False), (example.completion, True)]
        ids: list[int] = []
        labels: list[int] = []
        for text, scored in parts:
            piece = token_ids(tokenizer, text)
            ids += piece
            labels += piece if scored or not self.completion_only_loss else [IGNORE_INDEX] * len(piece)
        if not self.conversational and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        return ids, labels

    def prompt_ids(self, tokenizer, prompt: str | Messages, task: str) -> list[int]:
        """The ids ``generate`` feeds the model for ``prompt`` under ``task``: exactly the ids the same prompt
        has in training (a conversation ends with the template's generation prompt)."""
        if not self.conversational:
            if not isinstance(prompt, str):
                raise ValueError(f"this run was trained on {self.data_format} data: give a text prompt, not messages")
            return self.context(tokenizer, task) + token_ids(tokenizer, prompt)
        if isinstance(prompt, str):
            raise ValueError(
                f"this run was trained on {self.data_format} data: give the prompt as messages (--messages JSON), "
                'e.g. [{"role": "user", "content": "..."}]'
            )
        messages = _with_task_prompt(tuple(prompt), self.task_text(task))
        parts = chat_segments(tokenizer, self.chat_template, messages, add_generation_prompt=True)
        return [i for text, _ in parts for i in token_ids(tokenizer, text)]

    def _conversation(self, example: Example, task: str) -> tuple[Messages, Messages | None]:
        """(prompt, completion) of :func:`chat_segments` for a conversational example, with the task prompt."""
        if example.prompt is None:
            return _with_task_prompt(example.completion, self.task_text(task)), None
        return _with_task_prompt(example.prompt, self.task_text(task)), example.completion

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line: the format and what is scored."""
        scored = {
            "text": "every token",
            "prompt-completion": "the completion",
            "messages": "the assistant turns",
            CONVERSATIONAL: "the completion's turns",
        }[self.data_format]
        if not self.completion_only_loss and self.data_format != "text":
            scored = "every token (--no-completion-only-loss)"
        prompt = f", task prompt {self.task_prompt!r}" if self.task_prompt else ""
        return f"{self.data_format} data, loss on {scored}{prompt}"


def _with_task_prompt(messages: Messages, text: str) -> Messages:
    """``messages`` with ``text`` before the content of the first user message (unchanged without one: the
    task prompt is context, never put into a turn that is scored or into the system prompt)."""
    k = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
    if not text or k is None:
        return messages
    first = {**messages[k], "content": text + messages[k]["content"]}
    return (*messages[:k], first, *messages[k + 1 :])


def reference_text(example: Document) -> str:
    """What generation from an example's prompt should produce: a completion's text, or the content of a
    conversation's last assistant turn (the turns before it are its prompt, :func:`prompt_of`)."""
    if isinstance(example, str):
        raise ValueError("text documents have no reference answer: generation is scored on prompt-completion data")
    completion = example.completion
    if isinstance(completion, str):
        return completion
    if example.prompt is None:
        return completion[_last_assistant(completion)]["content"]
    return "".join(m["content"] for m in completion)


def prompt_of(example: Document) -> str | Messages:
    """The prompt of an example (a conversation: its turns before the last assistant turn)."""
    if isinstance(example, str):
        raise ValueError("text documents have no prompt: generation is scored on prompt-completion data")
    if example.prompt is None:
        return example.completion[: _last_assistant(example.completion)]
    return example.prompt


def _last_assistant(messages: Sequence[dict]) -> int:
    return max(i for i, m in enumerate(messages) if m.get("role") == "assistant")

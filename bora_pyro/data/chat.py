"""Conversations rendered with a chat template, cut into segments that are scored or context.

The template renders the whole conversation; the segment boundaries are found by rendering its
prefixes (before each assistant turn, with and without the generation prompt), so that each assistant
turn's tokens (its content and the end-of-turn marker the template writes after it) are told from the
template's own tokens, for any template that renders a conversation as an extension of its prefixes
(TRL's prompt-completion convention). A template that does not is refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .formats import Messages

ASSISTANT = "assistant"


class NoChatTemplate(ValueError):
    """The tokenizer has no chat template and none was given."""


def read_chat_template(path: str | None, tokenizer) -> str:
    """The chat template to use: the file ``path`` (a Jinja template, as in a tokenizer's
    ``chat_template.jinja``), else the tokenizer's own. None of either is one line of error."""
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"chat template file not found: {str(file)!r}")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"chat template file {str(file)!r} is not UTF-8 text") from None
        if not text.strip():
            raise ValueError(f"chat template file {str(file)!r} is empty")
        return text
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise NoChatTemplate(
            "this model's tokenizer has no chat template, which conversational data (messages) needs; give one "
            "with --chat-template FILE (a Jinja file, e.g. another model's chat_template.jinja)"
        )
    return template


def render(tokenizer, template: str, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    """The conversation ``messages`` as the template writes it (text, special tokens as text)."""
    try:
        text = tokenizer.apply_chat_template(
            list(messages), chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # jinja2's TemplateError and whatever the template raises for its input
        roles = [m.get("role") for m in messages]
        raise ValueError(f"the chat template cannot render a conversation of roles {roles}: {err}") from None
    if not isinstance(text, str):
        raise ValueError(f"the chat template rendered {type(text).__name__}, not text")
    return text


def _generation_prompt(tokenizer, template: str, messages: Messages) -> str:
    """The rendering of ``messages`` with the generation prompt; before a first message, what the template
    gives for no messages (nothing, for a template that cannot render an empty conversation)."""
    try:
        return render(tokenizer, template, messages, True)
    except ValueError:
        if messages:
            raise
        return ""


class NotIncremental(ValueError):
    """The template rewrites earlier turns when a conversation grows."""


class _Segments:
    """Consecutive renderings of a growing conversation, kept as the text each one adds."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, bool]] = []
        self.done = ""

    def add(self, text: str, scored: bool) -> None:
        if not text.startswith(self.done):
            raise NotIncremental(
                "the chat template does not render a conversation as an extension of its beginning (it rewrites "
                "earlier turns), so the assistant turns cannot be told from the rest; give a template that does "
                "with --chat-template FILE, or train on every token with --no-completion-only-loss"
            )
        if len(text) > len(self.done):
            self.parts.append((text[len(self.done) :], scored))
        self.done = text


def chat_segments(
    tokenizer,
    template: str,
    prompt: Messages,
    completion: Messages | None = None,
    add_generation_prompt: bool = False,
) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, scored)`` segments, in order.

    ``completion`` None (a ``messages`` example): ``prompt`` is the whole conversation, and each assistant
    turn's text after its generation prompt is scored. Else the prompt's turns are context and the
    completion (everything the template adds after the prompt's generation prompt) is scored.
    ``add_generation_prompt``: end with the template's generation prompt (what ``generate`` feeds the model).
    Every example is cut at the same places (before and after each assistant turn's generation prompt), so a
    prompt is tokenised alike in training and in generation."""
    segments = _Segments()
    for k, message in enumerate(prompt):
        if message.get("role") == ASSISTANT:
            segments.add(render(tokenizer, template, prompt[:k], False) if k else "", False)
            segments.add(_generation_prompt(tokenizer, template, prompt[:k]), False)
            segments.add(render(tokenizer, template, prompt[: k + 1], False), completion is None)
    segments.add(render(tokenizer, template, prompt, False), False)
    if completion is not None or add_generation_prompt:
        segments.add(render(tokenizer, template, prompt, True), False)
    if completion is not None:
        segments.add(render(tokenizer, template, (*prompt, *completion), False), True)
    return segments.parts

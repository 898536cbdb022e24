"""Chat templates: a conversation (OpenAI ``messages``) to the prompt's token ids, and the stops of a reply.

A checkpoint may carry its template in its gptmini entry (``chat_template``: a mapping with the fields of
``ChatTemplate``; chat fine-tuning will write it, so the template served is the one trained). A checkpoint
without one gets ``DEFAULT_TEMPLATE``, a plain-text format a base model can continue:

    <|endoftext|>{system}

    User: {user}

    Assistant: {assistant}

    User: {user}

    Assistant:

The reply ends at <|endoftext|> or when the model starts the next user turn ("\\nUser:", held back and never
shown). Message contents are always text: a literal ``<|endoftext|>`` typed by a user is encoded as ordinary
characters, never as the special token; only the template's own markers are special tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from gptmini.common import GptMiniError

CONTENT = "{content}"
ROLES = ("system", "user", "assistant")
_SPECIAL = re.compile(r"(<\|[a-z_]+\|>)")  # a tokenizer's special-token name, e.g. <|endoftext|>


@dataclass(frozen=True)
class ChatTemplate:
    """How each turn is written. Each role's format holds ``{content}`` once; special-token names in the
    formats (e.g. ``<|endoftext|>``) are those tokens."""

    name: str = "default"
    prefix: str = "<|endoftext|>"
    """Before the first turn: here the document separator, so the model starts a new text."""
    system: str = "{content}\n\n"
    user: str = "User: {content}\n\n"
    assistant: str = "Assistant: {content}\n\n"
    generation_prompt: str = "Assistant:"
    """After the last turn: where the model's reply starts."""
    stop: tuple[str, ...] = ("\nUser:",)
    """Strings that end a reply (besides <|endoftext|>), added to the request's own stops."""

    def __post_init__(self) -> None:
        for role in ROLES:
            text = getattr(self, role)
            if not isinstance(text, str) or text.count(CONTENT) != 1:
                raise GptMiniError(
                    f"chat template {self.name!r}: the {role} format {text!r} must hold {CONTENT} "
                    "exactly once."
                )

    def render(self, messages: list[tuple[str, str]], enc) -> list[int]:
        """Token ids of the conversation ``[(role, content), ...]`` followed by the generation prompt."""
        pieces: list[tuple[str, bool]] = [(self.prefix, True)]  # (text, may hold special tokens)
        for role, content in messages:
            before, after = getattr(self, role).split(CONTENT)
            pieces += [(before, True), (content, False), (after, True)]
        pieces.append((self.generation_prompt, True))
        return _encode(pieces, enc)


DEFAULT_TEMPLATE = ChatTemplate()


def _encode(pieces: list[tuple[str, bool]], enc) -> list[int]:
    """Encode the text as one string (so words tokenize as they would in running text), except that only the
    template's pieces may produce special tokens."""
    ids: list[int] = []
    text = ""
    for piece, template in pieces:
        parts = _SPECIAL.split(piece) if template else [piece]
        for i, part in enumerate(parts):
            if i % 2 == 1 and part in enc.special_tokens_set:  # a special token named by the template
                ids += enc.encode(text, disallowed_special=())
                ids.append(enc.encode_single_token(part))
                text = ""
            else:
                text += part
    return ids + enc.encode(text, disallowed_special=())


def template_of(info: dict) -> ChatTemplate:
    """The checkpoint's chat template (its gptmini entry's ``chat_template``), else the default one."""
    entry = info.get("chat_template") if isinstance(info, dict) else None
    if entry is None:
        return DEFAULT_TEMPLATE
    if not isinstance(entry, dict):
        raise GptMiniError(
            f"the checkpoint's chat_template is a {type(entry).__name__}, not a mapping of "
            f"{', '.join(f.name for f in fields(ChatTemplate))}; this gptmini cannot read it "
            "(upgrade gptmini)."
        )
    known = {f.name for f in fields(ChatTemplate)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise GptMiniError(
            f"the checkpoint's chat_template has keys {unknown} this gptmini does not know "
            f"(it knows {', '.join(sorted(known))}); upgrade gptmini to serve it with its own template."
        )
    values = {**entry, "stop": tuple(entry.get("stop", DEFAULT_TEMPLATE.stop))}
    return ChatTemplate(**{"name": "checkpoint", **values})

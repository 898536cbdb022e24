"""Chat templates: the one renderer of a conversation into token ids and a loss mask.

Training (``data=chat``), ``generate.py chat=true``, the server's ``/v1/chat/completions`` and the Hugging
Face export all render through ``render`` here, and the checkpoint stores the template it was trained with
(``to_entry``), so the text a model is served is the text it learned. The export's Jinja ``chat_template``
(``jinja``) is generated from the same fields and tested to give the same ids.

Two templates (``data.template``):

- ``alpaca``: the prompt of chapter 7 of *Build a Large Language Model (From Scratch)*::

      Below is an instruction that describes a task. Write a response that appropriately completes the
      request.

      ### Instruction:
      {user}

      ### Response:
      {assistant}<|endoftext|>

  An Alpaca record ``{"instruction", "input", "output"}`` is the one-turn conversation whose user text is the
  instruction, followed by ``\\n\\n### Input:\\n{input}`` when the input is not empty, so it renders exactly
  as the chapter's ``format_input``. The opening sentence is one line (folded above); a system message
  replaces it.
- ``chat``: a plain-text multi-turn format with an optional system message::

      System:
      {system}

      User:
      {user}

      Assistant:
      {assistant}<|endoftext|>User:
      ...

Decisions worth knowing:

- **The end of a reply** is the tokenizer's ``<|endoftext|>`` after every assistant turn: no new special
  tokens, so GPT-2's vocabulary and the export stay as they are. Every conversation also starts with it, as
  every document of the token cache does.
- **The mask** marks the tokens that are assistant text or the end token of an assistant turn: the targets
  of the loss when ``data.mask_prompt=true``. Each text between special tokens is encoded whole (so words
  tokenize as in running text, and as a Hugging Face tokenizer encodes the rendered string); a token belongs
  to the reply when its first character does. Every opening that precedes a reply ends in a newline, which
  GPT-2's and GPT-4's split patterns never merge with a following letter, so a reply's first token starts
  with the reply (a reply that starts with several spaces or newlines is the rare exception).
- **Content is text.** ``<|endoftext|>`` typed inside a message is encoded as ordinary characters; only the
  template's own markers are special tokens. (A Hugging Face tokenizer would read it as the special token.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

from gptmini.common import GptMiniError

ROLES = ("system", "user", "assistant")
CONTENT = "{content}"
END = "<|endoftext|>"  # ends every assistant turn, and starts every conversation
_SPECIAL = re.compile(r"(<\|[a-z_]+\|>)")  # a special-token name inside a template's text
ENTRY_FORMAT = 1  # the version of the checkpoint entry ``to_entry`` writes


@dataclass(frozen=True)
class ChatTemplate:
    """How each turn is written. ``system`` and ``user`` hold ``{content}`` once; an assistant turn is
    ``assistant + content + <|endoftext|>``, and ``assistant`` alone is the generation prompt."""

    name: str
    system: str
    """A system message's format."""
    user: str
    """A user turn's format."""
    assistant: str
    """What opens an assistant turn (prompt text, never in the loss); it ends in a newline (see above)."""
    default_system: str | None = None
    """The system text used when a conversation has none (alpaca: the chapter's opening sentence)."""
    stop: tuple[str, ...] = ()
    """Strings that also end a reply: a model not trained on the template may never emit <|endoftext|>."""

    def __post_init__(self) -> None:
        for role in ("system", "user"):
            text = getattr(self, role)
            if not isinstance(text, str) or text.count(CONTENT) != 1:
                raise GptMiniError(
                    f"chat template {self.name!r}: its {role} format must hold {CONTENT} once."
                )
        if not isinstance(self.assistant, str) or not self.assistant.endswith("\n"):
            raise GptMiniError(f"chat template {self.name!r}: its assistant opening must end in a newline.")


TEMPLATES = {
    "alpaca": ChatTemplate(
        name="alpaca",
        system=CONTENT,
        user="\n\n### Instruction:\n" + CONTENT,
        assistant="\n\n### Response:\n",
        default_system=(
            "Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request."
        ),
        stop=("\n\n### Instruction:",),
    ),
    "chat": ChatTemplate(
        name="chat",
        system="System:\n" + CONTENT + "\n\n",
        user="User:\n" + CONTENT + "\n\n",
        assistant="Assistant:\n",
        stop=("\nUser:\n",),
    ),
}
DEFAULT = "chat"  # what a checkpoint trained without a template is chatted with


def get_template(name: str) -> ChatTemplate:
    """The template called ``name`` (``data.template``)."""
    if name not in TEMPLATES:
        raise GptMiniError(f"data.template={name!r} is unknown; use one of: {', '.join(TEMPLATES)}.")
    return TEMPLATES[name]


# ------------------------------------------------------------------------------------------------------------
# Conversations


class MessageError(GptMiniError):
    """A conversation refused by ``check_messages``; ``index`` is the message at fault (None: the whole
    conversation), so a caller such as the server can point at it without reading the text."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


def check_messages(messages: object, where: str = "the conversation", ends_with: str | None = None) -> list:
    """``messages`` as ``[(role, content), ...]``, after checking each one; ``where`` names it in errors.

    A message is a mapping with a ``role`` (system, user or assistant) and a string ``content``, or such a
    pair. A system message may only come first. ``ends_with`` = "assistant" (training data: the last turn is
    what is learned) or "user" (a prompt: the model writes the next reply).
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise MessageError(f"{where}: messages must be a list of {{role, content}}, not {_kind(messages)}")
    if not messages:
        raise MessageError(f"{where}: the conversation is empty; give at least one message.")
    pairs = []
    for n, message in enumerate(messages):
        if isinstance(message, Mapping):
            for field in ("role", "content"):
                if field not in message:
                    raise MessageError(f"{where}: message {n} has no {field!r} field.", n)
            role, content = message["role"], message["content"]
        elif isinstance(message, (tuple, list)) and len(message) == 2:
            role, content = message
        else:
            raise MessageError(
                f"{where}: message {n} is {_kind(message)}, not a {{role, content}} mapping.", n
            )
        if role not in ROLES:
            raise MessageError(f"{where}: message {n} has role {role!r}; use one of: {', '.join(ROLES)}.", n)
        if not isinstance(content, str):
            raise MessageError(f"{where}: message {n}'s content is {_kind(content)}, not a string.", n)
        if role == "system" and n > 0:
            raise MessageError(f"{where}: message {n} is a system message; only the first may be one.", n)
        pairs.append((role, content))
    if ends_with is not None and pairs[-1][0] != ends_with:
        last, article = pairs[-1][0], "an" if ends_with == "assistant" else "a"
        wanted = f"the last must be {article} {ends_with} turn"
        raise MessageError(f"{where}: the conversation ends with a {last} turn; {wanted}.", len(pairs) - 1)
    return pairs


def alpaca_messages(record: Mapping, where: str = "the record") -> list[tuple[str, str]]:
    """An Alpaca record ``{"instruction", "input", "output"}`` as its one-turn conversation (``input`` may be
    missing or empty)."""
    for field in ("instruction", "output"):
        if field not in record:
            raise GptMiniError(f"{where}: the Alpaca record has no {field!r} field.")
    for field in ("instruction", "input", "output"):
        if field in record and not isinstance(record[field], str):
            raise GptMiniError(
                f"{where}: the Alpaca record's {field!r} is {_kind(record[field])}, not a string."
            )
    user = record["instruction"]
    if record.get("input"):
        user += "\n\n### Input:\n" + record["input"]
    return [("user", user), ("assistant", record["output"])]


def _kind(value: object) -> str:
    """How a value is named in an error: "null", "an int", "a list"."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


# ------------------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Rendered:
    """A rendered conversation: its token ids and, per token, whether it is reply text or a reply's end."""

    ids: list[int]
    mask: list[bool]


def _pieces(
    template: ChatTemplate, messages: list, add_generation_prompt: bool
) -> list[tuple[str, bool, bool]]:
    """``(text, is_reply, is_template)`` pieces of the rendered conversation, in order."""
    pieces = [(END, False, True)]
    first_system = bool(messages) and messages[0][0] == "system"
    if not first_system and template.default_system is not None:
        messages = [("system", template.default_system), *messages]
    for role, content in messages:
        if role == "assistant":
            pieces += [(template.assistant, False, True), (content, True, False), (END, True, True)]
        else:
            before, after = getattr(template, role).split(CONTENT)
            pieces += [(before, False, True), (content, False, False), (after, False, True)]
    if add_generation_prompt:
        pieces.append((template.assistant, False, True))
    return [piece for piece in pieces if piece[0]]


def render_text(template: ChatTemplate, messages: object, add_generation_prompt: bool = False) -> str:
    """The conversation as the text it is rendered to (what ``jinja(template)`` also renders)."""
    return "".join(text for text, _, _ in _pieces(template, check_messages(messages), add_generation_prompt))


def render(template: ChatTemplate, messages: object, enc, add_generation_prompt: bool = False) -> Rendered:
    """The conversation's token ids and reply mask (see the module docstring for both rules).

    ``add_generation_prompt`` ends it with the opening of an assistant turn, where the model's reply starts.
    """
    ids: list[int] = []
    mask: list[bool] = []
    segment, spans = "", []  # the text since the last special token, and its reply spans

    def flush() -> None:
        nonlocal segment, spans
        if segment:
            tokens = enc.encode(segment, disallowed_special=())
            _, starts = enc.decode_with_offsets(tokens)
            ids.extend(tokens)
            mask.extend(any(a <= s < b for a, b in spans) for s in starts)
        segment, spans = "", []

    for text, is_reply, is_template in _pieces(template, check_messages(messages), add_generation_prompt):
        parts = _SPECIAL.split(text) if is_template else [text]
        for i, part in enumerate(parts):
            if i % 2 == 1 and part in enc.special_tokens_set:
                flush()
                ids.append(enc.encode_single_token(part))
                mask.append(is_reply)
            elif part:
                if is_reply:
                    spans.append((len(segment), len(segment) + len(part)))
                segment += part
    flush()
    return Rendered(ids, mask)


def fit_history(template: ChatTemplate, messages: list, enc, budget: int) -> tuple[list, int]:
    """The newest part of a conversation whose prompt (with the generation prompt) takes at most ``budget``
    tokens, and how many turns were dropped: the oldest turns go first, the system message stays."""
    pairs = check_messages(messages)
    system, turns = (pairs[:1], pairs[1:]) if pairs[0][0] == "system" else ([], pairs)
    dropped = 0
    while turns:
        if len(render(template, system + turns, enc, add_generation_prompt=True).ids) <= budget:
            return system + turns, dropped
        turns, dropped = turns[1:], dropped + 1
    raise GptMiniError(
        f"the conversation does not fit the model's context of {budget} tokens even with its last message "
        "alone; send a shorter message (or a shorter system message)."
    )


# ------------------------------------------------------------------------------------------------------------
# Checkpoints and the export


def to_entry(template: ChatTemplate) -> dict:
    """The template as plain values, for the checkpoint's gptmini entry (``chat_template``)."""
    return {"format": ENTRY_FORMAT, **asdict(template), "stop": list(template.stop)}


def from_entry(entry: object) -> ChatTemplate:
    """A checkpoint's ``chat_template`` entry as a template; a foreign or damaged one is a one-line error."""
    known = {f.name for f in fields(ChatTemplate)}
    if not isinstance(entry, Mapping) or entry.get("format") != ENTRY_FORMAT:
        raise GptMiniError(
            f"the checkpoint's chat_template is not one this gptmini reads (format "
            f"{entry.get('format') if isinstance(entry, Mapping) else _kind(entry)!r}, this one reads "
            f"{ENTRY_FORMAT}); upgrade gptmini."
        )
    values = {k: v for k, v in entry.items() if k != "format"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise GptMiniError(f"the checkpoint's chat_template has keys {unknown} this gptmini does not know.")
    try:
        return ChatTemplate(**{**values, "stop": tuple(values.get("stop", ()))})
    except TypeError as exc:
        raise GptMiniError(f"the checkpoint's chat_template is damaged ({exc}).") from None


def template_of(info: Mapping) -> tuple[ChatTemplate, str | None]:
    """The template of a checkpoint's gptmini entry, and a note when it has none (then the ``chat``
    template, which a base model can continue: its stop strings end the reply)."""
    entry = info.get("chat_template") if isinstance(info, Mapping) else None
    if entry is None:
        note = f"this checkpoint was not trained on a chat template; using the {DEFAULT!r} template"
        return TEMPLATES[DEFAULT], note
    return from_entry(entry), None


def _literal(text: str) -> str:
    """A Jinja string literal for ``text`` (JSON's escapes are Jinja's, and ASCII-only)."""
    return json.dumps(text)


def jinja(template: ChatTemplate) -> str:
    """A Hugging Face ``chat_template`` that renders exactly ``render_text`` (tested through
    ``AutoTokenizer.apply_chat_template``)."""

    def turn(role: str) -> str:
        if role == "assistant":
            return f"{{{{ {_literal(template.assistant)} + message['content'] + {_literal(END)} }}}}"
        before, after = getattr(template, role).split(CONTENT)
        return f"{{{{ {_literal(before)} + message['content'] + {_literal(after)} }}}}"

    default = ""
    if template.default_system is not None:
        default = (
            "{% if messages[0]['role'] != 'system' %}"
            f"{{{{ {_literal(template.system.replace(CONTENT, template.default_system))} }}}}"
            "{% endif %}"
        )
    return (
        f"{{{{ {_literal(END)} }}}}"
        + default
        + "{% for message in messages %}"
        + "{% if message['role'] == 'system' %}"
        + turn("system")
        + "{% elif message['role'] == 'user' %}"
        + turn("user")
        + "{% else %}"
        + turn("assistant")
        + "{% endif %}{% endfor %}"
        + f"{{% if add_generation_prompt %}}{{{{ {_literal(template.assistant)} }}}}{{% endif %}}"
    )

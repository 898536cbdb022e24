"""The prompt: quoting it for Hydra's command line, reading it (text, @file or stdin) and encoding it.

One concern: turning what the user typed (an option, a file, stdin, an interactive line) into the prompt's
token ids. Imports only ``gptmini.common`` and ``gptmini.data.tokenizer`` (for the <|endoftext|> name); must
not import ``training`` or run the model.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from gptmini.common import GptMiniError
from gptmini.data.tokenizer import EOT

# The options whose values are free text typed by a user: the prompt, and chat's system message.
TEXT_OPTIONS = ("prompt", "system")


def quote_prompt_argument(argv: list[str]) -> list[str]:
    """Quote raw ``prompt=...`` and ``system=...`` command-line arguments for Hydra's override grammar.

    Hydra rejects unquoted values with brackets, commas, colons and such (``prompt=def main(`` is a
    parse error), and OmegaConf would resolve ``${...}`` in a prompt. A prompt value that is not already
    quoted is wrapped in single quotes with the few escapes the two grammars need, so it arrives as typed.
    """
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key in TEXT_OPTIONS and sep and value and value[0] not in "'\"":
            # OmegaConf: "\${" is a literal "${" (backslashes before it are doubled to stay literal too).
            value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
            # Hydra quoted strings: backslashes are escapes only before a quote or at the end.
            value = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
            arg = f"{key}='{value}'"
        quoted.append(arg)
    return quoted


# The most a prompt may hold. The model sees only its last block_size tokens (1024 for GPT-2, a few KB of
# text), so a bigger prompt is a mistake (prompt=@/dev/zero, the wrong file) that would otherwise be read
# and tokenized whole, without end for an endless stream.
MAX_PROMPT_BYTES = 4 * 1024 * 1024


def read_prompt(prompt: str) -> str:
    """The prompt text: ``-`` reads stdin, ``@path`` reads a file, anything else is the text itself.

    Stdin and files are read through one bounded reader: at most ``MAX_PROMPT_BYTES``, UTF-8.
    """
    if prompt == "-":
        return _read_stdin()
    if prompt.startswith("@"):
        path = Path(prompt[1:]).expanduser()
        if path.is_dir():
            raise GptMiniError(f"prompt file {path} is a directory (from prompt={prompt}); name a text file.")
        try:
            with path.open("rb") as handle:
                return _read_bounded(handle, f"prompt file {path}")
        except FileNotFoundError:
            raise GptMiniError(f"prompt file not found: {path} (from prompt={prompt}).") from None
        except OSError as exc:
            raise GptMiniError(f"cannot read prompt file {path}: {exc.strerror or exc}.") from None
    return prompt


# What to do instead, for a prompt=- that finds no text on stdin.
STDIN_FIX = (
    "pipe the text in (echo 'Once upon' | python generate.py prompt=-), "
    "or leave prompt unset to start a new document."
)


def _read_stdin() -> str:
    """prompt=-: stdin must be open and hold text (an empty pipe means that the command before it failed)."""
    try:
        if sys.stdin is None:  # Python started with stdin closed (<&-)
            raise ValueError("no stdin")
        text = _read_bounded(getattr(sys.stdin, "buffer", sys.stdin), "stdin")
    except (OSError, ValueError):  # no stdin, or a closed or invalid descriptor
        raise GptMiniError(
            f"prompt=- reads the prompt from stdin, but stdin is closed; {STDIN_FIX}"
        ) from None
    if not text:
        raise GptMiniError(f"prompt=- read nothing from stdin (it was empty); {STDIN_FIX}")
    return text


def _read_bounded(stream, source: str) -> str:
    """Up to MAX_PROMPT_BYTES of UTF-8 text from a binary (or text) stream; more is refused, unread."""
    data = stream.read(MAX_PROMPT_BYTES + 1)  # one byte past the cap tells "at the cap" from "over it"
    if len(data) > MAX_PROMPT_BYTES:
        raise GptMiniError(
            f"{source} holds more than {MAX_PROMPT_BYTES // 2**20} MiB, the most a prompt may be (the model "
            "sees only its last block_size tokens); pass a shorter one, e.g. its end: "
            "tail -n 100 FILE > prompt.txt."
        )
    if isinstance(data, str):  # a text stream (a test's io.StringIO): already decoded
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GptMiniError(
            f"{source} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "pass a UTF-8 text file (iconv -t utf-8 converts one)."
        ) from None


def encode_prompt(text: str, enc, block_size: int) -> list[int]:
    """Token ids of the prompt: <|endoftext|> for an empty one, the last block_size for a long one."""
    ids = enc.encode(text, allowed_special="all")  # a literal <|endoftext|> in the prompt is the token
    if not ids:
        if EOT not in enc.special_tokens_set:
            raise GptMiniError("the prompt is empty and the tokenizer has no <|endoftext|>; pass a prompt.")
        ids = [enc.encode_single_token(EOT)]
    if len(ids) > block_size:
        print(
            f"warning: the prompt has {len(ids)} tokens but the model sees at most {block_size}; "
            f"using the last {block_size}.",
            file=sys.stderr,
            flush=True,
        )
        ids = ids[-block_size:]
    return ids


def read_line() -> str | None:
    """One line typed by the user in interactive mode, after a "> " marker; None at Ctrl-D or Ctrl-C."""
    sys.stderr.write("> ")  # the marker is not generated text: stderr, like every message
    sys.stderr.flush()
    try:
        return input()
    except (EOFError, KeyboardInterrupt):
        return None

"""The prompt: quoting it for Hydra's command line, reading it (text, @file or stdin) and encoding it.

One concern: turning what the user typed into the prompt's token ids. Imports only ``gptmini.common`` and
``gptmini.data.tokenizer`` (for the <|endoftext|> name); must not import ``training`` or run the model.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from gptmini.common import GptMiniError
from gptmini.data.tokenizer import EOT


def quote_prompt_argument(argv: list[str]) -> list[str]:
    """Quote a raw ``prompt=...`` command-line argument for Hydra's override grammar.

    Hydra rejects unquoted values with brackets, commas, colons and such (``prompt=def main(`` is a
    parse error), and OmegaConf would resolve ``${...}`` in a prompt. A prompt value that is not already
    quoted is wrapped in single quotes with the few escapes the two grammars need, so it arrives as typed.
    """
    return [_quote_prompt(arg) for arg in argv]


def _quote_prompt(arg: str) -> str:
    key, sep, value = arg.partition("=")
    if key != "prompt" or not sep or not value or value[0] in "'\"":
        return arg
    # OmegaConf: "\${" is a literal "${" (backslashes before it are doubled to stay literal too).
    value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    # Hydra quoted strings: backslashes are escapes only before a quote or at the end.
    value = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    return f"prompt='{value}'"


def read_prompt(prompt: str) -> str:
    """The prompt text: ``-`` reads stdin, ``@path`` reads a file, anything else is the text itself."""
    if prompt == "-":
        return sys.stdin.read()
    if prompt.startswith("@"):
        path = Path(prompt[1:]).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise GptMiniError(f"prompt file not found: {path} (from prompt={prompt}).") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise GptMiniError(f"cannot read prompt file {path}: {exc}. Pass a UTF-8 text file.") from None
    return prompt


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

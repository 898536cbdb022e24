"""Chat with a checkpoint: ``python generate.py chat=true``, one reply or an interactive conversation.

One concern: the conversation. Its turns are rendered with the checkpoint's own chat template
(``gptmini.data.chat_template``: the renderer training, the server and the export use too), so the model is
prompted with the text it was trained on; the token loop and the printing are ``text._Session``'s.

- A reply ends at <|endoftext|> (the end of every assistant turn the model was trained on), at one of the
  template's stop strings (where a model that never learnt the template starts the next turn) or at ``stop``.
- The context holds the prompt and the reply. ``reply_room`` tokens are kept for the reply; when the
  conversation needs more, its oldest turns are dropped (the system message stays), and stderr says how many.
- A checkpoint trained without a template (a base model, GPT-2, a Hugging Face folder) is chatted with the
  ``chat`` template, said once on stderr.

May import ``data.chat_template``, ``common`` and ``generation.prompt``; must not import ``training``.
"""

from __future__ import annotations

from collections.abc import Mapping

from gptmini.common import GptMiniError, say
from gptmini.data.chat_template import ChatTemplate, fit_history, render, template_of
from gptmini.generation.prompt import read_line

RESET = "/reset"  # typed alone in interactive chat: forget the conversation


def checkpoint_template(info: Mapping) -> ChatTemplate:
    """The chat template of a checkpoint's gptmini entry; a note on stderr when it has none (the default).
    A template this gptmini cannot read is a ``GptMiniError``."""
    template, note = template_of(info)
    if note is not None:
        say(f"note: {note}.")
    return template


def reply_room(max_new_tokens: int, block_size: int) -> int:
    """Tokens of the context kept free for the reply: max_new_tokens, but at most half the context, so a
    large max_new_tokens (generate.py allows any) never leaves the conversation no room."""
    return min(max_new_tokens, block_size // 2)


class Conversation:
    """A chat's turns so far. ``reply`` adds the user's turn, prints the model's reply and keeps it.

    ``session`` is a ``text._Session``: the loaded model, the options and the printing of a sample.
    """

    def __init__(self, session, template: ChatTemplate, system: str | None):
        self.session = session
        self.template = template
        self.system = [("system", system)] if system else []  # kept across /reset and dropped turns
        self.turns: list[tuple[str, str]] = []  # user and assistant turns, oldest first
        cfg = session.cfg
        self.block_size = session.model.config.block_size
        self.room = reply_room(cfg.max_new_tokens, self.block_size)
        self.stops = [*cfg.stop, *template.stop]

    def reply(self, text: str) -> list[str]:
        """The model's replies to the user's ``text`` (``num_samples`` of them, printed); the first one joins
        the conversation."""
        turns = self._fitted([*self.turns, ("user", text)])
        prompt = render(self.template, self.system + turns, self.session.enc, add_generation_prompt=True)
        replies = self.session.run_ids(prompt.ids, self.stops)
        self.turns = [*turns, ("assistant", replies[0])]
        return replies

    def reset(self) -> None:
        """Forget every turn (the system message stays)."""
        self.turns = []

    def _fitted(self, turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The newest ``turns`` whose prompt leaves ``room`` tokens for the reply; says what was dropped."""
        budget = self.block_size - self.room
        try:
            kept, dropped = fit_history(self.template, self.system + turns, self.session.enc, budget)
        except GptMiniError:
            shorter = ", or a shorter system message" if self.system else ""
            raise GptMiniError(
                f"the message does not fit the model's context of {self.block_size} tokens with "
                f"{self.room} kept for the reply; send a shorter message{shorter}, or lower max_new_tokens."
            ) from None
        kept = kept[len(self.system) :]
        if kept[0][0] == "assistant":  # a reply whose question was dropped goes with it
            kept, dropped = kept[1:], dropped + 1
        if dropped:
            say(
                f"dropped the oldest {dropped} turn{'s' if dropped > 1 else ''} of the conversation: it no "
                f"longer fits the model's context of {self.block_size} tokens with {self.room} kept for the "
                "reply."
            )
        return kept


def chat_interactive(conversation: Conversation) -> list[str]:
    """Read a user turn, print the reply, repeat: ``/reset`` starts over; an empty line, Ctrl-D or Ctrl-C at
    the prompt quits. A message too long for the context is said on stderr and the conversation goes on."""
    say(
        f"chat: type a message and press Enter; {RESET} starts a new conversation, an empty line or Ctrl-D "
        "quits, Ctrl-C stops a reply."
    )
    replies = []
    while True:
        line = read_line()
        if line is None or not line.strip():
            break
        if line.strip() == RESET:
            conversation.reset()
            kept = " (the system message stays)" if conversation.system else ""
            say(f"a new conversation starts{kept}.")
            continue
        try:
            replies += conversation.reply(line)
        except GptMiniError as error:
            say(f"error: {error}")
    return replies

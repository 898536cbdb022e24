"""Streaming text: token ids to characters without splitting one, and holding back possible stop strings.

One concern: what may be printed so far. Pure string handling: imports nothing from gptmini, so it must
not import ``training`` (nor anything else of the package).
"""

from __future__ import annotations

import codecs


class StreamDecoder:
    """Turn token ids into text one token at a time.

    A token may end in the middle of a UTF-8 character (byte-level BPE splits emoji and CJK across tokens);
    the incremental decoder keeps the incomplete bytes until the character is whole.
    """

    def __init__(self, enc):
        self.enc = enc
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token ("" while a character is still partial)."""
        return self.decoder.decode(self.enc.decode_single_token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is left; a truncated character becomes U+FFFD."""
        return self.decoder.decode(b"", final=True)


class StopFilter:
    """Release text only when it cannot be the start of a stop string; report when one is complete."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add text; return the part that is safe to print now."""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            released, self.pending = self.pending[:cut], ""
            return released
        hold = self._held_back_length()
        released = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(released) :]
        return released

    def flush(self) -> str:
        """The held-back tail once generation ends without a stop."""
        released, self.pending = self.pending, ""
        return released

    def _held_back_length(self) -> int:
        """Length of the longest end of ``pending`` that some stop string starts with."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class TextStream:
    """One sample's text, token by token: decoded whole characters, stop strings held back and cut, and the
    end at <|endoftext|> or a stop string. generate.py and the server both turn tokens into text with it.

    ``push`` returns the text that may be shown now; once ``ended`` is set ("eot" or "stop") no more tokens
    should be pushed. ``close`` returns what was held back, when the sample ends for any other reason (its
    token budget, Ctrl-C, a client that stops).
    """

    def __init__(self, enc, stops: list[str], eot_id: int | None):
        self.decoder = StreamDecoder(enc)
        self.stops = StopFilter(list(stops))
        self.eot_id = eot_id
        self.ended: str | None = None

    def push(self, token_id: int) -> str:
        """Add one generated token; the text now safe to show ("" when it is held back or ends the text)."""
        if token_id == self.eot_id:
            self.ended = "eot"  # <|endoftext|> ends the sample and is never text
            return ""
        text = self.stops.feed(self.decoder.push(token_id))
        if self.stops.stopped:
            self.ended = "stop"
        return text

    def close(self) -> str:
        """The held-back tail (a partial character, a partial stop string), or "" after a stop string."""
        if self.stops.stopped:
            return ""
        tail = self.stops.feed(self.decoder.flush())
        return tail + self.stops.flush()

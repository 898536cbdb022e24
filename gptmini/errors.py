"""The one exception type users see.

Anything a user can get wrong (a config value, a path, a checkpoint, a prompt) raises ``GptMiniError`` with a
short message that names the value and the fix. ``train.py`` and ``generate.py`` print it without a traceback
and exit with status 2; every other exception is a bug and keeps its traceback.
"""


class GptMiniError(Exception):
    """A user-facing error: the message says what was wrong and how to fix it."""

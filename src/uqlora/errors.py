"""The one exception type users see: a clear sentence naming what is wrong and where."""


class UqloraError(Exception):
    """Bad input or state. The CLI prints `error: <message>` on one line and exits with status 2."""

"""The one error type users see.

A :class:`MechmedError` is a problem with the user's input (a file, a row, an option, a layer),
written as one line that names the culprit and says what to do. The CLI prints it without a
traceback and exits with :data:`EXIT_USAGE`.
"""

from __future__ import annotations

EXIT_USAGE = 2


class MechmedError(Exception):
    """Bad input: the message names the file, row, option or layer and what to change."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

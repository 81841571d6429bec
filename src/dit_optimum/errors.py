"""The package's own error types: a known failure whose message names the parameter or file and what is allowed.

Every check in dit-optimum raises ``DiTOptimumError`` (a ``ValueError``, so ``except ValueError`` keeps working);
the command line prints it as one line and exits non-zero, while unexpected exceptions keep their traceback.
"""

from __future__ import annotations


class DiTOptimumError(ValueError):
    """Bad input or a bad file, with a message naming the parameter or file and the allowed values."""


def error_line(error: BaseException) -> str:
    """The command line's report of a known failure: ``error: <message>`` on exactly one line (a newline inside a
    path or value the message quotes is shown as ``\\n``)."""
    text = str(error).replace("\r", "\\r").replace("\n", "\\n")
    return f"error: {text}"


class MissingPathError(DiTOptimumError, FileNotFoundError):
    """A file or folder the user named does not exist (also a ``FileNotFoundError``)."""


class OutputPathError(DiTOptimumError, OSError):
    """A path could not be written (full disk, read-only, a link or special file in the way); also an ``OSError``."""

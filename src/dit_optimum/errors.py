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


class ModelFileError(DiTOptimumError, OSError):
    """A file ``from_pretrained`` needs (weights, config) is missing, unreadable or damaged; also an ``OSError``, the
    type diffusers raises there (its variant fallback, and callers, catch ``OSError``)."""


class BadOptionError(DiTOptimumError, TypeError):
    """An option the receiving class does not take (a LoRA metadata key that is no ``LoraConfig`` option, an unknown
    keyword argument); also a ``TypeError``, as Python and diffusers raise for an unexpected keyword argument."""


class MissingKeyError(DiTOptimumError, KeyError):
    """A key that should be there is not; also a ``KeyError``, where diffusers raises one."""

    __str__ = DiTOptimumError.__str__  # the message as written, not KeyError's quoted repr


# standard exception type -> the package's error of that type too
_STANDARD_KINDS: dict[type, type] = {
    OSError: ModelFileError,
    FileNotFoundError: MissingPathError,
    TypeError: BadOptionError,
    KeyError: MissingKeyError,
}


def keeping_type(error: BaseException, message: str) -> DiTOptimumError:
    """``message`` as a ``DiTOptimumError`` that is also an instance of ``error``'s standard exception type (the
    nearest built-in one), so that code catching the type diffusers raises still catches it: an ``OSError`` gives a
    ``ModelFileError``, a ``FileNotFoundError`` a ``MissingPathError``, a ``TypeError`` a ``BadOptionError``, a
    ``KeyError`` a ``MissingKeyError``, a ``ValueError`` a plain ``DiTOptimumError``; another type
    (``RuntimeError``, ``ConnectionError``, ...) a subclass made once, ``DiTOptimum<Type>``."""
    kind = next(base for base in type(error).__mro__ if base.__module__ == "builtins")
    if issubclass(DiTOptimumError, kind):  # ValueError (or a base of it)
        return DiTOptimumError(message)
    if kind in _STANDARD_KINDS:
        return _STANDARD_KINDS[kind](message)
    name = f"DiTOptimum{kind.__name__}"
    try:
        subclass = globals().get(name)
        if subclass is None:
            subclass = type(name, (DiTOptimumError, kind), {"__module__": __name__, "__str__": DiTOptimumError.__str__})
            globals()[name] = subclass  # importable by name (pickling)
        return subclass(message)
    except TypeError:  # a type that cannot be combined with ValueError, or built from a message alone
        nearest = next((base for base in kind.__mro__ if base in _STANDARD_KINDS), None)
        return _STANDARD_KINDS[nearest](message) if nearest is not None else DiTOptimumError(message)

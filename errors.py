"""User-facing error types.

Every mistake a user can make (a bad path, a corrupt file, an unsupported op, a bad flag)
raises a subclass of `IsthmusError`; the CLI prints its message as one line on stderr
and exits with status 2. Anything else is an internal error (a bug) and says so.
"""


class IsthmusError(Exception):
    """Base class: the message is complete and meant for the user."""


class ModelFormatError(IsthmusError):
    """A model file is missing, truncated, corrupt or of an unknown kind."""


class UnsupportedError(IsthmusError):
    """The model uses something isthmus does not implement (an op, an architecture, a quant type)."""


class IRError(IsthmusError):
    """The IR text does not parse, or a graph fails verification."""


class PullError(IsthmusError):
    """The default model could not be fetched or failed its integrity check."""


class InputError(IsthmusError):
    """Bad run-time input: wrong names, shapes or dtypes, or a prompt longer than the context."""

"""Errors the CLI turns into one clear line on stderr and a non-zero exit."""


class LayerpruneError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class TaskError(LayerpruneError):
    """Unknown task, bad task config, or task data that cannot be used."""


class DataError(LayerpruneError):
    """Task data is missing, unreadable, or has the wrong columns."""


class ModelError(LayerpruneError):
    """A checkpoint that is missing, unreadable, unsupported, or does not fit the task."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type): enough for a one-line error."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]

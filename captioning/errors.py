"""Errors and checks every layer shares (this module imports nothing, so any folder may use it)."""

from collections.abc import Collection
from typing import Any


class InputError(ValueError):
    """An input file or argument cannot be used; the message names the file (and entry) and what is wrong.

    The command-line tools report it in plain words (exit status 2) instead of a traceback.
    """


def check_choice(value: Any, choices: Collection[Any], setting: str) -> None:
    """Raise ``ValueError`` naming ``setting`` and its valid values when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{setting} must be one of {choices}, got {value!r}")

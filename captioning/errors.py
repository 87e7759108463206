"""The error the command-line tools report in plain words (exit status 2) instead of a traceback."""


class InputError(ValueError):
    """An input file or argument cannot be used; the message names the file (and entry) and what is wrong."""

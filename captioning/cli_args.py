"""argparse types every command-line tool shares, so a number out of range is refused the same way everywhere.

A type that raises ``argparse.ArgumentTypeError`` makes argparse name the flag, print the usage and
exit with status 2 before anything loads. ``float("nan")`` parses, so float flags check finiteness
here: a NaN compares False with every bound and would otherwise pass any range check.
This module imports only the standard library: ``captioning --help`` stays fast.
"""

import argparse
import math
from collections.abc import Callable

EXIT_STATUS_HELP = ("exit status: 0 done; 1 done, but some inputs were skipped or failed (each named on stderr); "
                    "2 usage or input error (the message names the flag or file), found before the work starts "
                    "where it can be")


def int_at_least(lowest: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``lowest``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {lowest}, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{lowest}"  # argparse names the type in some messages
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (no NaN, no infinity)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value
